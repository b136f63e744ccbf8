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

import hashlib
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from derta import storage
from derta.config import ConfigError, ExperimentConfig
from derta.data import mix as M
from derta.data import prefix as P
from derta.data import sources as S
from derta.data.transitions import KINDS, RTO_KINDS, Sample

MANIFEST_VERSION = 1
SAMPLE_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("rto_mask", pa.list_(pa.bool_())),
        ("prefix_len", pa.int32()),
        ("source_id", pa.string()),
    ]
)
SAMPLE_COLUMNS = tuple(SAMPLE_SCHEMA.names)
_MARK_SKIP, _MARK_TRIM = "_skip", "_trim"  # marker rows: counted by the sink, never written
HOLDOUT_SALT = "holdout"  # held-out split does not depend on data.seed (stable across trials)
ROWS_PER_SHARD = 50_000
PACK_BATCH = 2048


# --------------------------------------------------------------------------- manifest
@dataclass
class DataManifest:
    """What a build produced (also manifest.json next to the shards)."""

    fingerprint: str
    build_id: str
    created: float
    preset: str
    template: str
    tokenizer: str
    max_len: int
    seed: int
    num_samples: int
    counts: dict[str, int]
    skipped: dict[str, int]
    trimmed: dict[str, int]
    heldout: int
    tokens: dict[str, Any]
    prefix_hist: dict[str, int]
    sources: dict[str, Any]
    mix: dict[str, Any]
    shards: list[str]
    heldout_uri: str | None
    pad_id: int | None = None
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow (data.samples, data.samples.rto, data.tokens.trained, ...)."""
        out: dict[str, float] = {
            "data.samples": self.num_samples,
            "data.heldout": self.heldout,
            "data.skipped": sum(self.skipped.values()),
            "data.trimmed": sum(self.trimmed.values()),
        }
        out.update({f"data.samples.{k}": v for k, v in self.counts.items()})
        for key in ("total", "trained", "rto_positions", "mean_len", "max_len", "build_seconds"):
            if key in self.tokens:
                out[f"data.tokens.{key}"] = self.tokens[key]
        out.update({f"data.skipped.{_metric_key(k)}": v for k, v in self.skipped.items()})
        return {k: float(v) for k, v in out.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataManifest":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def _metric_key(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in text)


def data_fingerprint(cfg: ExperimentConfig) -> str:
    """Hash of everything that decides the samples (packing is applied when reading)."""
    data = cfg.data.model_dump(mode="json")
    data.pop("packing", None)
    key = {
        "data": data,
        "tokenizer": [cfg.model.name_or_path, cfg.model.revision],
        "method": cfg.train.method if cfg.data.mix.preset == "auto" else None,
        "version": MANIFEST_VERSION,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(paths) -> DataManifest | None:
    if not storage.exists_file(paths.manifest):
        return None
    return DataManifest.from_dict(storage.read_json(paths.manifest))


# --------------------------------------------------------------------------- plan (pass 1)
@dataclass
class RolePlan:
    """What the build pass needs to know about one source (small; shipped to the actors)."""

    role: str
    seed: int
    holdout: float
    limit_key: tuple[int, int] | None  # last (fidx, row) kept, None = no limit
    sorted_u: np.ndarray  # u of the eligible rows, sorted (for ranks)
    kinds: M.KindPlan | None
    derta_pref: bool = False
    safety_qhash: np.ndarray | None = None  # prebuilt: queries seen in rto/prefix rows

    def select(self, rows: list[dict]) -> list[dict]:
        """Records (with kinds) for the rows of one batch that make samples."""
        keep = []
        for r in rows:
            if r["error"] is not None:
                continue
            if self.limit_key is not None and (r["fidx"], r["row"]) > self.limit_key:
                continue
            if self.role == "safety" and P.row_uniform("", r["source_id"], HOLDOUT_SALT) < self.holdout:
                continue
            keep.append(r)
        if self.role == "prebuilt":
            return [self._prebuilt(r) for r in keep]
        if not keep or self.kinds is None:
            return []
        u = np.array([P.row_uniform(self.seed, r["source_id"], "mix") for r in keep])
        out = []
        for r, rank in zip(keep, M.ranks(self.sorted_u, u)):
            kinds = self.kinds.kinds_at(int(rank))
            if kinds:
                out.append({**r, "kinds": kinds})
        return out

    def _safety_queries(self) -> set[int]:
        if not hasattr(self, "_qset"):
            self._qset = set(self.safety_qhash.tolist()) if self.safety_qhash is not None else set()
        return self._qset

    def _prebuilt(self, r: dict) -> dict:
        if r["pkind"] == "rto":
            return {**r, "kinds": ["pref" if self.derta_pref else "rto"]}
        if r["pkind"] == "prefix" or _qhash(r["query"]) in self._safety_queries():
            return {**r, "kinds": ["prefix"], "prefix_all": True}
        return {**r, "kinds": ["helpful"]}


def _qhash(q: str) -> int:
    return int.from_bytes(hashlib.sha256(q.strip().encode()).digest()[:8], "big", signed=True)


def _scan_batch(batch: pa.Table, seed: int, holdout: float) -> pa.Table:
    rows = batch.select(["source_id", "pkind", "query", "safe", "harmful"]).to_pylist()
    u_mix, u_hold, qh = [], [], []
    held_q, held_s, held_h = [], [], []
    for r in rows:
        sid = r["source_id"]
        role = sid.split(":", 1)[0]
        u_mix.append(P.row_uniform(seed, sid, "mix"))
        uh = P.row_uniform("", sid, HOLDOUT_SALT) if role == "safety" else 1.0
        u_hold.append(uh)
        hold = uh < holdout
        held_q.append(r["query"] if hold else None)
        held_s.append(r["safe"] if hold else None)
        held_h.append(r["harmful"] if hold else None)
        qh.append(_qhash(r["query"]) if role == "prebuilt" and r["pkind"] in ("rto", "prefix") and r["query"] else 0)
    return pa.table(
        {
            "fidx": batch["fidx"], "row": batch["row"], "error": batch["error"], "reason": batch["reason"],
            "source_id": batch["source_id"], "u_mix": pa.array(u_mix, pa.float64()),
            "u_hold": pa.array(u_hold, pa.float64()), "qhash": pa.array(qh, pa.int64()),
            "query": pa.array(held_q, pa.string()), "safe": pa.array(held_s, pa.string()),
            "harmful": pa.array(held_h, pa.string()),
        }
    )  # fmt: skip


def _scan(specs: list[S.SourceSpec], seed: int, holdout: float) -> dict[str, pa.Table]:
    """One streaming pass over all sources; the small per-row table of each role, in file order."""
    import ray

    ds = _union([S.read_records(spec) for spec in specs])
    ds = ds.map_batches(_scan_batch, batch_format="pyarrow", fn_kwargs={"seed": seed, "holdout": holdout})
    tables = [t for t in ray.get(list(ds.to_arrow_refs())) if t.num_rows]
    table = pa.concat_tables(tables) if tables else _scan_batch(S.RECORD_SCHEMA.empty_table(), seed, holdout)
    roles = np.array([sid.split(":", 1)[0] for sid in table["source_id"].to_pylist()], dtype=object)
    out = {}
    for spec in specs:
        sub = table.filter(pa.array(roles == spec.role)) if len(roles) else table
        order = np.lexsort((sub["row"].to_numpy(), sub["fidx"].to_numpy()))
        out[spec.role] = sub.take(pa.array(order, pa.int64()))
    return out


def _union(datasets: list):
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


@dataclass
class Plan:
    preset: str
    amounts: dict[str, Any]
    specs: list[S.SourceSpec]
    roles: dict[str, RolePlan]
    skipped: Counter
    heldout_rows: list[dict]
    sources: dict[str, Any]
    warnings: list[str]


def _active_sources(cfg: ExperimentConfig) -> list[tuple[str, Any]]:
    """prebuilt rows replace the safety/helpful sources (they are complete training sets)."""
    d = cfg.data
    if d.prebuilt is not None:
        return [("prebuilt", d.prebuilt)]
    out = [("safety", d.safety)]
    if d.helpful is not None:
        out.append(("helpful", d.helpful))
    return out


def make_plan(cfg: ExperimentConfig) -> Plan:
    """Pass 1: scan every source (Ray Data), validate, split, and fix the mix."""
    import ray

    d = cfg.data
    preset, amounts = M.resolve_mix(d.mix, cfg.train.method)
    specs = [S.resolve(src, role) for role, src in _active_sources(cfg)]
    skipped: Counter = Counter()
    roles: dict[str, RolePlan] = {}
    heldout_rows: list[dict] = []
    sources: dict[str, Any] = {}
    warnings: list[str] = []
    scanned = _scan(specs, d.seed, d.holdout)
    for spec in specs:
        holdout = d.holdout if spec.role == "safety" else 0.0
        table = scanned[spec.role]
        limit_key = None
        if spec.cfg.limit is not None and table.num_rows > spec.cfg.limit:
            table = table.slice(0, spec.cfg.limit)
            limit_key = (int(table["fidx"][-1].as_py()), int(table["row"][-1].as_py()))
        errors = table["error"].to_pylist()
        bad = [i for i, e in enumerate(errors) if e is not None]
        if bad and d.on_bad_row == "error":
            more = f" ({len(bad) - 1} more bad rows; data.on_bad_row=skip skips and counts them)" if len(bad) > 1 else ""
            raise ConfigError(errors[bad[0]] + more)
        reasons = table["reason"].to_pylist()
        for i in bad:
            skipped[f"{spec.role}:{reasons[i]}"] += 1
        ok = np.array([e is None for e in errors], dtype=bool)
        n_ok = int(ok.sum())
        if n_ok == 0:
            what = f"all {len(errors)} rows are bad" if errors else "no rows"
            raise ConfigError(f"data.{spec.role}.uri: {spec.uri}: {what}")
        held = ok & (table["u_hold"].to_numpy() < holdout)
        if held.any():
            sub = table.filter(pa.array(held)).select(["source_id", "query", "safe", "harmful"]).to_pylist()
            heldout_rows.extend({"query": r["query"], "safe": r["safe"], "harmful": r["harmful"], "source_id": r["source_id"]} for r in sub)
        eligible = ok & ~held
        sorted_u = np.sort(table["u_mix"].to_numpy()[eligible])
        n_el = len(sorted_u)
        kinds_plan = None
        if spec.role == "safety":
            kinds_plan = M.plan_kinds(amounts, M.SAFETY_ORDER, n_el)
        elif spec.role == "helpful":
            kinds_plan = M.plan_kinds(amounts, ("helpful",), n_el)
        if kinds_plan is not None:
            warnings.extend(f"{w} ({spec.role} source {spec.uri})" for w in kinds_plan.warnings)
        qhash = None
        if spec.role == "prebuilt":
            qh = table["qhash"].to_numpy()[ok]
            qhash = np.unique(qh[qh != 0])
        roles[spec.role] = RolePlan(
            role=spec.role, seed=d.seed, holdout=holdout, limit_key=limit_key, sorted_u=sorted_u,
            kinds=kinds_plan, derta_pref=preset == "derta_pref", safety_qhash=qhash,
        )  # fmt: skip
        sources[spec.role] = {
            "uri": spec.uri, "format": spec.fmt, "files": spec.files, "rows": len(errors),
            "valid": n_ok, "bad": len(bad), "heldout": int(held.sum()), "eligible": n_el,
            "kinds": kinds_plan.counts() if kinds_plan else None,
        }  # fmt: skip
    return Plan(preset, amounts, specs, roles, skipped, heldout_rows, sources, warnings)


# --------------------------------------------------------------------------- build (pass 2)
def _sample_table(samples: list[Sample], skips: Counter) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in SAMPLE_COLUMNS}
    for s in samples:
        row = s.row()
        for k in SAMPLE_COLUMNS:
            cols[k].append(row[k])
        if s.trimmed:  # a marker row after the sample: counted by the sink, not written
            for k, v in zip(SAMPLE_COLUMNS, (_MARK_TRIM, [], [], [], 1, s.kind)):
                cols[k].append(v)
    for reason, n in skips.items():
        for k, v in zip(SAMPLE_COLUMNS, (_MARK_SKIP, [], [], [], n, reason)):
            cols[k].append(v)
    return pa.Table.from_pydict(cols, schema=SAMPLE_SCHEMA)


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
        rows = batch.to_pylist()
        by_role: dict[str, list[dict]] = {}
        for r in rows:
            by_role.setdefault(r["source_id"].split(":", 1)[0], []).append(r)
        records = [rec for role, rs in by_role.items() for rec in self.plans[role].select(rs)]
        samples, skips = self.builder.build(records)
        _telemetry(Counter(s.kind for s in samples), skips)
        return _sample_table(samples, skips)


def _telemetry(built: Counter, skipped: Counter) -> None:
    """Live counters for Grafana (no-ops without Ray / with DERTA_TELEMETRY=0; never raise)."""
    from derta import telemetry

    if built:
        telemetry.record_samples_built(dict(built))
    for reason, n in skipped.items():
        telemetry.record_rows_skipped(n, reason=reason)


def _actor_pool(max_size: int | None = None):
    """An autoscaling actor pool: 1 actor up to one per CPU but one (left for reads/writes)."""
    import ray
    from ray.data import ActorPoolStrategy

    cpus = int(ray.cluster_resources().get("CPU", 2))
    return ActorPoolStrategy(min_size=1, max_size=max(1, min(max_size or 16, cpus - 1)))


def _stream(cfg: ExperimentConfig, plan: Plan):
    """Samples plus marker rows, lazily (nothing runs until consumed)."""
    import ray

    ds = _union([S.read_records(spec) for spec in plan.specs])
    return ds.map_batches(
        BuildSamples,
        batch_format="pyarrow",
        batch_size=512,
        fn_constructor_kwargs={"cfg": cfg.to_dict(), "plans": [ray.put(plan.roles)]},
        compute=_actor_pool(),
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


# --------------------------------------------------------------------------- writing
def _shard_stats(table: pa.Table) -> dict[str, Any]:
    kinds = table["kind"].to_pylist()
    n_marker = table["prefix_len"].to_pylist()
    sids = table["source_id"].to_pylist()
    per_kind: dict[str, dict[str, int]] = {}
    skipped: Counter = Counter()
    trimmed: Counter = Counter()
    prefix_lens: list[int] = []
    max_len = 0
    keep = []
    ids_col, lab_col, mask_col = table["input_ids"], table["labels"], table["rto_mask"]
    for i, kind in enumerate(kinds):
        if kind == _MARK_SKIP:
            skipped[sids[i]] += n_marker[i]
            continue
        if kind == _MARK_TRIM:
            trimmed[sids[i]] += 1
            continue
        keep.append(i)
        n = len(ids_col[i])
        labels = np.asarray(lab_col[i].values)
        mask = np.asarray(mask_col[i].values)
        st = per_kind.setdefault(kind, {"samples": 0, "tokens": 0, "trained": 0, "rto_positions": 0})
        st["samples"] += 1
        st["tokens"] += n
        st["trained"] += int((labels != -100).sum())
        st["rto_positions"] += int(mask.sum())
        max_len = max(max_len, n)
        if kind == "prefix":
            prefix_lens.append(n_marker[i])
    return {
        "keep": keep, "per_kind": per_kind, "skipped": dict(skipped), "trimmed": dict(trimmed),
        "prefix_hist": P.histogram(prefix_lens), "max_len": max_len,
    }  # fmt: skip


def _sink_cls():
    from ray.data import Datasink

    class SampleSink(Datasink):
        """Writes each task's samples as one Parquet shard and returns its statistics."""

        def __init__(self, shard_dir: str):
            self.shard_dir = shard_dir
            self.fs, self.fs_dir = S.task_fs(shard_dir)  # built in the driver, used by the tasks
            self.results: list[dict] = []
            storage.makedirs(shard_dir)

        @property
        def min_rows_per_write(self) -> int:
            return ROWS_PER_SHARD

        def write(self, blocks, ctx) -> dict:
            import pyarrow.parquet as pq

            tables = [pa.Table.from_batches(b.to_batches(), schema=SAMPLE_SCHEMA) if isinstance(b, pa.Table) else pa.Table.from_pandas(b, schema=SAMPLE_SCHEMA) for b in blocks]
            table = pa.concat_tables(tables) if tables else SAMPLE_SCHEMA.empty_table()
            stats = _shard_stats(table)
            keep = stats.pop("keep")
            stats["shard"] = None
            stats["rows"] = len(keep)
            if keep:
                name = f"part-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
                path = f"{self.fs_dir.rstrip('/')}/{name}"
                pq.write_table(table.take(pa.array(keep)), path, filesystem=self.fs, compression="zstd")
                stats["shard"] = f"{os.path.basename(self.shard_dir.rstrip('/'))}/{name}"
            return stats

        def on_write_complete(self, write_result) -> None:
            self.results = list(write_result.write_returns)

        def on_write_failed(self, error: Exception) -> None:
            try:
                storage.delete(self.shard_dir)
            except Exception:  # noqa: BLE001 - best effort; the error that matters is `error`
                pass

    return SampleSink


def _merge_stats(results: list[dict]) -> dict[str, Any]:
    per_kind: dict[str, dict[str, int]] = {}
    skipped: Counter = Counter()
    trimmed: Counter = Counter()
    hist: Counter = Counter()
    max_len = 0
    for r in results:
        for kind, st in r["per_kind"].items():
            acc = per_kind.setdefault(kind, dict.fromkeys(st, 0))
            for k, v in st.items():
                acc[k] += v
        skipped.update(r["skipped"])
        trimmed.update(r["trimmed"])
        hist.update(r["prefix_hist"])
        max_len = max(max_len, r["max_len"])
    return {"per_kind": per_kind, "skipped": skipped, "trimmed": trimmed, "hist": hist, "max_len": max_len}


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
    sink = _sink_cls()(shard_dir)
    _stream(src_cfg, plan).write_datasink(sink)
    stats = _merge_stats(sink.results)
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
        sources=plan.sources,
        mix={"preset": plan.preset, "amounts": plan.amounts},
        shards=shards,
        heldout_uri=heldout_uri,
        pad_id=pad_id,
        warnings=plan.warnings,
        config=cfg.data.model_dump(mode="json"),
    )
    if heldout_uri is None and storage.exists_file(paths.heldout):
        storage.delete(paths.heldout)  # an earlier build's held-out rows would be stale
    storage.write_json(paths.manifest, manifest.to_dict())  # the commit
    _remove_stale_shards(_abs(paths.data), keep=shard_dir)
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
    """Shard directories of earlier builds (no manifest names them any more)."""
    prefix = storage.join(data_uri, "shards-")
    stale = {f[: f.index("/", len(prefix))] for f in storage.list_files(data_uri) if f.startswith(prefix) and "/" in f[len(prefix):]}
    for d in stale:
        if d != keep:
            try:
                storage.delete(d)
            except OSError:
                pass


# --------------------------------------------------------------------------- training rows
def _pack_batch(batch: dict[str, np.ndarray], max_len: int, pad_id: int, packing: bool) -> dict[str, np.ndarray]:
    """Ray Data batch fn: samples -> fixed-length training rows (stateless, so plain tasks)."""
    from derta.data.tokenize import TRAIN_COLUMNS, pack_rows

    n = len(batch["input_ids"])
    if n == 0:
        return {k: np.zeros((0, max_len), dtype=bool if k == "rto_mask" else np.int64) for k in TRAIN_COLUMNS}
    samples = [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i], "rto_mask": batch["rto_mask"][i]} for i in range(n)]
    return pack_rows(samples, max_len, pad_id, packing)


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


def samples_dataset(cfg: ExperimentConfig, paths, kinds: list[str] | tuple[str, ...] | None = None):
    """The built transition samples (from the manifest's shards, else streamed from sources)."""
    import ray

    if kinds is not None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ConfigError(f"unknown sample kinds {sorted(unknown)} (known: {', '.join(KINDS)})")
    manifest = read_manifest(paths) if paths is not None else None
    if manifest is None:
        return build_stream(cfg)
    if manifest.fingerprint != data_fingerprint(cfg):
        raise ConfigError(
            f"{paths.manifest}: the data there was built from a different data config "
            f"(fingerprint {manifest.fingerprint} != {data_fingerprint(cfg)}); rerun `derta data build`"
        )
    uris = shard_uris(paths, manifest)
    fs, _ = S.task_fs(uris[0])
    files = [storage.pyarrow_fs(s)[1] for s in uris]
    return ray.data.read_parquet(files, filesystem=fs, columns=list(SAMPLE_COLUMNS))


def training_dataset(cfg: ExperimentConfig, paths, kinds: list[str] | tuple[str, ...] | None = None, shuffle: bool = True):
    """Fixed-length training rows (input_ids, labels, rto_mask, position_ids; CONTRACTS.md).

    kinds: only these sample kinds (e.g. ["rto"] for a sequential schedule's second stage).
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
        fn_kwargs={"max_len": cfg.data.max_len, "pad_id": pad_id, "packing": cfg.data.packing},
    )


__all__ = [
    "DataManifest", "build", "build_stream", "training_dataset", "samples_dataset", "read_manifest",
    "data_fingerprint", "make_plan", "RTO_KINDS",
]  # fmt: skip
