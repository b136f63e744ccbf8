"""`train(cfg, paths, tracking)` through real Ray Train: 2 FSDP2 workers on gloo, a tiny
model, the demo data as hand-built training rows (tests/_train_rows.py).

RTO training raises the refusal token's probability at harmful-response positions and rank 0
logs to a real MLflow store; a worker SIGKILLed mid-run is replaced and the run resumes from
its S3 checkpoint (moto on loopback) to the same final weights; LoRA + the preference variant
on the sequential schedule trains and exports a merged HF model plus a peft adapter."""

from __future__ import annotations

import math

import pytest
import torch
from _fixtures import ray_local, tiny_model_dir, tiny_tokenizer  # noqa: F401
from _train_rows import demo_samples, sample, to_rows

pytestmark = pytest.mark.slow

MAX_LEN = 128
STEPS = 8  # 5 steps per epoch on the rto rows: the runs cross an epoch boundary
KILL_AT = 3  # resumes from the step-2 checkpoint, in the middle of an epoch


def _cfg(root: str, name: str, model: str, lora: dict | None = None, **train):
    from derta.config import validate_config

    t = {"max_steps": STEPS, "global_batch": 8, "micro_batch": 2, "lr": 3e-3, "warmup_ratio": 0.0, "log_every": 1,
         "workers": 2, **train}
    m = {"name_or_path": model, **({"lora": lora} if lora else {})}
    return validate_config({"model": m, "train": t, "data": {"max_len": MAX_LEN}, "storage": {"root": root, "run_name": name}})


def _heldout_refusal_logprob(model_dir: str, tokenizer) -> float:
    """Mean log P(refusal token | q, r̂<t) over every harmful-response position of held-out
    safety triples (topics never seen in training)."""
    from transformers import AutoModelForCausalLM

    from derta.demo import safety_triples
    from derta.models import refusal_token_id

    sorry = refusal_token_id(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vals = []
    with torch.no_grad():
        for s in safety_triples("heldout")[:12]:
            row = sample(tokenizer, "rto", s.query, s.harmful)
            ids = torch.tensor([row["input_ids"][:MAX_LEN]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            vals += [float(logp[t - 1, sorry]) for t, m in enumerate(row["rto_mask"][:MAX_LEN]) if m]
    return sum(vals) / len(vals)


@pytest.fixture(scope="module")
def rto_run(ray_local, tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """method rto on the demo rows, uninterrupted, local storage, logging to a real MLflow
    store; checkpoints every 2 steps. Also the reference for the resume test."""
    from derta.paths import RunPaths
    from derta.tracking import Tracker
    from derta.train.trainer import train

    rows = to_rows(demo_samples(tiny_tokenizer, 20, 20), MAX_LEN, tiny_tokenizer.pad_token_id, packing=True)
    root = str(tmp_path_factory.mktemp("rto") / "runs")
    paths = RunPaths(root, "rto")
    tracker = Tracker.for_root(root)
    with tracker.run("train") as run_id:
        handle = type("Handle", (), {"tracking_uri": tracker.tracking_uri, "experiment": tracker.experiment, "run_id": run_id})()
        res = train(_rto_cfg(root, "rto", tiny_model_dir), paths, handle, datasets={"train": ray_local.data.from_items(rows)})
    return {"result": res, "paths": paths, "rows": rows, "tracker": tracker, "run_id": run_id}


def _rto_cfg(root: str, name: str, model: str, **train):
    return _cfg(root, name, model, method="rto", checkpoint_every=2, loss={"rto_keep": 0.5}, **train)


def test_rto_training_raises_refusal_probability_and_logs_to_mlflow(rto_run, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    res, paths, tracker, run_id = rto_run["result"], rto_run["paths"], rto_run["tracker"], rto_run["run_id"]
    assert res.steps == STEPS and res.model_dir == paths.model
    AutoModelForCausalLM.from_pretrained(paths.model)  # a regular HF directory (+ tokenizer)
    before = _heldout_refusal_logprob(tiny_model_dir, tiny_tokenizer)
    after = _heldout_refusal_logprob(paths.model, tiny_tokenizer)
    assert after > before + 1.0, (before, after)  # clearly: e^1 ≈ 2.7x more probable

    # Rank 0 logged every step into the driver's run; both losses fell.
    hist = {k: [m.value for m in sorted(tracker.client.get_metric_history(run_id, k), key=lambda m: m.step)]
            for k in ("loss", "loss_mle", "loss_rto", "lr", "grad_norm", "tokens_per_s")}
    assert len(hist["loss"]) == STEPS
    assert hist["loss_rto"][-1] < hist["loss_rto"][0] - 1.0
    assert hist["loss_mle"][-1] < hist["loss_mle"][0]
    assert all(v > 0 for v in hist["tokens_per_s"])
    run = tracker.client.get_run(run_id)
    assert run.data.params["train.method"] == "rto" and run.data.params["trainer.stage0.steps"] == str(STEPS)
    assert run.data.tags["model_dir"] == paths.model


def test_killed_worker_resumes_from_s3_checkpoint_and_matches(rto_run, ray_local, tiny_model_dir, s3_bucket, tmp_path,
                                                                monkeypatch):
    """Rank 1 is SIGKILLed after step KILL_AT; Ray Train (FailureConfig) restarts the worker
    group, which resumes from the step-2 checkpoint on S3 (moto on loopback), skips the
    micro-batches already consumed and ends where the uninterrupted run ended."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from derta import storage
    from derta.paths import RunPaths
    from derta.train.trainer import FAULT_ENV, train

    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"{KILL_AT}:{marker}:1")
    paths = RunPaths(s3_bucket, "faulty")
    cfg = _rto_cfg(s3_bucket, "faulty", tiny_model_dir, max_failures=1)
    res = train(cfg, paths, None, datasets={"train": ray_local.data.from_items(rto_run["rows"])})
    assert marker.exists(), "the fault was never injected"
    ref = rto_run["result"]
    assert res.steps == ref.steps == STEPS and res.model_dir == paths.model

    # Checkpoints live on S3: both ranks' shards merged into one directory per step.
    ckpts = storage.list_files(paths.checkpoints)
    assert any(f.endswith("__1_0.distcp") for f in ckpts) and any(f.endswith(".metadata") for f in ckpts)
    assert any(f"checkpoint_s0_{STEPS:08d}" in f for f in ckpts)

    local = tmp_path / "faulty_model"
    storage.download_dir(paths.model, local)
    AutoModelForCausalLM.from_pretrained(str(local))
    a, b = load_file(f"{ref.model_dir}/model.safetensors"), load_file(f"{local}/model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    # Same data order, per-step seeds (RTO keep-rate) and optimizer state: float32 on CPU
    # replays the same arithmetic, so the weights agree to rounding noise.
    assert worst < 1e-5, worst
    assert abs(ref.final_metrics["loss"] - res.final_metrics["loss"]) < 1e-4


def test_lora_preference_sequential_trains_and_exports_merged_model_and_adapter(ray_local, tiny_model_dir, tiny_tokenizer,
                                                                                  tmp_path):
    """LoRA on FSDP2 with activation checkpointing, the sequential schedule (an MLE stage on
    helpful rows, then the per-position preference stage on rto rows) in one worker group."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from derta.paths import RunPaths
    from derta.train.trainer import train

    pad = tiny_tokenizer.pad_token_id
    mle_rows = to_rows(demo_samples(tiny_tokenizer, 16, 0), MAX_LEN, pad)
    pref_rows = to_rows(demo_samples(tiny_tokenizer, 0, 16), MAX_LEN, pad)
    root = str(tmp_path / "runs")
    cfg = _cfg(root, "lora", tiny_model_dir, lora={"r": 8, "alpha": 16, "dropout": 0.0}, method="derta_pref",
               schedule="sequential", max_steps=4, lr=1e-2, loss={"beta": 0.5},
               fsdp={"activation_checkpointing": True})
    paths = RunPaths(root, "lora")
    res = train(cfg, paths, None, datasets={"train": ray_local.data.from_items(mle_rows),
                                            "train_transition": ray_local.data.from_items(pref_rows)})
    assert res.steps == 8  # 4 per stage
    # The reference is the base model (adapters off): the loss starts at log 2 and falls.
    assert res.final_metrics["loss_pref"] < math.log(2.0) - 0.05, res.final_metrics
    assert res.final_metrics["stage"] == 1.0

    merged = AutoModelForCausalLM.from_pretrained(paths.model, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, f"{paths.model}/adapter").eval()
    ids = torch.tensor([pref_rows[0]["input_ids"][:64]])
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)  # merged weights == base + adapter
    assert not torch.allclose(a, plain, atol=1e-3)  # and training changed something


def test_global_batch_counts_samples_on_packed_rows(ray_local, tiny_tokenizer):
    """Packed demo rows through the trainer's layout: 40 samples in batches of 8 are 5 steps
    per epoch (ceil(N / B)), each step's rows, over both workers, hold 8 samples."""
    import numpy as np

    from derta.data.pipeline import step_datasets
    from derta.data.tokenize import unpack_rows

    rows = to_rows(demo_samples(tiny_tokenizer, 20, 20), 512, tiny_tokenizer.pad_token_id, packing=True)
    as_arrays = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    assert len(unpack_rows(as_arrays)) == 40 and len(rows) < 20  # packed: fewer rows than samples
    lay = step_datasets(ray_local.data.from_items(rows), 8, 2, 2, packing=True)
    assert lay["samples"] == 40 and len(lay["rows_per_step"]) == 5 and lay["rows"] < 40
    shards = [{k: np.stack([r[k] for r in ds.take_all()]) for k in rows[0]} for ds in lay["datasets"]]
    assert [len(s["input_ids"]) for s in shards] == [lay["rows"] // 2] * 2
    start = 0
    for r in lay["rows_per_step"]:  # each worker holds r / 2 rows of every step, in step order
        lo, hi = start // 2, (start + r) // 2
        n = sum(len(unpack_rows({k: v[lo:hi] for k, v in s.items()})) for s in shards)
        assert n == 8
        start += r
