"""What a build writes and reports: the sample schema, the Parquet datasink that also returns
each shard's statistics, and the DataManifest (manifest.json, the build's commit marker)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from derta import storage
from derta.config import ExperimentConfig
from derta.data import prefix as P
from derta.data.transitions import Sample

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
ROWS_PER_SHARD = 50_000


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


def sample_table(samples: list[Sample], skips: Counter) -> pa.Table:
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


# --------------------------------------------------------------------------- writing
def shard_stats(table: pa.Table) -> dict[str, Any]:
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


def sample_sink_cls():
    from ray.data import Datasink

    class SampleSink(Datasink):
        """Writes each task's samples as one Parquet shard and returns its statistics."""

        def __init__(self, shard_dir: str):
            self.shard_dir = shard_dir
            self.fs, self.fs_dir = storage.pyarrow_fs(shard_dir)  # built in the driver, used by the tasks
            self.results: list[dict] = []
            storage.makedirs(shard_dir)

        @property
        def min_rows_per_write(self) -> int:
            return ROWS_PER_SHARD

        def write(self, blocks, ctx) -> dict:
            import pyarrow.parquet as pq

            tables = [pa.Table.from_batches(b.to_batches(), schema=SAMPLE_SCHEMA) if isinstance(b, pa.Table) else pa.Table.from_pandas(b, schema=SAMPLE_SCHEMA) for b in blocks]
            table = pa.concat_tables(tables) if tables else SAMPLE_SCHEMA.empty_table()
            stats = shard_stats(table)
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


def merge_stats(results: list[dict]) -> dict[str, Any]:
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
