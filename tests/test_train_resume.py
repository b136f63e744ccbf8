"""Fault tolerance of the training stage through real Ray Train (2 FSDP2 workers on gloo):
a worker SIGKILLed mid-run is replaced (FailureConfig), training resumes from the last
distributed checkpoint, which lives on a real S3-compatible server (moto on loopback), and
ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import os

import pytest
import torch
from _fixtures import ray_local, tiny_model_dir, tiny_tokenizer  # noqa: F401
from _train_rows import demo_samples, to_rows

pytestmark = pytest.mark.slow

MAX_LEN = 128
STEPS = 8  # 6 steps per epoch on these rows: the run crosses an epoch boundary
KILL_AT = 5  # after the checkpoint at step 4 was written


def _cfg(root: str, name: str, tiny_model_dir: str, **train):
    from derta.config import validate_config

    t = {"method": "derta", "max_steps": STEPS, "global_batch": 8, "micro_batch": 2, "lr": 2e-3, "warmup_ratio": 0.25,
         "checkpoint_every": 2, "log_every": 2, "workers": 2, "loss": {"rto_keep": 0.5}, **train}
    return validate_config({"model": {"name_or_path": tiny_model_dir}, "train": t, "data": {"max_len": MAX_LEN},
                            "storage": {"root": root, "run_name": name}})


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def test_killed_worker_resumes_from_s3_checkpoint_and_matches(ray_local, tiny_model_dir, tiny_tokenizer, s3_bucket,
                                                                tmp_path, monkeypatch):
    from derta import storage
    from derta.paths import RunPaths
    from derta.train.trainer import FAULT_ENV, train

    rows = to_rows(demo_samples(tiny_tokenizer, 24, 24), MAX_LEN, tiny_tokenizer.pad_token_id)
    ds = lambda: ray_local.data.from_items(rows)  # noqa: E731

    # Uninterrupted reference run, local storage.
    local_root = str(tmp_path / "runs")
    ref = train(_cfg(local_root, "ref", tiny_model_dir), RunPaths(local_root, "ref"), None, datasets={"train": ds()})
    assert ref.steps == STEPS

    # Same run on S3; rank 1 is SIGKILLed once after step KILL_AT.
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"{KILL_AT}:{marker}:1")
    s3_paths = RunPaths(s3_bucket, "faulty")
    res = train(_cfg(s3_bucket, "faulty", tiny_model_dir, max_failures=1), s3_paths, None, datasets={"train": ds()})
    assert marker.exists(), "the fault was never injected"
    assert res.steps == STEPS
    assert res.model_dir == s3_paths.model

    # Checkpoints went to S3 (both ranks' shards merged into one directory per step).
    ckpts = storage.list_files(s3_paths.checkpoints)
    assert any(f.endswith("__1_0.distcp") for f in ckpts) and any(f.endswith(".metadata") for f in ckpts)
    assert any("checkpoint_s0_00000008" in f for f in ckpts)

    local_copy = tmp_path / "faulty_model"
    storage.download_dir(s3_paths.model, local_copy)
    a, b = _weights(ref.model_dir), _weights(str(local_copy))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    # Same data order, same per-step seeds, same optimizer state: float32 on CPU replays
    # the same arithmetic, so the weights agree to rounding noise.
    assert worst < 1e-5, worst
    assert abs(ref.final_metrics["loss"] - res.final_metrics["loss"]) < 1e-4

    # The exported directory is a regular HF model.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(local_copy))
