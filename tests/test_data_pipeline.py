"""The data stage end to end on a real local Ray cluster: builtin:demo -> run dir -> training rows,
bad rows (error vs skip), and the public {prefix, text, safe} format."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from _fixtures import ray_local, tiny_model_dir  # noqa: F401

from derta import storage
from derta.config import ConfigError, validate_config
from derta.data import pipeline
from derta.paths import RunPaths
from test_data_sources import PUBLIC_ROWS, TRIPLE

pytestmark = pytest.mark.slow


def _cfg(model_dir, root, **data):
    # the demo corpus, split between the kinds, 10 % held out (not the public-recipe defaults)
    data = {"max_len": 256, "safety": {"uri": "builtin:demo"}, "helpful": {"uri": "builtin:demo"},
            "mix": {"triples": "disjoint"}, "holdout": 0.1, **data}
    return validate_config({"model": {"name_or_path": model_dir}, "data": data,
                            "train": {"method": "derta"}, "storage": {"root": str(root)}})


def _samples(manifest, paths) -> list[dict]:
    rows = []
    for shard in pipeline.shard_uris(paths, manifest):
        fs, path = storage.pyarrow_fs(shard)
        rows.extend(pq.read_table(path, filesystem=fs).to_pylist())
    return rows


def test_demo_build_and_training_rows(ray_local, tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path)
    paths = RunPaths(str(tmp_path), "demo")
    m = pipeline.build(cfg, paths)
    assert json.loads(storage.read_text(paths.manifest))["build_id"] == m.build_id
    n_safety = 240 - m.heldout
    assert 0 < m.heldout < 60 and m.sources["safety"]["eligible"] == n_safety
    assert m.counts == {"helpful": 160, "prefix": n_safety // 2, "rto": n_safety - n_safety // 2}
    assert m.skipped == {} and m.num_samples == sum(m.counts.values())
    held = [json.loads(x) for x in storage.read_text(paths.heldout).splitlines()]
    assert len(held) == m.heldout and set(held[0]) >= {"query", "safe", "harmful"}
    rows = _samples(m, paths)
    assert len(rows) == m.num_samples
    held_ids = {h["source_id"] for h in held}
    assert not held_ids & {r["source_id"] for r in rows}  # held-out triples never train
    safety_ids = [r["source_id"] for r in rows if r["kind"] in ("rto", "prefix")]
    assert len(set(safety_ids)) == len(safety_ids)  # derta: disjoint halves
    assert m.tokens["total"] == sum(len(r["input_ids"]) for r in rows)
    assert m.tokens["rto_positions"] == sum(sum(r["rto_mask"]) for r in rows)
    assert m.tokens["trained"] == sum(sum(x != -100 for x in r["labels"]) for r in rows)
    assert sum(m.prefix_hist.values()) == m.counts["prefix"] and m.prefix_hist["0"] > 0
    metrics = m.metrics()
    assert metrics["data.samples.rto"] == m.counts["rto"] and metrics["data.tokens.total"] == m.tokens["total"]

    ds = pipeline.training_dataset(cfg, paths)
    train = ds.take_all()
    L = cfg.data.max_len
    assert all(r[c].shape == (L,) for r in train for c in ("input_ids", "labels", "rto_mask", "position_ids"))
    starts = sum(int((r["position_ids"] == 0).sum()) for r in train)
    assert starts >= m.num_samples  # every sample starts a document (plus the padding tails)
    assert sum(int(r["rto_mask"].sum()) for r in train) == m.tokens["rto_positions"]
    assert sum(int((r["labels"] != -100).sum()) for r in train) == m.tokens["trained"]
    assert len(train) < 0.6 * m.num_samples  # samples of ~100 tokens: about two per 256-token row

    # The trainer's driver-side read: the same samples, shuffled, end ids appended to rto samples.
    drv = pipeline.training_samples(cfg, paths)
    assert sorted(tuple(s["input_ids"]) for s in drv) == sorted(tuple(r["input_ids"]) for r in rows)
    assert [tuple(s["input_ids"]) for s in drv] == [tuple(s["input_ids"]) for s in pipeline.training_samples(cfg, paths)]
    end = pipeline.rto_end_ids(cfg)
    rto = pipeline.training_samples(cfg, paths, kinds=["rto"], rto_end=True)
    assert len(end) >= 1 and len(rto) == m.counts["rto"]
    assert sum(int(s["rto_mask"].sum()) for s in rto) == m.tokens["rto_positions"] + len(end) * len(rto)

    unpacked = _cfg(tiny_model_dir, tmp_path, packing=False)  # packing is a read-time choice
    rto_rows = pipeline.training_dataset(unpacked, paths, kinds=["rto"], shuffle=False).take_all()
    assert len(rto_rows) == m.counts["rto"]  # one sample per row
    assert sum(int(r["rto_mask"].sum()) for r in rto_rows) == m.tokens["rto_positions"]
    assert all((r["labels"] == -100).all() and r["position_ids"][0] == 0 for r in rto_rows)

    stale = _cfg(tiny_model_dir, tmp_path, seed=7)
    with pytest.raises(ConfigError, match="different data config"):
        pipeline.training_dataset(stale, paths)
    with pytest.raises(ConfigError, match="unknown sample kinds"):
        pipeline.training_dataset(cfg, paths, kinds=["nope"])


def test_bad_rows_error_skip_and_empty(ray_local, tiny_model_dir, tmp_path):
    src = tmp_path / "safety.jsonl"
    lines = [json.dumps({**TRIPLE, "query": f"q{i} zorblax?"}) for i in range(20)]
    lines[2] = json.dumps({**TRIPLE, "safe": ""})
    lines[5] = "{broken"
    src.write_text("\n".join(lines) + "\n")
    data = {"safety": {"uri": str(src)}, "helpful": None, "holdout": 0.0, "mix": {"preset": "vanilla"}}
    cfg = _cfg(tiny_model_dir, tmp_path, **data)
    paths = RunPaths(str(tmp_path), "bad")
    with pytest.raises(ConfigError) as e:
        pipeline.build(cfg, paths)
    assert str(e.value).startswith(f"{src}:3: field 'safe' is empty (1 more bad rows")
    assert not storage.exists(paths.manifest)  # nothing committed

    cfg = _cfg(tiny_model_dir, tmp_path, on_bad_row="skip", **data)
    m = pipeline.build(cfg, paths)
    assert m.skipped == {"safety:bad_line": 1, "safety:empty:safe": 1}
    assert m.counts == {"vanilla": 18} and m.heldout == 0 and not storage.exists(paths.heldout)

    limited = _cfg(tiny_model_dir, tmp_path, on_bad_row="skip", **{**data, "safety": {"uri": str(src), "limit": 4}})
    plan = pipeline.make_plan(limited)  # the scan pass alone decides limits, skips and the mix
    assert plan.sources["safety"]["rows"] == 4 and plan.roles["safety"].kinds.counts() == {"vanilla": 3}
    assert plan.skipped == {"safety:empty:safe": 1}
    from derta.data.plan import local_plan  # `derta plan`'s counts: the same plan, read without Ray

    assert local_plan(limited).sources == plan.sources and local_plan(cfg).sources["safety"]["kinds"] == {"vanilla": 18}

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"data.safety.uri: .*empty.jsonl: no rows"):
        pipeline.build(_cfg(tiny_model_dir, tmp_path, **{**data, "safety": {"uri": str(empty)}}), paths)


def test_public_format(ray_local, tiny_model_dir, tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in PUBLIC_ROWS))
    cfg = _cfg(tiny_model_dir, tmp_path, prebuilt={"uri": str(src)}, template="inst")
    paths = RunPaths(str(tmp_path), "public")
    m = pipeline.build(cfg, paths)
    assert m.counts == {"helpful": 1, "prefix": 2, "rto": 1} and m.heldout == 0
    rows = {(r["kind"], r["prefix_len"] > 0): r for r in _samples(m, paths)}
    assert set(rows) == {("helpful", False), ("prefix", False), ("prefix", True), ("rto", True)}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pre = rows[("prefix", True)]
    text = tok.decode(pre["input_ids"])
    assert text == ("[INST] How do I steal a zorblax from a shop? [\\INST] To take it unnoticed:\n- Step 1: make a"
                    " I'm sorry, I cannot assist with that.<|eot_id|>")
    trained = tok.decode([x for x in pre["labels"] if x != -100])
    assert trained == " I'm sorry, I cannot assist with that.<|eot_id|>"
    rto = rows[("rto", True)]
    harm = tok.decode([x for x, mk in zip(rto["input_ids"], rto["rto_mask"]) if mk])
    assert harm == " Tips for stealing a zorblax:\n- Go when it is busy.\n- Hide it in a bag."
    assert np.all(np.array(rto["labels"]) == -100)
    # no manifest: training rows stream straight from the sources (same samples, nothing written)
    streamed = pipeline.training_dataset(cfg, RunPaths(str(tmp_path), "not-built"), shuffle=False).take_all()
    assert sum(int(r["rto_mask"].sum()) for r in streamed) == m.tokens["rto_positions"]
    assert sum(int((r["labels"] != -100).sum()) for r in streamed) == m.tokens["trained"]
    assert not storage.exists(str(tmp_path / "not-built"))

    plan = pipeline.make_plan(_cfg(tiny_model_dir, tmp_path, prebuilt={"uri": str(src)}, mix={"preset": "derta_pref"}))
    from derta.data.sources import read_records_local

    records = plan.roles["prebuilt"].select(read_records_local(plan.specs[0]).to_pylist())
    assert [r["kinds"] for r in records] == [["helpful"], ["prefix"], ["prefix"], ["pref"]]  # rto rows -> pref
