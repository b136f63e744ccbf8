"""`derta run` with no config, end to end: vanilla vs DeRTa from the shipped base through real Ray,
real Ray Train (FSDP2 on gloo), real MLflow (sqlite) and the HF engine, on minimal sizes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow

FAST = [
    "train.max_steps=4", "train.global_batch=8", "train.micro_batch=4",
    "position_bias.heldout_questions=3", "position_bias.seen_questions=2",
    "eval.prefill_k=[0,10]", "eval.max_new_tokens=12", "storage.run_name=e2e",
]
ARMS = ("vanilla", "derta")


def test_derta_run_without_config_compares_vanilla_and_derta(tmp_path):
    root = tmp_path / "runs"
    # A relative storage root, as in the preset: workers and actors must get absolute paths.
    args = [sys.executable, "-m", "derta.cli", "run", "--set", "storage.root=runs"]
    for item in FAST:
        args += ["--set", item]
    env = {**os.environ, "DERTA_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    exp = root / "e2e"
    for rel in ("config.yaml", "corpus/questions.jsonl", "compare.json", "compare.md", "report.html"):
        assert (exp / rel).is_file(), rel
    for arm in ARMS:  # each arm's run directory follows the run-directory contract
        for rel in ("config.yaml", "data/manifest.json", "model/config.json", "eval/generations.jsonl", "eval/metrics.json"):
            assert (exp / arm / rel).is_file(), f"{arm}/{rel}"
        assert yaml.safe_load((exp / arm / "config.yaml").read_text())["model"]["name_or_path"] == "builtin:demo-base"
        metrics = json.loads((exp / arm / "eval/metrics.json").read_text())
        assert set(metrics["asr_by_k"]) == {"0", "10"} and "demo" in metrics["helpfulness"]
        rows = [json.loads(line) for line in (exp / arm / "eval/generations.jsonl").read_text().splitlines()]
        assert rows and {"attack", "question", "prompt", "response", "unsafe", "refusal_pos", "judge"} <= set(rows[0])
    saved = json.loads((exp / "compare.json").read_text())
    assert [r["arm"] for r in saved["rows"]] == list(ARMS) and len(saved["findings"]) == 4

    # The console: both rows side by side, every finding, the paths; nothing twice, no Ray chatter.
    out = proc.stdout
    for label in ("Vanilla", "DeRTa"):
        assert re.search(rf"{label}\s*│(\s*[\d.-]+\s*│){{6}}", out), out[-3000:]
    assert len(re.findall(r"^(holds|DOES NOT HOLD) ", out, re.M)) == 4, out[-3000:]
    assert "MLflow store" in out and "report" in out and "Ray logs" in out
    both = out + proc.stderr
    assert "PlacementGroupCleaner" not in both and "logging_progress" not in both, both[-3000:]
    lines = [ln.strip() for ln in out.splitlines() if ln.strip() and set(ln.strip()) - set("─━│┃┏┓┗┛┡┩└┘┌┐├┤┼╇╈═")]
    twice = sorted({ln for ln in lines if lines.count(ln) > 1})
    assert not twice, twice

    # The report compares the two arms: the side-by-side table first, then figures of both.
    page = (exp / "report.html").read_text()
    assert page.index('id="comparison"') < page.index('id="summary"')
    assert page.count('src="data:image/png;base64,') >= 4 and "src=\"http" not in page
    for alt in ("prefill ASR by k", "safety vs helpfulness", "ASR per attack"):
        assert re.search(rf'alt="{alt} of runs: [^"]*vanilla[^"]*derta', page), alt

    # MLflow: one parent, an arm run per arm, each with its data / train / eval stage runs.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("compare").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "e2e")
    kids = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(kids) == set(ARMS)
    for arm in ARMS:
        stages = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == kids[arm].info.run_id}
        assert set(stages) == {"data", "train", "eval"} and "loss" in stages["train"].data.metrics
        assert "asr_prefill" in kids[arm].data.metrics
    assert parent.data.metrics["compare_findings_total"] == 4
