"""Generation throughput of the eval engines.

CPU: the HF engine at several batch sizes (eval.batch_size: 1, 16, 64 by default) on the same
prompts in the same process, repeats interleaved (bs 1, 16, 64, bs 1, ...) so machine-load drift
hits every batch size alike; the median per batch size and its ratio to batch size 1 are printed.
GPU (when a CUDA GPU is present): the HF engine and vLLM on the same prompts (the fuller GPU
check is benchmarks/gpu/run.sh).

    python benchmarks/eval/bench_engines.py [--model builtin:tiny] [--n 64] [--max-new-tokens 32]
                                            [--batch-sizes 1,16,64] [--repeats 3] [--threads N]

Prompts: the held-out demo questions rendered with the model's chat template by derta's renderer
(token ids, as eval feeds them). Prints one JSON object per measurement; record results in
benchmarks/eval/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import time

import torch

from derta.demo import safety_triples
from derta.eval.engines import EngineSpec, GenRequest, HFEngine, load_eval_tokenizer
from derta.prompts import Renderer


def requests(model: str, n: int, max_new: int) -> list[GenRequest]:
    r = Renderer.make("chat_template", load_eval_tokenizer(model), "bench")
    qs = [t.query for t in safety_triples("heldout")] * (n // 80 + 1)
    return [GenRequest(prompt_ids=r.prompt_ids(q), user=q, max_new_tokens=max_new) for q in qs[:n]]


def timed(name: str, fn, reqs: list[GenRequest], engine) -> dict:
    before = engine.tokens_generated
    t = time.perf_counter()
    fn(reqs)
    dt = time.perf_counter() - t
    new_tokens = engine.tokens_generated - before
    return {"engine": name, "n": len(reqs), "seconds": round(dt, 3), "generations_per_s": round(len(reqs) / dt, 2),
            "new_tokens_per_s": round(new_tokens / dt, 1), "new_tokens": new_tokens}


def median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {**ordered[len(ordered) // 2], "repeats": len(runs), "all_seconds": [r["seconds"] for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    reqs = requests(a.model, a.n, a.max_new_tokens)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    hf = HFEngine(EngineSpec(model=a.model, batch_size=sizes[0]))
    hf.generate(reqs[:2])  # warm-up
    runs: dict[int, list[dict]] = {bs: [] for bs in sizes}
    for _ in range(a.repeats):
        for bs in sizes:
            hf.spec = dataclasses.replace(hf.spec, batch_size=bs)  # same weights, another batch size
            runs[bs].append(timed(f"hf-cpu bs={bs}", hf.generate, reqs, hf))
    results = [median_run(runs[bs]) for bs in sizes]
    base = results[0]["generations_per_s"]
    for bs, r in zip(sizes, results):
        r.update(batch_size=bs, ratio_vs_first=round(r["generations_per_s"] / base, 2))
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        hg = HFEngine(EngineSpec(model=a.model, batch_size=max(sizes), use_gpu=True))
        results.append(timed(f"hf-gpu bs={max(sizes)}", hg.generate, reqs, hg))
        del hg
        if importlib.util.find_spec("vllm") is not None:
            from derta.eval.engines import VLLMEngine

            v = VLLMEngine(EngineSpec(model=a.model, kind="vllm", use_gpu=True, gpu_memory_utilization=0.5))
            results.append(timed("vllm-gpu", v.generate, reqs, v))
    for r in results:
        print(json.dumps({**r, "model": a.model, "max_new_tokens": a.max_new_tokens, **env}))


if __name__ == "__main__":
    main()
