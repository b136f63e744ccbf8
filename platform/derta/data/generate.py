"""Fill missing safe / harmful responses of the safety source with an inference engine
(data.generate): the paper's harmful responses come from a deliberately unaligned model, its
safe responses from an aligned one.

With data.generate.harmful_model (safe_model) set, a safety row may leave `harmful` (`safe`)
missing or empty. fill_missing() streams the source through Ray Data, sends only the rows that
need it to an engine actor pool (derta.eval.engines: vLLM on GPU, HF otherwise; greedy; prompts
rendered by derta.prompts in the generating model's own chat template: it is an existing aligned
or unaligned chat model, not the one being trained), and writes the completed triples as Parquet under
<data>/generated/safety-<hash>/ with a `_done.json` marker written last. The result is cached
by the hash of the source and generation settings, so a rebuild (or a Tune trial) never
generates twice. The build then reads the generated triples like any other source: a
generation that came back empty stays missing there and is reported (or skipped and counted)
by the ordinary validation, naming the generated file and row.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from derta import storage
from derta.config import ConfigError, ExperimentConfig, SourceConfig
from derta.data import sources as S

DONE = "_done.json"
COLUMNS = ("query", "safe", "harmful")


def wanted(cfg: ExperimentConfig) -> dict[str, str]:
    """{column: model} for the responses data.generate fills."""
    g = cfg.data.generate
    if g is None or cfg.data.prebuilt is not None:
        return {}
    return {col: model for col, model in (("harmful", g.harmful_model), ("safe", g.safe_model)) if model}


def generated_dir(cfg: ExperimentConfig, data_uri: str) -> str:
    key = {
        "source": cfg.data.safety.model_dump(mode="json"),
        "generate": cfg.data.generate.model_dump(mode="json") if cfg.data.generate else None,
        "engine": cfg.eval.engine,
        "seed": cfg.data.seed,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return storage.join(data_uri, "generated", f"safety-{digest}")


def _without(batch: pa.Table, col: str, missing: bool) -> pa.Table:
    ok = pc.is_null(batch["error"])
    has = pc.is_valid(batch[col])
    return batch.filter(pc.and_(ok, pc.invert(has) if missing else has))


@functools.lru_cache(maxsize=4)
def _renderer(model: str, key: str):
    """The generating model's chat-template renderer (one tokenizer load per worker process)."""
    from derta.eval.engines import load_eval_tokenizer
    from derta.prompts import Renderer

    return Renderer.make("chat_template", load_eval_tokenizer(model), key)


def _requests(batch: pa.Table, max_new_tokens: int, seed: int, model: str, key: str) -> dict[str, Any]:
    import numpy as np

    from derta.eval.engines import GenRequest

    r = _renderer(model, key)
    # the engine writes its output to a column named "response": drop the record's own
    # (always empty for safety rows) so nothing is overwritten
    out = {name: batch[name].to_numpy(zero_copy_only=False) for name in batch.column_names if name != "response"}
    out["request"] = np.array(
        [GenRequest(prompt_ids=r.prompt_ids(q), user=q, max_new_tokens=max_new_tokens, seed=seed).to_json()
         for q in batch["query"].to_pylist()],
        dtype=object,
    )  # fmt: skip
    return out


def _take(batch: dict[str, Any], col: str) -> dict[str, Any]:
    import numpy as np

    batch[col] = np.array([(r or "").strip() or None for r in batch.pop("response")], dtype=object)
    batch.pop("request")
    return batch


def _clean(v: Any) -> Any:
    """numpy scalars -> Python; the NaN that an all-null column turns into -> None."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


def _to_arrow(batch, columns: tuple[str, ...]) -> pa.Table:
    """Back to RECORD_SCHEMA types whatever batch format the engine stage used."""
    if isinstance(batch, pa.Table):
        batch = {c: batch[c].to_pylist() for c in batch.column_names}
    n = len(next(iter(batch.values()))) if batch else 0
    return pa.table({
        c: pa.array([_clean(v) for v in batch[c]] if c in batch else [None] * n, S.RECORD_SCHEMA.field(c).type)
        for c in columns
    })  # fmt: skip


def fill_missing(cfg: ExperimentConfig, data_uri: str) -> tuple[SourceConfig, Counter]:
    """The safety source with its missing responses generated -> (source config to build
    from, bad source rows skipped by reason). Cached (see module doc)."""
    import ray

    from derta.eval import engines

    models = wanted(cfg)
    spec = S.resolve(cfg.data.safety, "safety")
    spec.optional = tuple(models)
    out_dir = generated_dir(cfg, data_uri)
    done = storage.join(out_dir, DONE)
    generated = SourceConfig(uri=out_dir, format="parquet")
    if storage.exists_file(done):
        return generated, Counter(storage.read_json(done).get("skipped", {}))

    ds = S.read_records(spec)
    # validation first (one light pass): bad rows are an error or skipped and counted, as in build
    refs = ds.select_columns(["fidx", "row", "error", "reason"]).to_arrow_refs()
    tables = [t for t in ray.get(list(refs)) if t.num_rows]
    if not tables:
        raise ConfigError(f"data.safety.uri: {spec.uri}: no rows")
    rows = pa.concat_tables(tables)
    bad = rows.filter(pc.is_valid(rows["error"])).sort_by([("fidx", "ascending"), ("row", "ascending")])
    if bad.num_rows and cfg.data.on_bad_row == "error":
        raise ConfigError(bad["error"][0].as_py())
    skipped = Counter(f"safety:{r}" for r in bad["reason"].to_pylist())
    if rows.num_rows == bad.num_rows:
        raise ConfigError(f"data.safety.uri: {spec.uri}: all {rows.num_rows} rows are bad")

    g = cfg.data.generate
    keep = ("fidx", "row", *COLUMNS)
    for col, model in models.items():  # a model without a chat template: ConfigError before any generation
        _renderer(model, f"data.generate.{col}_model")
    for col, model in models.items():
        kind, gpu = engines.choose_engine(cfg.eval.engine)
        espec = engines.EngineSpec(model=model, kind=kind, dtype=cfg.model.dtype, use_gpu=gpu,
                                   tensor_parallel=cfg.eval.tensor_parallel, batch_size=g.batch_size, seed=cfg.data.seed)
        have = ds.map_batches(_without, batch_format="pyarrow", fn_kwargs={"col": col, "missing": False})
        need = ds.map_batches(_without, batch_format="pyarrow", fn_kwargs={"col": col, "missing": True})
        need = need.map_batches(_requests, batch_format="pyarrow", fn_kwargs={
            "max_new_tokens": g.max_new_tokens, "seed": cfg.data.seed, "model": model, "key": f"data.generate.{col}_model"})
        made = engines.map_generate(need, espec, num_actors=cfg.eval.num_actors, batch_size=g.batch_size)
        made = made.map_batches(_take, batch_format="numpy", fn_kwargs={"col": col})
        cols = tuple(S.RECORD_SCHEMA.names)
        ds = have.map_batches(_to_arrow, batch_format="pyarrow", fn_kwargs={"columns": cols}).union(
            made.map_batches(_to_arrow, batch_format="numpy", fn_kwargs={"columns": cols})
        ).materialize()  # the next column branches twice from here: generate once, not per branch
    fs, path = storage.pyarrow_fs(out_dir)
    storage.delete(out_dir)  # leftovers of an interrupted run (no marker): start clean
    ds.select_columns(list(keep)).sort(["fidx", "row"]).select_columns(list(COLUMNS)).write_parquet(path, filesystem=fs)
    storage.write_json(done, {"skipped": dict(skipped), "models": models})  # the commit marker
    return generated, skipped
