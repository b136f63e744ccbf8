"""The data stage against the loopback S3 server: sources on S3 (JSONL + Parquet) -> Parquet shards,
manifest and held-out rows on S3 -> training rows; and the same samples as a local build."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _fixtures import ray_local, ray_with_aws_env, tiny_model_dir  # noqa: F401

from derta import demo, storage
from derta.config import validate_config
from derta.data import pipeline
from derta.paths import RunPaths
from test_data_pipeline import _samples

pytestmark = pytest.mark.slow


def test_s3_sources_to_s3_run_dir(s3_bucket, ray_with_aws_env, tiny_model_dir, tmp_path):
    triples = demo.safety_triples("train")[:60]
    lines = [json.dumps({"prompt": t.query, "refusal": t.safe, "compliance": t.harmful}) for t in triples]
    lines[7] = json.dumps({"prompt": "q", "refusal": "", "compliance": "x"})
    storage.write_text(f"{s3_bucket}/src/safety/part-0.jsonl", "\n".join(lines[:30]) + "\n")
    storage.write_text(f"{s3_bucket}/src/safety/part-1.jsonl", "\n".join(lines[30:]) + "\n")
    pairs = demo.helpful_pairs("train")[:40]
    buf = io.BytesIO()
    pq.write_table(pa.table({"query": [p.query for p in pairs], "response": [p.response for p in pairs]}), buf)
    storage.write_bytes(f"{s3_bucket}/src/helpful.parquet", buf.getvalue())

    def cfg(root):
        return validate_config({
            "model": {"name_or_path": tiny_model_dir},
            "data": {"safety": {"uri": f"{s3_bucket}/src/safety/", "fields": {"query": "prompt", "safe": "refusal", "harmful": "compliance"}},
                     "helpful": {"uri": f"{s3_bucket}/src/helpful.parquet"}, "on_bad_row": "skip", "holdout": 0.2,
                     "max_len": 128, "mix": {"preset": "custom", "helpful": 30, "prefix": 1.0, "rto": 20}},
            "storage": {"root": root},
        })  # fmt: skip

    s3_paths = RunPaths(f"{s3_bucket}/runs", "s3run")
    m = pipeline.build(cfg(s3_paths.root), s3_paths)
    assert m.skipped == {"safety:empty:refusal": 1}
    eligible = m.sources["safety"]["eligible"]
    assert eligible == 59 - m.heldout and m.heldout > 0
    assert m.counts == {"helpful": 30, "prefix": eligible, "rto": 20}
    assert storage.exists_file(s3_paths.manifest) and storage.exists_file(s3_paths.heldout)
    assert all(storage.exists_file(u) for u in pipeline.shard_uris(s3_paths, m))
    assert pipeline.shard_uris(s3_paths, m)[0].startswith(f"{s3_bucket}/runs/s3run/data/shards-")
    s3_rows = _samples(m, s3_paths)
    assert {r["source_id"].rsplit(":", 2)[0] for r in s3_rows} == {"safety", "helpful"}
    assert any(r["source_id"].startswith("safety:part-1.jsonl:") for r in s3_rows)

    train = pipeline.training_dataset(cfg(s3_paths.root), s3_paths, shuffle=False).take_all()
    assert sum(int(r["rto_mask"].sum()) for r in train) == m.tokens["rto_positions"]

    # the same config built into a local run dir gives exactly the same samples
    local = RunPaths(str(tmp_path), "local")
    m2 = pipeline.build(cfg(local.root), local)
    assert m2.counts == m.counts and m2.fingerprint == m.fingerprint and m2.prefix_hist == m.prefix_hist
    key = lambda r: (r["kind"], r["source_id"])  # noqa: E731
    assert sorted(_samples(m2, local), key=key) == sorted(s3_rows, key=key)
