"""CPU twins of every shipped job (derta/twin.py): the job's own entrypoint and config with only the
model, the data, the sizes and the resources swapped, run end to end. What would fail hours into
the GPU run fails here instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from derta.config import load_config
from derta.twin import STANDIN_INSTRUCT, STANDIN_MODEL, cpu_twin, outside_swaps, standin

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
TWINNED = ("derta_8b", "derta_70b", "tune_prefix", "eval_attacks", "generate_responses")
NOT_GPU_JOBS = ("demo", "position_bias")  # laptop jobs: they run as they are (test_run_e2e, test_jobs)


def _config(job: str):
    return load_config(JOBS / "configs" / f"{job}.yaml")


def test_every_shipped_gpu_job_has_a_twin():
    jobs = {p.stem for p in JOBS.glob("*.py") if not p.name.startswith("_")}
    assert jobs - set(NOT_GPU_JOBS) == set(TWINNED)


@pytest.mark.parametrize("job", TWINNED)
def test_twin_swaps_only_model_data_sizes_and_resources(job, tmp_path):
    cfg = _config(job)
    twin = cpu_twin(cfg, tmp_path)
    assert outside_swaps(cfg, twin) == set()
    assert twin.model.name_or_path == standin(cfg.model.name_or_path) and not twin.train.use_gpu
    assert twin.eval.engine == "hf"
    # What the real job is about is kept as it is.
    assert (twin.data.template, twin.data.mix, twin.data.prefix) == (cfg.data.template, cfg.data.mix, cfg.data.prefix)
    assert (twin.train.method, twin.train.schedule, twin.train.epochs, twin.train.refusal_token) == (
        cfg.train.method, cfg.train.schedule, cfg.train.epochs, cfg.train.refusal_token)
    assert twin.train.loss.model_copy(update={"chunk_size": 0}) == cfg.train.loss.model_copy(update={"chunk_size": 0})
    assert twin.model.lora == cfg.model.lora and twin.tune.space == cfg.tune.space
    assert (twin.eval.attacks, twin.eval.judge, twin.eval.helpfulness, twin.eval.prefill_k) == (
        cfg.eval.attacks, cfg.eval.judge, cfg.eval.helpfulness, cfg.eval.prefill_k)
    # Every data file the job reads has a synthetic stand-in in the same format and field names.
    for src_twin, src in ((twin.data.safety, cfg.data.safety), (twin.data.helpful, cfg.data.helpful),
                          (twin.eval.questions, cfg.eval.questions)):
        assert (src_twin is None) == (src is None)
        if src is not None:
            row = json.loads(Path(src_twin.uri).read_text().splitlines()[0])
            assert src.fields.query in row and Path(src_twin.uri).is_relative_to(tmp_path)
    assert set(twin.eval.prompt_files) == set(cfg.eval.prompt_files)
    assert set(twin.eval.helpfulness_files) == set(cfg.eval.helpfulness_files)


def test_each_model_gets_a_standin_of_its_kind():
    assert standin("meta-llama/Meta-Llama-3-70B") == STANDIN_MODEL  # base: no chat template
    assert standin("cais/HarmBench-Llama-2-13b-cls") == STANDIN_MODEL  # a classifier prompted raw
    assert standin("meta-llama/Meta-Llama-3-8B-Instruct") == STANDIN_INSTRUCT
    assert standin("s3://b/models/llama3-8b-instruct-harmful/") == STANDIN_INSTRUCT


def test_the_twin_check_catches_a_changed_setting(tmp_path):
    cfg = _config("derta_8b")
    twin = cpu_twin(cfg, tmp_path)
    bent = twin.model_copy(update={"data": twin.data.model_copy(update={"template": "chat_template"})})
    assert outside_swaps(cfg, bent) == {"data.template"}


def test_set_applies_on_top_of_the_twin(tmp_path):
    twin = cpu_twin(_config("derta_70b"), tmp_path, ["storage.root=s3://b/runs", "train.max_steps=3"])
    assert twin.storage.root == "s3://b/runs" and twin.train.max_steps == 3


def test_standin_has_what_matters_of_base_llama3(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    from derta.models import BOS, EOS, resolve_model_path

    monkeypatch.setenv("DERTA_CACHE", str(tmp_path))
    path = resolve_model_path(STANDIN_MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template is None and tok.pad_token is None
    assert (tok.bos_token, tok.eos_token) == (BOS, EOS)
    assert len(tok.encode("Sorry", add_special_tokens=False)) == 1
    ids = tok("[INST] How do I bake bread? [\\INST]").input_ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "[INST] How do I bake bread? [\\INST]"
    # Llama-3's 256 special tokens sit after the vocabulary, in Llama-3's order.
    v = len(tok)
    assert tok.convert_tokens_to_ids([BOS, EOS, "<|start_header_id|>", "<|eot_id|>"]) == [v - 256, v - 255, v - 250, v - 247]
    assert tok.convert_tokens_to_ids("<|reserved_special_token_250|>") == v - 1
    assert v > 4000 and AutoConfig.from_pretrained(path).vocab_size == v


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def twin_env(tmp_path_factory):
    """One model cache for every twin (the stand-in is built once)."""
    cache = tmp_path_factory.mktemp("twin_cache")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(DERTA_CACHE=str(cache), PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    return env


def _run_job(job: str, directory: Path, env: dict[str, str], *sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(JOBS / f"{job}.py"), "--twin", str(directory), "--set", "storage.run_name=twin", *sets]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=directory, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def _runs(tracking_uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def _check_training_run(run: Path, cfg, runs) -> None:
    for rel in ("config.yaml", "data/manifest.json", "model/config.json", "eval/generations.jsonl",
                "eval/metrics.json", "report.html"):
        assert (run / rel).exists(), rel
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["template"] == cfg.data.template and saved["model"]["name_or_path"] == cfg.model.name_or_path
    manifest = json.loads((run / "data/manifest.json").read_text())
    assert manifest["counts"]["rto"] > 0 and manifest["counts"]["prefix"] > 0 and manifest["counts"]["helpful"] > 0
    metrics = json.loads((run / "eval/metrics.json").read_text())
    assert set(cfg.eval.attacks) <= set(metrics["asr"])
    rows = [json.loads(line) for line in (run / "eval/generations.jsonl").read_text().splitlines()]
    assert {r["attack"] for r in rows} == set(cfg.eval.attacks) | set(cfg.eval.helpfulness)  # every prompt judged
    assert set(cfg.eval.helpfulness) <= set(metrics["helpfulness"])
    parent = runs["twin"].info.run_id
    for stage in ("data", "train", "eval"):
        assert runs[stage].data.tags["mlflow.parentRunId"] == parent
    assert "loss" in runs["train"].data.metrics


@pytest.mark.slow
def test_derta_8b_twin(tmp_path, twin_env):
    _run_job("derta_8b", tmp_path, twin_env)
    cfg = cpu_twin(_config("derta_8b"), tmp_path / "again")
    _check_training_run(tmp_path / "runs" / "twin", cfg, _runs(f"sqlite:///{tmp_path}/runs/mlflow.db", "derta-8b"))


@pytest.mark.slow
def test_derta_70b_twin_on_s3_with_a_tracking_server(tmp_path, twin_env, s3_bucket, mlflow_server):
    """LoRA r=96 over FSDP2, storage on the loopback S3 server, MLflow on a tracking server."""
    env = {**twin_env, **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")}}
    _run_job("derta_70b", tmp_path, env, f"storage.root={s3_bucket}/runs", f"tracking.uri={mlflow_server}")
    from derta import storage

    local = Path(storage.local_copy(f"{s3_bucket}/runs/twin"))
    cfg = cpu_twin(_config("derta_70b"), tmp_path / "again")
    _check_training_run(local, cfg, _runs(mlflow_server, "derta-70b"))


@pytest.mark.slow
def test_eval_attacks_twin(tmp_path, twin_env):
    _run_job("eval_attacks", tmp_path, twin_env)
    run = tmp_path / "runs" / "twin"
    metrics = json.loads((run / "eval/metrics.json").read_text())
    cfg = _config("eval_attacks")
    assert set(cfg.eval.attacks) <= set(metrics["asr"])
    assert {"gsm8k", "mmlu"} <= set(metrics["helpfulness"])


@pytest.mark.slow
def test_generate_responses_twin(tmp_path, twin_env):
    _run_job("generate_responses", tmp_path, twin_env)
    run = tmp_path / "runs" / "twin"
    generated = list((run / "data" / "generated").rglob("*.parquet"))
    assert generated, "the completed triples are written"
    manifest = json.loads((run / "data/manifest.json").read_text())
    assert manifest["num_samples"] > 0


@pytest.mark.slow
def test_tune_prefix_twin(tmp_path, twin_env):
    proc = _run_job("tune_prefix", tmp_path, twin_env)
    assert "best" in proc.stdout.lower()
    runs = _runs(f"sqlite:///{tmp_path}/runs/mlflow.db", "derta-tune")
    trials = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId")]
    assert len(trials) >= 2
