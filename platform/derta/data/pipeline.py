"""The data stage as Ray Data pipelines: raw sources -> transition samples -> training rows.

build(cfg, paths) runs two streaming passes over the sources:
  1. scan   read + validate every row; bring back to the driver only a few numbers per row
            (position, error, two hashes) and the held-out triples' texts. The driver then
            applies data.on_bad_row, source limits, the held-out split and the exact mix
            counts (mix.py) - before anything is written.
  2. build  read again, tokenize in an actor pool (the tokenizer loads once per actor), build
            the samples (transitions.py via tokenize.SampleBuilder), and write Parquet shards
            with a datasink that also returns each shard's statistics.
Shards go to <data>/shards-<build id>/; the manifest (manifest.json) is written last and is
the commit marker: readers take the shard list from it, so a crashed build never leaves a
half dataset that looks complete (stale shard directories are removed after the commit).

training_dataset(cfg, paths, kinds) reads the shards named by the manifest (or, with no
manifest, streams straight from the sources via build_stream) and packs / pads the samples
into fixed-length rows (tokenize.pack_rows) inside map_batches.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter

import numpy as np
import pyarrow as pa

from derta import storage
from derta.config import ConfigError, ExperimentConfig, redact
from derta.data import prefix as P
from derta.data import sources as S
from derta.data.manifest import (
    SAMPLE_COLUMNS,
    DataManifest,
    merge_stats,
    sample_table,
    sample_sink_cls,
    data_fingerprint,
    read_manifest,
)
from derta.data.plan import HOLDOUT_SALT, Plan, RolePlan, _union, make_plan
from derta.data.transitions import KINDS

PACK_BATCH = 2048


# --------------------------------------------------------------------------- build (pass 2)
class BuildSamples:
    """Ray Data callable class: records -> samples (+ marker rows). One tokenizer per actor."""

    def __init__(self, cfg: dict, plans):
        import ray

        from derta.data.templates import make_template
        from derta.data.tokenize import SampleBuilder
        from derta.models import load_tokenizer

        self.cfg = ExperimentConfig.model_validate(cfg)
        template = make_template(self.cfg.data.template, load_tokenizer(self.cfg.model))
        self.builder = SampleBuilder(template, self.cfg.data)
        self.plans: dict[str, RolePlan] = ray.get(plans[0])  # [ref]: fetched once per actor

    def __call__(self, batch: pa.Table) -> pa.Table:
        from derta.faults import maybe_fail

        maybe_fail("data")
        rows = batch.to_pylist()
        by_role: dict[str, list[dict]] = {}
        for r in rows:
            by_role.setdefault(r["source_id"].split(":", 1)[0], []).append(r)
        records = [rec for role, rs in by_role.items() for rec in self.plans[role].select(rs)]
        samples, skips = self.builder.build(records)
        _telemetry(Counter(s.kind for s in samples), skips)
        return sample_table(samples, skips)


def _telemetry(built: Counter, skipped: Counter) -> None:
    """Live counters for Grafana (no-ops without Ray / with DERTA_TELEMETRY=0; never raise)."""
    from derta import telemetry

    if built:
        telemetry.record_samples_built(dict(built))
    for reason, n in skipped.items():
        telemetry.record_rows_skipped(n, reason=reason)


BUILD_BATCH = 512  # source rows per BuildSamples call


def _actor_pool(max_size: int | None = None):
    """An autoscaling actor pool: 1 actor up to one per CPU but one (left for reads/writes),
    and never more than `max_size` (each actor is a process that imports transformers and
    loads the tokenizer: on a laptop's few hundred rows, extra actors only cost start-up)."""
    import ray
    from ray.data import ActorPoolStrategy

    cpus = int(ray.cluster_resources().get("CPU", 2))
    return ActorPoolStrategy(min_size=1, max_size=max(1, min(max_size or 16, cpus - 1)))


def _stream(cfg: ExperimentConfig, plan: Plan):
    """Samples plus marker rows, lazily (nothing runs until consumed)."""
    import ray

    ds = _union([S.read_records(spec) for spec in plan.specs])
    rows = sum(len(r.sorted_u) for r in plan.roles.values())  # the rows that make samples
    return ds.map_batches(
        BuildSamples,
        batch_format="pyarrow",
        batch_size=BUILD_BATCH,
        fn_constructor_kwargs={"cfg": cfg.to_dict(), "plans": [ray.put(plan.roles)]},
        compute=_actor_pool(max_size=max(1, -(-rows // BUILD_BATCH))),
    )


def build_stream(cfg: ExperimentConfig, plan: Plan | None = None):
    """Transition samples as a lazy ray.data.Dataset, straight from the sources (no files).

    Runs the scan pass (validation, split, mix) eagerly; the sample building streams.
    """
    cfg, _ = _with_generated(cfg, None)  # ConfigError when responses would need generating
    plan = plan or make_plan(cfg)
    return _stream(cfg, plan).map_batches(_only_kinds, batch_format="pyarrow", fn_kwargs={"kinds": KINDS})


def _only_kinds(batch: pa.Table, kinds: tuple[str, ...]) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch["kind"], value_set=pa.array(list(kinds), pa.string())))


def build(cfg: ExperimentConfig, paths) -> DataManifest:
    """Build the transition samples of cfg.data under paths.data (see module doc)."""
    from derta.cluster import ensure_ray

    ensure_ray(cfg)
    t0 = time.time()
    pad_id = check_template(cfg)
    src_cfg, gen_skipped = _with_generated(cfg, _abs(paths.data))
    plan = make_plan(src_cfg)
    plan.skipped.update(gen_skipped)
    _telemetry(Counter(), plan.skipped)
    build_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    shard_dir = storage.join(_abs(paths.data), f"shards-{build_id}")
    sink = sample_sink_cls()(shard_dir)
    _stream(src_cfg, plan).write_datasink(sink)
    stats = merge_stats(sink.results)
    shards = sorted(r["shard"] for r in sink.results if r["shard"])
    per_kind = stats["per_kind"]
    counts = {k: per_kind[k]["samples"] for k in KINDS if k in per_kind}
    n = sum(counts.values())
    if n == 0:
        storage.delete(shard_dir)
        raise ConfigError(f"data: no samples were built (skipped: {dict(stats['skipped']) or 'none'}); check data.mix and data.max_len")
    total = sum(s["tokens"] for s in per_kind.values())
    heldout_uri = None
    if plan.heldout_rows:
        storage.write_text(paths.heldout, "".join(json.dumps(r) + "\n" for r in plan.heldout_rows))
        heldout_uri = paths.heldout
    skipped = Counter(plan.skipped)
    skipped.update(stats["skipped"])
    manifest = DataManifest(
        fingerprint=data_fingerprint(cfg),
        build_id=build_id,
        created=time.time(),
        preset=plan.preset,
        template=cfg.data.template,
        tokenizer=cfg.model.name_or_path,
        max_len=cfg.data.max_len,
        seed=cfg.data.seed,
        num_samples=n,
        counts=counts,
        skipped=dict(sorted(skipped.items())),
        trimmed=dict(sorted(stats["trimmed"].items())),
        heldout=len(plan.heldout_rows),
        tokens={
            "total": total,
            "trained": sum(s["trained"] for s in per_kind.values()),
            "rto_positions": sum(s["rto_positions"] for s in per_kind.values()),
            "mean_len": round(total / n, 2),
            "max_len": stats["max_len"],
            "per_kind": per_kind,
            "build_seconds": round(time.time() - t0, 2),
        },
        prefix_hist={k: stats["hist"].get(k, 0) for k in P.histogram([])},
        sources=redact(plan.sources),
        mix={"preset": plan.preset, "amounts": plan.amounts},
        shards=shards,
        heldout_uri=heldout_uri,
        pad_id=pad_id,
        warnings=plan.warnings,
        config=cfg.redacted()["data"],
    )
    if heldout_uri is None and storage.exists_file(paths.heldout):
        storage.delete(paths.heldout)  # an earlier build's held-out rows would be stale
    storage.write_json(paths.manifest, manifest.to_dict())  # the commit
    _remove_stale_shards(_abs(paths.data), keep=shard_dir)
    if line := S.skip_summary(manifest.skipped, manifest.trimmed):
        print(line, flush=True)  # on the console, not only in the manifest and MLflow
    return manifest


def _with_generated(cfg: ExperimentConfig, data_uri: str | None) -> tuple[ExperimentConfig, Counter]:
    """cfg with data.safety pointing at the generated triples when data.generate is on."""
    from derta.data import generate

    if not generate.wanted(cfg):
        return cfg, Counter()
    if data_uri is None:
        raise ConfigError("data.generate: responses are generated into a run dir; run `derta data build` first")
    src, skipped = generate.fill_missing(cfg, data_uri)
    raw = cfg.to_dict()
    raw["data"]["safety"] = src.model_dump(mode="json")
    raw["data"]["generate"] = None
    return ExperimentConfig.model_validate(raw), skipped


def _abs(uri: str) -> str:
    """Local paths made absolute: Ray workers do not share the driver's working directory."""
    return uri if storage.is_s3(uri) else os.path.abspath(uri)


def shard_uris(paths, manifest: DataManifest) -> list[str]:
    """The manifest names shards relative to the data dir, so a run dir can be moved/uploaded."""
    return [storage.join(_abs(paths.data), s) for s in manifest.shards]


def _remove_stale_shards(data_uri: str, keep: str) -> None:
    """Shard directories of earlier builds (no manifest names them any more), also the empty or
    partial ones of a build that was interrupted or failed."""
    prefix = storage.join(data_uri, "shards-")
    if storage.is_s3(data_uri):
        stale = {f[: f.index("/", len(prefix))] for f in storage.list_files(data_uri)
                 if f.startswith(prefix) and "/" in f[len(prefix):]}
    else:  # local: directories, so an empty one (no file to list) goes too
        stale = {os.path.join(data_uri, d) for d in os.listdir(data_uri) if d.startswith("shards-")}
    for d in stale:
        if d != keep:
            try:
                storage.delete(d)
            except OSError:
                pass


# --------------------------------------------------------------------------- training rows
def _pack_batch(batch: dict[str, np.ndarray], max_len: int, pad_id: int, packing: bool,
                rto_end: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Ray Data batch fn: samples -> fixed-length training rows (stateless, so plain tasks).
    rto_end: end-of-turn ids appended to rto samples as RTO targets (keep_rule public)."""
    from derta.data.tokenize import TRAIN_COLUMNS, pack_rows, with_rto_end

    n = len(batch["input_ids"])
    if n == 0:
        return {k: np.zeros((0, max_len), dtype=bool if k == "rto_mask" else np.int64) for k in TRAIN_COLUMNS}
    samples = [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i], "rto_mask": batch["rto_mask"][i]} for i in range(n)]
    if rto_end and "kind" in batch:
        samples = [with_rto_end(s, rto_end, max_len) if batch["kind"][i] == "rto" else s for i, s in enumerate(samples)]
    return pack_rows(samples, max_len, pad_id, packing)


def rto_end_ids(cfg: ExperimentConfig) -> tuple[int, ...]:
    """The end-of-turn ids the public code labels (with "Sorry") on RTO rows, when
    train.loss.keep_rule is public and the method trains RTO; else () (derta's rto samples end
    at the last harmful token). derta_pref rows get none: the end token is no harmful
    continuation to prefer a refusal over."""
    from derta.data.templates import make_template
    from derta.models import load_tokenizer

    if cfg.train.loss.keep_rule != "public" or cfg.train.method not in ("rto", "derta"):
        return ()
    return tuple(int(i) for i in make_template(cfg.data.template, load_tokenizer(cfg.model)).end_ids)


def pad_token_id(cfg: ExperimentConfig) -> int:
    return check_template(cfg)


def check_template(cfg: ExperimentConfig) -> int:
    """Load the tokenizer once in the driver: a template it cannot support fails here, with a
    ConfigError, before any worker starts. Returns the pad id for training rows."""
    from derta.data.templates import make_template
    from derta.models import load_tokenizer

    tok = load_tokenizer(cfg.model)
    make_template(cfg.data.template, tok)
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def _checked_manifest(cfg: ExperimentConfig, paths) -> DataManifest | None:
    """The run's manifest (None if the data was never built), refused if another data config built it."""
    manifest = read_manifest(paths) if paths is not None else None
    if manifest is not None and manifest.fingerprint != data_fingerprint(cfg):
        raise ConfigError(
            f"{paths.manifest}: the data there was built from a different data config "
            f"(fingerprint {manifest.fingerprint} != {data_fingerprint(cfg)}); rerun `derta data build`"
        )
    return manifest


def samples_dataset(cfg: ExperimentConfig, paths, kinds: list[str] | tuple[str, ...] | None = None):
    """The built transition samples (from the manifest's shards, else streamed from sources)."""
    import ray

    if kinds is not None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ConfigError(f"unknown sample kinds {sorted(unknown)} (known: {', '.join(KINDS)})")
    manifest = _checked_manifest(cfg, paths)
    if manifest is None:
        return build_stream(cfg)
    uris = shard_uris(paths, manifest)
    fs, _ = storage.pyarrow_fs(uris[0])
    files = [storage.pyarrow_fs(s)[1] for s in uris]
    return ray.data.read_parquet(files, filesystem=fs, columns=list(SAMPLE_COLUMNS))


def training_dataset(cfg: ExperimentConfig, paths, kinds: list[str] | tuple[str, ...] | None = None, shuffle: bool = True,
                     rto_end: bool = False):
    """Fixed-length training rows (input_ids, labels, rto_mask, position_ids; docs/ARCHITECTURE.md).

    kinds: only these sample kinds (e.g. ["rto"] for a sequential schedule's second stage).
    rto_end: with train.loss.keep_rule public, rto samples get the template's end-of-turn ids
    as RTO targets (rto_end_ids), as the public code has them (the trainer asks for it; the
    default keeps the rows exactly the built samples).
    shuffle: mix kinds before packing (seeded by data.seed), so a packed row and a batch are
    not all one kind (the shards are written role by role).
    """
    ds = samples_dataset(cfg, paths, kinds)
    if kinds is not None:
        ds = ds.map_batches(_only_kinds, batch_format="pyarrow", fn_kwargs={"kinds": tuple(kinds)})
    if shuffle:
        ds = ds.random_shuffle(seed=cfg.data.seed)
    manifest = read_manifest(paths) if paths is not None else None
    pad_id = manifest.pad_id if manifest is not None and manifest.pad_id is not None else pad_token_id(cfg)
    return ds.map_batches(
        _pack_batch,
        batch_size=PACK_BATCH,
        batch_format="numpy",
        fn_kwargs={"max_len": cfg.data.max_len, "pad_id": pad_id, "packing": cfg.data.packing, "rto_end": rto_end_ids(cfg) if rto_end else ()},
    )


def step_datasets(rows_ds, global_batch: int, workers: int, micro_batch: int, packing: bool) -> dict:
    """Training rows (from training_dataset, or built by hand) -> one Ray dataset per worker,
    laid out in optimizer steps of global_batch SAMPLES (tokenize.pack_steps): the rows are
    unpacked into their samples in order (training_dataset already shuffled them, seeded),
    each step's samples are packed on their own, and row j of a step goes to worker
    j % workers. Returns {"datasets": [per worker], "rows_per_step": [...], "samples": n,
    "rows": total rows}. Empty rows pad a step to a multiple of workers · micro_batch: pad id 0
    (its own document, no targets, so never attended to nor trained on)."""
    from derta.data.tokenize import unpack_rows

    samples, width = [], None
    for batch in rows_ds.iter_batches(batch_format="numpy", batch_size=PACK_BATCH):
        if len(batch["input_ids"]):
            width = width or len(batch["input_ids"][0])
            samples += unpack_rows(batch)
    return steps_from_samples(samples, width or 1, global_batch, workers, micro_batch, packing)


def steps_from_samples(samples: list[dict], max_len: int, global_batch: int, workers: int, micro_batch: int,
                       packing: bool) -> dict:
    """Samples in training order -> step_datasets' layout (one in-memory Ray dataset per worker)."""
    import ray
    from ray.data.block import BlockAccessor

    from derta.data.tokenize import TRAIN_COLUMNS, pack_steps, worker_rows

    if not samples:
        return {"datasets": [], "rows_per_step": [], "samples": 0, "rows": 0}
    rows, per_step = pack_steps(samples, global_batch, max_len, 0, packing, workers * micro_batch)
    out = []
    for idx in worker_rows(per_step, workers):
        block = BlockAccessor.batch_to_block({k: rows[k][idx] for k in TRAIN_COLUMNS})
        out.append(ray.data.from_blocks([block]))
    return {"datasets": out, "rows_per_step": per_step, "samples": len(samples), "rows": int(sum(per_step))}


def training_samples(cfg: ExperimentConfig, paths, kinds: list[str] | tuple[str, ...] | None = None,
                     rto_end: bool = False) -> list[dict] | None:
    """The built samples of `kinds` in training order, read on the driver straight from the
    manifest's Parquet shards (no Ray Data job: for a run's few thousand to a few hundred
    thousand samples the shuffle-and-pack pipeline cost more than the reading). Shuffled by
    data.seed; rto samples get the end-of-turn RTO targets with `rto_end` (see rto_end_ids).
    None when there is no manifest (the samples then stream from the sources)."""
    import pyarrow.parquet as pq

    from derta.data.tokenize import with_rto_end

    manifest = _checked_manifest(cfg, paths)
    if manifest is None:
        return None
    cols = ["kind", "input_ids", "labels", "rto_mask"]
    tables = []
    for uri in shard_uris(paths, manifest):
        fs, path = storage.pyarrow_fs(uri)
        tables.append(pq.read_table(path, filesystem=fs, columns=cols))
    table = pa.concat_tables(tables).combine_chunks() if tables else None
    if table is None or table.num_rows == 0:
        return []
    if kinds is not None:
        table = _only_kinds(table, tuple(kinds))
    kind = table.column("kind").to_pylist()
    flat = {}
    for c in cols[1:]:
        arr = table.column(c).combine_chunks()
        flat[c] = (arr.values.to_numpy(zero_copy_only=False), arr.offsets.to_numpy())
    end = rto_end_ids(cfg) if rto_end else ()
    samples = []
    for i in np.random.default_rng(cfg.data.seed).permutation(table.num_rows):
        sample = {c: v[o[i]:o[i + 1]] for c, (v, o) in flat.items()}
        samples.append(with_rto_end(sample, end, cfg.data.max_len) if end and kind[i] == "rto" else sample)
    return samples


__all__ = [
    "DataManifest", "Plan", "RolePlan", "HOLDOUT_SALT", "build", "build_stream", "training_dataset",
    "samples_dataset", "read_manifest", "data_fingerprint", "make_plan", "shard_uris", "check_template",
]  # fmt: skip
