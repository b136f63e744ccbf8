"""`derta run` end to end through real Ray, real Ray Train (2 FSDP2 workers on gloo), real
MLflow (sqlite) and the HF engine, on a minimal config of the built-in demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FAST = [
    "train.max_steps=6", "train.global_batch=8", "train.micro_batch=4", "train.lr=1e-3",
    "data.max_len=256", "eval.limit=6", "eval.prefill_k=[0,10]", "eval.max_new_tokens=12",
    "storage.run_name=e2e",
]


def test_derta_run_end_to_end(tmp_path):
    root = tmp_path / "runs"
    # A relative storage root, as in the demo config: workers and actors must get absolute paths.
    args = [sys.executable, "-m", "derta.cli", "run", "--set", "storage.root=runs"]
    for item in FAST:
        args += ["--set", item]
    env = {**os.environ, "DERTA_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    run = root / "e2e"
    for rel in ("config.yaml", "data/manifest.json", "model/config.json", "eval/generations.jsonl",
                "eval/metrics.json", "report.html"):
        assert (run / rel).exists(), rel
    assert list((run / "data").rglob("*.parquet"))
    metrics = json.loads((run / "eval/metrics.json").read_text())
    assert "prefill" in metrics["asr"] and 0.0 <= metrics["asr"]["prefill"] <= 100.0
    rows = [json.loads(line) for line in (run / "eval/generations.jsonl").read_text().splitlines()]
    assert rows and {"attack", "question", "prompt", "response", "unsafe", "refusal_pos", "judge"} <= set(rows[0])

    # The results table and the paths are printed.
    out = proc.stdout
    assert "ASR prefill" in out and "MLflow store" in out and "report" in out
    # A console a person reads: Ray's internal chatter stays in its log files (named in the
    # summary), no PlacementGroupCleaner spam, no Ray Data progress tables, nothing twice.
    assert "Ray logs" in out
    both = out + proc.stderr
    assert "PlacementGroupCleaner" not in both and "logging_progress" not in both, both[-3000:]
    lines = [ln.strip() for ln in out.splitlines() if ln.strip() and set(ln.strip()) - set("─━│┃┏┓┗┛┡┩└┘┌┐├┤┼╇╈═")]
    twice = sorted({ln for ln in lines if lines.count(ln) > 1})
    assert not twice, twice

    # MLflow: one parent run with nested data / train / eval runs, metrics logged.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("derta")
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert {"e2e", "data", "train", "eval"} <= set(by_name)
    parent = by_name["e2e"].info.run_id
    for stage in ("data", "train", "eval"):
        assert by_name[stage].data.tags["mlflow.parentRunId"] == parent
    assert "loss" in by_name["train"].data.metrics
    assert "asr_prefill" in by_name["e2e"].data.metrics
