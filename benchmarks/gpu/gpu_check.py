"""The one prepared GPU check (run it with benchmarks/gpu/run.sh; see README.md here).

GPU mode, in order, each part timed and recorded even when another fails:
  model     a random-init ~0.6B Llama (derta's demo tokenizer, so the demo data and templates fit)
  train     data build + a bf16 FSDP2 training run of it through derta's Ray Train stage:
            tokens/s and MFU of the last logged step (derta.train.loop's own numbers)
  parity    greedy vLLM vs HF on the SAME token ids (derta-rendered prefill prompts) on the trained
            model; rule stated before the run: first new token equal on >= 98 % of prompts and the
            common prefix >= 80 % of max_new_tokens on average; the control (each HF output paired
            with another prompt's vLLM output) must FAIL the rule, so the measure can fail
  speed     generations/s and new tokens/s of both engines on those prompts
  eval      `derta eval` end to end with eval.engine=vllm, i.e. through ray.data.llm (a subprocess,
            as a user runs it): metrics.json's ASR, failed_rows, too_long
Dry mode (no GPU, or --dry): the same JSON with no GPU part run: the configs are built and
validated (the training config through preflight, the vLLM processor config through Ray's
pydantic model), the HF side generates on the tiny model, and the JSON is checked against SCHEMA.
Exit 0 when the JSON is valid and no part failed; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "platform"))

# ~0.6B parameters: 24 x (attention 6.3M + MLP 18.9M) + embeddings; head_dim 128 (flash kernels)
GPU_MODEL = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=12,
                 num_key_value_heads=4, max_position_embeddings=2048)
PARITY_RULE = {"first_token_agree_min": 0.98, "common_prefix_frac_min": 0.8}
STATUS = ("ok", "skipped", "failed")
SCHEMA: dict[str, Any] = {  # key -> type, or a nested schema; every part has status + seconds
    "mode": str, "started_utc": str, "device": str, "vllm_version": (str, type(None)),
    "parts": {
        "model": {"status": str, "seconds": float, "params": int},
        "configs": {"status": str, "seconds": float, "processor_config": dict, "train_config_ok": bool},
        "train": {"status": str, "seconds": float},
        "hf_generate": {"status": str, "seconds": float},
        "vllm_generate": {"status": str, "seconds": float},
        "parity": {"status": str, "seconds": float},
        "eval": {"status": str, "seconds": float},
    },
}


def validate(doc: Any, schema: Any = SCHEMA, where: str = "$") -> list[str]:
    """Problems of `doc` against SCHEMA (missing keys, wrong types, unknown status)."""
    if isinstance(schema, dict):
        if not isinstance(doc, dict):
            return [f"{where}: expected an object"]
        out = []
        for k, sub in schema.items():
            if k not in doc:
                out.append(f"{where}.{k}: missing")
            else:
                out += validate(doc[k], sub, f"{where}.{k}")
        if where.count(".") == 2 and doc.get("status") not in STATUS:
            out.append(f"{where}.status: {doc.get('status')!r} not one of {STATUS}")
        return out
    types = schema if isinstance(schema, tuple) else (schema,)
    if float in types and isinstance(doc, int) and not isinstance(doc, bool):
        return []
    return [] if isinstance(doc, types) else [f"{where}: expected {types}, got {type(doc).__name__}"]


def part(name: str, parts: dict[str, Any], fn: Callable[[], dict[str, Any]], skip: str | None = None) -> dict[str, Any]:
    """Run one part; record ok / skipped / failed with its seconds, never raising."""
    t0 = time.perf_counter()
    if skip:
        parts[name] = {"status": "skipped", "reason": skip, "seconds": 0.0}
        return parts[name]
    try:
        parts[name] = {"status": "ok", **fn()}
    except Exception as e:  # noqa: BLE001 - the JSON must say what failed
        parts[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
    parts[name]["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"[gpu_check] {name}: {parts[name]['status']} ({parts[name]['seconds']} s)", flush=True)
    return parts[name]


# --------------------------------------------------------------------------- parts
def build_model(work: Path, dry: bool) -> tuple[str, int]:
    from derta.models import TinySpec, build_tiny_model, resolve_model_path

    path = resolve_model_path("builtin:tiny") if dry else str(build_tiny_model(work / "model-0.6b", TinySpec(**GPU_MODEL)))
    from safetensors import safe_open

    n = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(_numel(st.get_slice(k).get_shape()) for k in st.keys())
    return path, n


def _numel(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def train_overrides(model: str, work: Path, dry: bool) -> list[str]:
    sets = [f"model.name_or_path={model}", f"storage.root={work / 'runs'}", "storage.run_name=gpucheck",
            "train.epochs=1", "eval.limit=40", "eval.max_new_tokens=32", "eval.prefill_k=[0,5,10]",
            "eval.helpfulness=[demo]", "tracking.enabled=false"]
    if not dry:
        sets += ["model.dtype=bf16", "train.use_gpu=true", "train.workers=1", "train.max_steps=30",
                 "train.global_batch=64", "train.micro_batch=16", "train.lr=1e-4", "eval.engine=vllm",
                 "eval.batch_size=64", "eval.max_model_len=2048", "eval.gpu_memory_utilization=0.4"]
    return sets


def configs(model: str, work: Path, dry: bool) -> dict[str, Any]:
    from derta import preflight
    from derta.config import load_config
    from derta.eval import ray_llm
    from derta.eval.engines import EngineSpec

    cfg = load_config(None, train_overrides(model, work, dry))
    preflight.check(cfg, ("train", "eval"), planning=True)
    # the GPU parts' entry points exist (a dry run catches a renamed import before a GPU session)
    from derta.cluster import ensure_ray  # noqa: F401
    from derta.pipeline import build_data, run_paths  # noqa: F401
    from derta.train.trainer import train as _train  # noqa: F401
    spec = EngineSpec(model=model, kind="vllm", use_gpu=True, dtype="bf16", batch_size=cfg.eval.batch_size,
                      max_model_len=cfg.eval.max_model_len or 2048, gpu_memory_utilization=cfg.eval.gpu_memory_utilization)
    pc = ray_llm.processor_config(spec, num_actors=cfg.eval.num_actors, continue_on_error=cfg.eval.continue_on_error)
    return {"processor_config": pc.model_dump(mode="json"), "train_config_ok": True}


def train(model: str, work: Path) -> dict[str, Any]:
    from derta.cluster import ensure_ray
    from derta.config import load_config
    from derta.pipeline import build_data, run_paths
    from derta.train.trainer import train as run_train

    cfg = load_config(None, train_overrides(model, work, False))
    ensure_ray(cfg)
    build_data(cfg)
    res = run_train(cfg, run_paths(cfg), None)
    m = res.final_metrics or {}
    return {"steps": res.steps, "tokens_per_s": m.get("tokens_per_s"), "mfu": m.get("mfu"), "loss": m.get("loss"),
            "model_dir": str(res.model_dir)}


def prompts(model: str, n: int) -> list[list[int]]:
    """Derta-rendered prefill-attack prompts (token ids) of the demo's held-out questions."""
    from derta.config import load_config
    from derta.eval.attacks import load_questions, prefill
    from derta.eval.engines import load_eval_tokenizer, render_prompt_ids
    from derta.prompts import eval_renderer

    cfg = load_config(None, [f"model.name_or_path={model}", "eval.prefill_k=[0,5,10,20]"])
    tok = load_eval_tokenizer(model)
    items = prefill.build(load_questions(cfg.eval.questions), cfg.eval, eval_renderer(cfg, tok))
    return [render_prompt_ids(tok, it.request) for it in items][:n]


def hf_generate(model: str, ids: list[list[int]], max_new: int, batch: int, gpu: bool) -> dict[str, Any]:
    import torch

    from derta.eval.engines import EngineSpec, HFEngine

    eng = HFEngine(EngineSpec(model=model, dtype="bf16" if gpu else "float32", use_gpu=gpu, batch_size=batch))
    out: list[list[int]] = []
    t0 = time.perf_counter()
    for s in range(0, len(ids), batch):
        chunk = ids[s : s + batch]
        width = max(len(p) for p in chunk)
        x = torch.full((len(chunk), width), eng.pad_id)
        mask = torch.zeros_like(x)
        for r, p in enumerate(chunk):
            x[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
        with torch.inference_mode():
            g = eng.model.generate(input_ids=x.to(eng.device), attention_mask=mask.to(eng.device), max_new_tokens=max_new,
                                   do_sample=False, eos_token_id=eng.stop_ids, pad_token_id=eng.pad_id, temperature=None,
                                   top_p=None, top_k=None)
        for row in g[:, width:].tolist():
            cut = next((k for k, t in enumerate(row) if t in eng.stop_ids), len(row))
            out.append(row[:cut])
    dt = time.perf_counter() - t0
    return {"n": len(ids), "max_new_tokens": max_new, "batch_size": batch, "gen_seconds": round(dt, 3),
            "gen_per_s": round(len(ids) / dt, 2), "new_tokens_per_s": round(sum(map(len, out)) / dt, 1), "_ids": out}


def vllm_generate(model: str, ids: list[list[int]], max_new: int) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from derta.eval.engines import load_eval_tokenizer, stop_token_ids

    llm = LLM(model=model, dtype="bfloat16", seed=0, gpu_memory_utilization=0.3, enforce_eager=True, max_model_len=2048)
    sp = SamplingParams(max_tokens=max_new, temperature=0.0, stop_token_ids=stop_token_ids(load_eval_tokenizer(model)))
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    got = [list(o.outputs[0].token_ids) for o in outs]
    stop = set(sp.stop_token_ids or [])
    got = [g[: next((k for k, t in enumerate(g) if t in stop), len(g))] for g in got]
    del llm
    return {"n": len(ids), "max_new_tokens": max_new, "gen_seconds": round(dt, 3), "gen_per_s": round(len(ids) / dt, 2),
            "new_tokens_per_s": round(sum(map(len, got)) / dt, 1), "_ids": got}


def parity(a: list[list[int]], b: list[list[int]], max_new: int) -> dict[str, Any]:
    """Agreement of two engines' greedy token ids on the same prompts (pure; PARITY_RULE)."""
    def common(x: list[int], y: list[int]) -> int:
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n

    n = len(a)
    first = sum(bool(x) and bool(y) and x[0] == y[0] or (not x and not y) for x, y in zip(a, b)) / max(1, n)
    frac = sum(min(1.0, common(x, y) / max(1, min(max_new, max(len(x), len(y)) or 1))) for x, y in zip(a, b)) / max(1, n)
    exact = sum(x == y for x, y in zip(a, b)) / max(1, n)
    ok = first >= PARITY_RULE["first_token_agree_min"] and frac >= PARITY_RULE["common_prefix_frac_min"]
    return {"n": n, "first_token_agree": round(first, 4), "common_prefix_frac": round(frac, 4),
            "exact_match": round(exact, 4), "passes": ok}


def derta_eval(model: str, work: Path) -> dict[str, Any]:
    """`derta eval` on the trained run (the same overrides, so the run resumes and its model/ is
    evaluated), eval.engine=vllm, i.e. through ray.data.llm, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "derta.cli", "eval", "--set", *train_overrides(model, work, False)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=float(os.environ.get("EVAL_TIMEOUT", 300)))
    metrics_file = work / "runs" / "gpucheck" / "eval" / "metrics.json"
    if p.returncode != 0 or not metrics_file.exists():
        raise RuntimeError(f"derta eval exit {p.returncode}: {(p.stdout + p.stderr)[-1500:]}")
    m = json.loads(metrics_file.read_text())
    return {"engine": m.get("engine"), "asr": m.get("asr"), "asr_by_k": m.get("asr_by_k"),
            "failed_rows": m.get("failed_rows"), "too_long": m.get("too_long"), "n": m.get("n")}


# --------------------------------------------------------------------------- main
def gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry", action="store_true", help="no GPU parts (automatic without a GPU)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--n", type=int, default=0, help="prompts for parity/speed (default 160 GPU, 8 dry)")
    args = ap.parse_args(argv)
    dry = args.dry or not gpu_present()
    work = Path(args.work or tempfile.mkdtemp(prefix="derta-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    n, max_new = (args.n or (8 if dry else 160)), (8 if dry else 32)
    try:
        import vllm  # noqa: F401

        vv: str | None = vllm.__version__
    except Exception:  # noqa: BLE001
        vv = None
    doc: dict[str, Any] = {"mode": "dry" if dry else "gpu", "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "device": _device(), "vllm_version": vv, "parity_rule": PARITY_RULE, "parts": {}}
    parts = doc["parts"]
    state: dict[str, Any] = {}

    def _model() -> dict[str, Any]:
        state["model"], params = build_model(work, dry)
        return {"params": params, "path": state["model"], "spec": {} if dry else GPU_MODEL}

    part("model", parts, _model)
    have_model = parts["model"]["status"] == "ok"
    part("configs", parts, lambda: configs(state["model"], work, dry), None if have_model else "no model")
    part("train", parts, lambda: train(state["model"], work), "dry mode" if dry else (None if have_model else "no model"))
    trained = parts["train"].get("model_dir") if parts["train"]["status"] == "ok" else state.get("model")
    part("hf_generate", parts, lambda: hf_generate(trained, prompts(trained, n), max_new, 64, not dry),
         None if trained else "no model")
    no_vllm = "dry mode" if dry else (None if vv else "vllm not importable (see run.sh's install step)")
    part("vllm_generate", parts, lambda: vllm_generate(trained, prompts(trained, n), max_new), no_vllm)

    def _parity() -> dict[str, Any]:
        a, b = parts["hf_generate"]["_ids"], parts["vllm_generate"]["_ids"]
        control = parity(a, b[1:] + b[:1], max_new)  # mismatched pairs: must fail the rule
        return {**parity(a, b, max_new), "control_mismatched": control, "model": "trained" if trained != state.get("model") else "random-init"}

    both = parts["hf_generate"]["status"] == "ok" and parts["vllm_generate"]["status"] == "ok"
    part("parity", parts, _parity, None if both else (no_vllm or "a generation part failed"))
    for k in ("hf_generate", "vllm_generate"):
        parts[k].pop("_ids", None)
    part("eval", parts, lambda: derta_eval(state["model"], work),
         no_vllm or (None if parts["train"]["status"] == "ok" else "no trained run"))
    problems = validate(doc)
    doc["schema_problems"] = problems
    tmp = f"{args.out}.tmp"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, args.out)
    failed = [k for k, v in parts.items() if v["status"] == "failed"]
    print(f"[gpu_check] wrote {args.out}; failed parts: {failed or 'none'}; schema problems: {problems or 'none'}")
    return 0 if not problems and not failed else 1


def _device() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
