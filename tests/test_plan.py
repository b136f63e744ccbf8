"""`--plan` estimates against hand calculations, and the fit check's exit codes.

The shapes are Meta's published Llama-3 configs, written here as config.json only (nothing is
downloaded; derta.plan builds the model on the meta device). Hand calculation, bytes per GPU
(the formula of derta/plan.py's docstring), N workers, P params, L layers, h hidden, h_kv = 1024
(8 KV heads x 128), i intermediate, V = 128256, b micro-batch, s max_len, bf16 compute (2 bytes),
fp32 master weights on GPU with FSDP mixed precision (m = 4):

  P_layer = 2h² + 2·h·h_kv + 3·h·i + 2h            (q, o; k, v; gate, up, down; 2 RMSNorms)
  P       = L·P_layer + 2·V·h + h                  (untied embeddings + lm_head, final norm)
  full FT weights 4P/N, grads 4P/N, AdamW 8P/N, unsharded grads 2·(P_layer + P_root)
  LoRA    weights 4P/N + 4A/N, grads 4A/N, AdamW 8A/N,
          A = r · L · Σ(in + out) over q, k, v, o, gate, up, down
  gathered 2·(2·P_layer + P_root); activations with checkpointing 2·b·s·h·L + 2·b·s·(6h + 2·h_kv + 4i);
  loss chunk 2·4·1024·V; total = sum · 1.1
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from derta.config import load_config
from derta.plan import GiB, data_counts, estimate_eval, estimate_memory, make_plan, model_shape, optimizer_steps, print_plan

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
V = 128256
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, str]:
    """Llama-3-8B and -70B as config.json-only directories (the published shapes)."""
    from transformers import LlamaConfig

    out = {}
    for name, dims in SHAPES.items():
        path = tmp_path_factory.mktemp(name)
        LlamaConfig(num_key_value_heads=8, vocab_size=V, max_position_embeddings=8192, rope_theta=500000.0,
                    tie_word_embeddings=False, **dims).save_pretrained(path)
        assert sorted(os.listdir(path)) == ["config.json"]
        out[name] = str(path)
    return out


def job_config(name: str, *overrides: str):
    return load_config(JOBS / "configs" / f"{name}.yaml", list(overrides))


def test_llama3_8b_full_finetuning_on_8_gpus(shapes):
    cfg = job_config("derta_8b", f"model.name_or_path={shapes['llama3-8b']}")
    N, L, h, h_kv, i, b, s = 8, 32, 4096, 1024, 14336, 4, 1024
    assert (cfg.train.workers, cfg.train.micro_batch, cfg.data.max_len, cfg.model.lora) == (N, b, s, None)
    assert cfg.train.fsdp.activation_checkpointing and cfg.train.use_gpu

    shape = model_shape(cfg)
    P_layer = 2 * h * h + 2 * h * h_kv + 3 * h * i + 2 * h
    assert P_layer == 218_112_000
    assert shape.params == L * P_layer + 2 * V * h + h == 8_030_261_248
    assert (shape.layers, shape.hidden, shape.vocab, shape.intermediate, shape.kv_dim) == (L, h, V, i, h_kv)
    P_root = shape.params - L * P_layer
    assert shape.layer_params == P_layer and shape.root_params == P_root == 2 * V * h + h

    est = estimate_memory(shape, cfg)
    P = 8_030_261_248
    assert est.weights == 4 * P / N == 4_015_130_624
    assert est.grads == 4 * P / N
    assert est.optimizer == 8 * P / N == 8_030_261_248
    assert est.reference == 0
    assert est.gathered == 2 * (2 * P_layer + P_root)
    assert est.unsharded_grads == 2 * (P_layer + P_root)
    a = 6 * h + 2 * h_kv + 4 * i
    assert a == 83_968
    assert est.activations == 2 * b * s * h * L + 2 * b * s * a
    assert est.logits == 2 * 4 * 1024 * V
    total = (4 * P / N + 4 * P / N + 8 * P / N + 2 * (2 * P_layer + P_root) + 2 * (P_layer + P_root)
             + 2 * b * s * h * L + 2 * b * s * a + 8 * 1024 * V) * 1.1
    assert est.total == pytest.approx(total, rel=1e-12)
    assert 20 * GiB < est.total < 30 * GiB  # ~24 GiB: fits an 80 GB H100 comfortably

    plan = make_plan(cfg, shape=shape)
    assert plan.fits, plan.problems
    r = plan.resources
    assert (r.train_gpus, r.train_cpus, r.gpu_nodes) == (8, 64, 1)
    assert r.eval_gpus == cfg.eval.num_actors * cfg.eval.tensor_parallel + 1 <= 8  # engines + LLM judge

    # Without activation checkpointing every layer keeps its activations: L·2·b·s·a.
    no_ac = job_config("derta_8b", f"model.name_or_path={shapes['llama3-8b']}", "train.fsdp.activation_checkpointing=false")
    assert estimate_memory(shape, no_ac).activations == L * 2 * b * s * a


def test_llama3_70b_lora_on_16_gpus(shapes):
    cfg = job_config("derta_70b", f"model.name_or_path={shapes['llama3-70b']}")
    N, L, h, h_kv, i, b, s, r = 16, 80, 8192, 1024, 28672, 2, 512, 96
    lora = cfg.model.lora
    assert (cfg.train.workers, cfg.train.micro_batch, cfg.data.max_len) == (N, b, s)
    assert (lora.r, lora.alpha, lora.dropout) == (r, 16, 0.05)

    shape = model_shape(cfg)
    P_layer = 2 * h * h + 2 * h * h_kv + 3 * h * i + 2 * h
    P = L * P_layer + 2 * V * h + h
    assert shape.params == P == 70_553_706_496
    # (in + out) of q, k, v, o, gate, up, down
    per_layer = (h + h) + (h + h_kv) + (h + h_kv) + (h + h) + (h + i) + (h + i) + (i + h)
    A = r * per_layer * L
    assert shape.lora_params == A == 1_242_562_560

    est = estimate_memory(shape, cfg)
    assert est.weights == 4 * P / N + 4 * A / N
    assert est.grads == 4 * A / N
    assert est.optimizer == 8 * A / N
    assert est.unsharded_grads == 0 and est.reference == 0
    P_root = P - L * P_layer
    assert est.gathered == 2 * (2 * P_layer + P_root)
    a = 6 * h + 2 * h_kv + 4 * i
    assert est.activations == 2 * b * s * h * L + 2 * b * s * a
    assert est.logits == 8 * min(1024, b * s) * V
    total = (4 * P / N + 16 * A / N + 2 * (2 * P_layer + P_root) + 2 * b * s * h * L + 2 * b * s * a
             + 8 * 1024 * V) * 1.1
    assert est.total == pytest.approx(total, rel=1e-12)
    assert est.total < 80 * GiB

    plan = make_plan(cfg, shape=shape)
    assert plan.fits, plan.problems
    assert (plan.resources.train_gpus, plan.resources.gpu_nodes) == (16, 2)
    # vLLM: 70B bf16 over 4 GPUs, KV cache 2·L·h_kv·2 bytes per token.
    ev = estimate_eval(shape, cfg)
    assert ev.weights == 2 * P / 4
    assert ev.kv_cache == 2 * L * h_kv * 2 * (s + cfg.eval.max_new_tokens) * cfg.eval.batch_size / 4

    # The same model with full fine-tuning on one 8-GPU node cannot fit: 16P/8 alone is 131 GiB.
    full = job_config("derta_70b", f"model.name_or_path={shapes['llama3-70b']}", "model.lora=null", "train.workers=8")
    plan = make_plan(full, shape=model_shape(full))
    assert not plan.fits and "training needs" in plan.problems[0]
    assert plan.train.weights + plan.train.grads + plan.train.optimizer == 16 * P / 8


def test_eval_that_cannot_fit_and_tensor_parallel_across_nodes(shapes):
    cfg = job_config("eval_attacks", f"model.name_or_path={shapes['llama3-70b']}")
    plan = make_plan(cfg, ("eval",))
    assert not plan.fits and "inference engine needs" in plan.problems[0]  # 132 GiB of weights on one GPU
    assert plan.train is None
    wide = job_config("eval_attacks", f"model.name_or_path={shapes['llama3-70b']}", "eval.tensor_parallel=16")
    assert any("spans more than one" in p for p in make_plan(wide, ("eval",)).problems)


def test_recipes_build_the_public_counts_from_the_same_triples(shapes, tmp_path, capsys):
    """The public code: every helpful pair + 3K RTO + 3K harmful-prefix samples from the SAME 3K
    triples (here 300 triples, 500 helpful pairs); no held-out split eats into them."""
    import json

    from derta.data.plan import local_plan

    safety, helpful = tmp_path / "safety.jsonl", tmp_path / "helpful.jsonl"
    safety.write_text("".join(json.dumps({"query": f"How do I do bad thing {i}?", "safe": "Sorry, I can't help.",
                                          "harmful": f"Step one of bad thing {i} is easy"}) + "\n" for i in range(300)))
    helpful.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "output": f"{i + 1}"}) + "\n" for i in range(500)))
    data = (f"data.safety.uri={safety}", f"data.helpful.uri={helpful}")
    for job in ("derta_8b", "derta_70b"):
        cfg = job_config(job, *data)
        assert (cfg.data.mix.preset, cfg.data.mix.triples, cfg.data.holdout) == ("derta", "shared", 0)
        assert data_counts(cfg).samples == {"rto": 300, "prefix": 300, "helpful": 500}
        kinds = local_plan(cfg).roles["safety"].kinds
        assert all(kinds.kinds_at(rank) == ["rto", "prefix"] for rank in range(300))  # same triples
    assert optimizer_steps(1100, cfg) == (9, 18)  # ceil(1100 / 128) per epoch, 2 epochs
    # the comparison setting (equal safety budgets per method) splits the triples; a holdout takes rows
    assert data_counts(job_config("derta_8b", *data, "data.mix.triples=disjoint")).samples == {
        "rto": 150, "prefix": 150, "helpful": 500}
    held = data_counts(job_config("derta_8b", *data, "data.holdout=0.1")).samples
    assert held["rto"] == held["prefix"] < 300 and held["helpful"] == 500
    # sources not readable here (the shipped s3:// placeholders): the formula
    lines = data_counts(job_config("derta_8b")).lines
    assert data_counts(job_config("derta_8b")).samples is None and "rto = 1.0 x N, prefix = 1.0 x N, helpful = 1.0 x M" in lines
    assert print_plan(job_config("derta_8b", *data, f"model.name_or_path={shapes['llama3-8b']}"), show_config=False)
    out = " ".join(capsys.readouterr().out.split())
    assert "samples: 300 rto + 300 prefix + 500 helpful = 1100; optimizer steps: ceil(1100 / global batch 128) = 9 per epoch, 18 in all" in out


def test_cpu_runs_are_not_checked_against_gpu_memory(shapes, capsys):
    cfg = job_config("derta_8b", f"model.name_or_path={shapes['llama3-8b']}", "train.use_gpu=false",
                     "eval.engine=hf", "train.gpu_memory_gb=1")
    assert print_plan(cfg) is True
    out = capsys.readouterr().out
    assert "plan fits" in out and "optimizer" in out and "no GPU" in out


def _job(name: str, *sets: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:9"}  # anything that tried Ray would fail
    return subprocess.Popen([sys.executable, str(JOBS / f"{name}.py"), "--plan", "--set", *sets], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_plan_exit_codes_from_the_jobs(shapes):
    """Exit 1 for 70B full fine-tuning on 8 x 80 GB, 0 for the 8B job as shipped, 2 for bad config."""
    procs = {
        "70b_full_8gpu": _job("derta_70b", f"model.name_or_path={shapes['llama3-70b']}", "model.lora=null", "train.workers=8"),
        "8b": _job("derta_8b", f"model.name_or_path={shapes['llama3-8b']}"),
        "bad": _job("derta_8b", "train.workers=0"),
    }
    out = {k: p.communicate(timeout=300)[0] for k, p in procs.items()}
    rc = {k: p.returncode for k, p in procs.items()}
    assert rc["70b_full_8gpu"] == 1, out["70b_full_8gpu"][-3000:]
    assert "does not fit" in out["70b_full_8gpu"] and "nothing was requested from Ray" in out["70b_full_8gpu"]
    assert rc["8b"] == 0, out["8b"][-3000:]
    assert "plan fits" in out["8b"] and "8 GPU" in out["8b"] and "optimizer" in out["8b"]
    assert "triples shared" in out["8b"] and "optimizer steps: ceil(samples / global batch 128)" in out["8b"]
    assert rc["bad"] == 2 and "train.workers" in out["bad"]


def test_shape_of_an_s3_model_reads_config_json_only(shapes, s3_bucket, monkeypatch):
    """A model on S3 is sized from its config.json: the weights next to it are never fetched."""
    from derta import storage

    uri = f"{s3_bucket}/models/llama3-8b"
    storage.write_text(storage.join(uri, "config.json"), (Path(shapes["llama3-8b"]) / "config.json").read_text())
    storage.write_text(storage.join(uri, "model-00001-of-00004.safetensors"), "not weights")

    def no_download(*args, **kwargs):
        raise AssertionError("plan must not download the model")

    monkeypatch.setattr(storage, "local_copy", no_download)
    monkeypatch.setattr(storage, "download_dir", no_download)
    cfg = job_config("derta_8b", f"model.name_or_path={uri}")
    assert model_shape(cfg).params == 8_030_261_248
