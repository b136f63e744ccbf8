"""`train(cfg, paths, tracking)` through real Ray Train: 2 FSDP2 workers on gloo, a tiny
model, the demo data as hand-built training rows. RTO training must raise the refusal
token's probability at harmful-response positions; LoRA + the preference variant must train
and export a merged HF model plus a peft adapter; rank 0 logs to a real MLflow store."""

from __future__ import annotations

import math

import pytest
import torch
from _fixtures import ray_local, tiny_model_dir, tiny_tokenizer  # noqa: F401
from _train_rows import demo_samples, sample, to_rows

pytestmark = pytest.mark.slow

MAX_LEN = 128


def _cfg(root: str, name: str, model: str, lora: dict | None = None, **train):
    from derta.config import validate_config

    t = {"max_steps": 8, "global_batch": 8, "micro_batch": 2, "lr": 3e-3, "warmup_ratio": 0.0, "log_every": 1,
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


def test_rto_training_raises_refusal_probability_and_logs_to_mlflow(ray_local, tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from derta.paths import RunPaths
    from derta.tracking import Tracker
    from derta.train.trainer import train

    rows = to_rows(demo_samples(tiny_tokenizer, 20, 20), MAX_LEN, tiny_tokenizer.pad_token_id, packing=True)
    root = str(tmp_path / "runs")
    cfg = _cfg(root, "rto", tiny_model_dir, method="rto")
    paths = RunPaths(root, "rto")
    tracker = Tracker.for_root(root)
    with tracker.run("train") as run_id:
        handle = type("Handle", (), {"tracking_uri": tracker.tracking_uri, "experiment": tracker.experiment, "run_id": run_id})()
        res = train(cfg, paths, handle, datasets={"train": ray_local.data.from_items(rows)})

    assert res.steps == 8 and res.model_dir == paths.model
    AutoModelForCausalLM.from_pretrained(paths.model)  # a regular HF directory (+ tokenizer)
    before = _heldout_refusal_logprob(tiny_model_dir, tiny_tokenizer)
    after = _heldout_refusal_logprob(paths.model, tiny_tokenizer)
    assert after > before + 1.0, (before, after)  # clearly: e^1 ≈ 2.7x more probable

    # Rank 0 logged every step into the driver's run; both losses fell.
    hist = {k: [m.value for m in sorted(tracker.client.get_metric_history(run_id, k), key=lambda m: m.step)]
            for k in ("loss", "loss_mle", "loss_rto", "lr", "grad_norm", "tokens_per_s")}
    assert len(hist["loss"]) == 8
    assert hist["loss_rto"][-1] < hist["loss_rto"][0] - 1.0
    assert hist["loss_mle"][-1] < hist["loss_mle"][0]
    assert all(v > 0 for v in hist["tokens_per_s"])
    params = tracker.client.get_run(run_id).data.params
    assert params["train.method"] == "rto" and params["trainer.stage0.steps"] == "8"
    assert tracker.client.get_run(run_id).data.tags["model_dir"] == paths.model


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
