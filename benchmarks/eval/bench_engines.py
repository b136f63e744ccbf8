"""Generation throughput of the eval engines.

CPU: the HF engine batched (left-padded, eval.batch_size) vs one request at a time, in the same
run on the same prompts. GPU (when a CUDA GPU is present): HF vs vLLM on the same prompts.

    python benchmarks/eval/bench_engines.py [--model builtin:tiny] [--n 64] [--max-new-tokens 32]
                                            [--batch-size 16] [--threads N]

Prints one JSON object per measurement; record results in benchmarks/eval/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time

import torch

from derta.demo import safety_triples
from derta.eval.engines import EngineSpec, GenRequest, HFEngine


def requests(n: int, max_new: int) -> list[GenRequest]:
    qs = [t.query for t in safety_triples("heldout")] * (n // 80 + 1)
    return [GenRequest(messages=[{"role": "user", "content": q}], max_new_tokens=max_new) for q in qs[:n]]


def timed(name: str, fn, reqs: list[GenRequest], engine) -> dict:
    fn(reqs[:2])  # warm-up
    before = engine.tokens_generated
    t = time.perf_counter()
    fn(reqs)
    dt = time.perf_counter() - t
    new_tokens = engine.tokens_generated - before
    return {"engine": name, "n": len(reqs), "seconds": round(dt, 3), "generations_per_s": round(len(reqs) / dt, 2),
            "new_tokens_per_s": round(new_tokens / dt, 1)}


def median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {**ordered[len(ordered) // 2], "repeats": len(runs), "all_seconds": [r["seconds"] for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    reqs = requests(a.n, a.max_new_tokens)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    hf = HFEngine(EngineSpec(model=a.model, batch_size=a.batch_size))
    # Interleaved repeats (batched, single, batched, ...) so machine-load drift hits both alike.
    runs: dict[str, list[dict]] = {"batched": [], "single": []}
    for _ in range(a.repeats):
        runs["batched"].append(timed(f"hf-cpu batched (bs={a.batch_size})", hf.generate, reqs, hf))
        runs["single"].append(timed("hf-cpu one-at-a-time", lambda rs: [hf.generate([r])[0] for r in rs], reqs, hf))
    results = [median_run(runs["batched"]), median_run(runs["single"])]
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        hg = HFEngine(EngineSpec(model=a.model, batch_size=a.batch_size, use_gpu=True))
        results.append(timed(f"hf-gpu batched (bs={a.batch_size})", hg.generate, reqs, hg))
        del hg
        if importlib.util.find_spec("vllm") is not None:
            from derta.eval.engines import VLLMEngine

            v = VLLMEngine(EngineSpec(model=a.model, kind="vllm", use_gpu=True, gpu_memory_utilization=0.5))
            results.append(timed("vllm-gpu", v.generate, reqs, v))
    for r in results:
        print(json.dumps({**r, "model": a.model, "max_new_tokens": a.max_new_tokens, **env}))
    if len(results) >= 2:
        print(json.dumps({"speedup_batched_vs_single_cpu": round(results[1]["seconds"] / results[0]["seconds"], 2)}))


if __name__ == "__main__":
    main()
