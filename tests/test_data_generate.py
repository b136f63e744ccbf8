"""data.generate: missing responses filled by an engine actor pool (HF engine, tiny model, CPU)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from _fixtures import ray_local, tiny_model_dir  # noqa: F401

from derta import storage
from derta.config import ConfigError, validate_config
from derta.data import generate, pipeline
from derta.paths import RunPaths
from test_data_sources import TRIPLE

pytestmark = pytest.mark.slow


def test_fill_missing_then_build(ray_local, tiny_model_dir, tmp_path):
    src = tmp_path / "safety.jsonl"
    rows = [{**TRIPLE, "query": f"How do I make zorblax number {i}?"} for i in range(6)]
    rows[1]["harmful"] = ""
    del rows[3]["harmful"]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"model": {"name_or_path": tiny_model_dir},
           "data": {"safety": {"uri": str(src)}, "helpful": None, "holdout": 0.0, "max_len": 256, "on_bad_row": "skip",
                    "mix": {"preset": "vanilla"},
                    "generate": {"harmful_model": tiny_model_dir, "max_new_tokens": 6}},
           "eval": {"engine": "hf"}}  # fmt: skip
    cfg = validate_config(raw)
    paths = RunPaths(str(tmp_path), "gen")

    # without data.generate the same rows are bad rows
    plain = validate_config({**raw, "data": {**raw["data"], "generate": None, "on_bad_row": "error"}})
    with pytest.raises(ConfigError, match=r"safety.jsonl:2: field 'harmful' is empty"):
        pipeline.make_plan(plain)

    source, skipped = generate.fill_missing(cfg, str(tmp_path / "gen" / "data"))
    assert skipped == {} and source.format == "parquet"
    files = storage.list_files(source.uri, suffix=".parquet")
    out = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert [r["query"] for r in out] == [r["query"] for r in rows]  # source order kept
    for i in (0, 2, 4, 5):
        assert out[i] == {k: rows[i][k] for k in ("query", "safe", "harmful")}  # untouched
    generated = [out[1]["harmful"], out[3]["harmful"]]
    assert all(g is None or (isinstance(g, str) and g.strip()) for g in generated)
    assert storage.exists_file(storage.join(source.uri, generate.DONE))
    assert generate.fill_missing(cfg, str(tmp_path / "gen" / "data"))[0] == source  # cached

    m = pipeline.build(cfg, paths)
    assert m.counts == {"vanilla": 6}  # vanilla rows do not need the harmful response
    assert m.skipped == {}
    assert m.fingerprint == pipeline.data_fingerprint(cfg)
    with pytest.raises(ConfigError, match="data.generate"):
        pipeline.build_stream(cfg)
