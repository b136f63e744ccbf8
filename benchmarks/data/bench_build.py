"""Build + tokenize throughput: the Ray Data pipeline (derta.data.pipeline.build) against a
single-process Python loop doing the same work (read JSONL, validate, hold out, assign kinds,
tokenize, build samples, write Parquet), in the same run, at 10K and 100K synthetic triples.

    python benchmarks/data/bench_build.py [--sizes 10000 100000] [--num-cpus N] [--model builtin:tiny]

Prints one JSON line per (size, engine) and a Markdown table for RESULTS.md. The triples are
generated from the demo corpus' word lists (placeholder harmful topics), ~110 tokens each
for the tiny tokenizer; the mix is the derta preset (half rto, half harmful-prefix samples).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def synth_triples(n: int, path: Path, seed: int = 0) -> None:
    from derta import demo

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            noun = rng.choice(demo.HARM_NOUNS) + str(i % 97)
            q = rng.choice(demo.HARM_TEMPLATES).format(n=noun)
            safe = rng.choice(demo.REFUSALS).format(n=noun)
            harmful = demo._harmful_response(noun, rng)  # noqa: SLF001 - same generator as the demo
            f.write(json.dumps({"query": q, "safe": safe, "harmful": harmful}) + "\n")


def config(src: Path, root: Path, model: str):
    from derta.config import validate_config

    return validate_config({
        "model": {"name_or_path": model},
        "data": {"safety": {"uri": str(src)}, "helpful": None, "template": "chat_template", "max_len": 512,
                 "mix": {"preset": "derta"}, "holdout": 0.05},
        "storage": {"root": str(root)},
    })  # fmt: skip


def single_process(cfg, out_dir: Path) -> dict:
    """The same work as the pipeline, in one Python process (the baseline)."""
    from derta.data import mix as M
    from derta.data import pipeline as P
    from derta.data import sources as S
    from derta.data.prefix import row_uniform
    from derta.data.templates import make_template
    from derta.data.tokenize import SampleBuilder
    from derta.models import load_tokenizer

    builder = SampleBuilder(make_template(cfg.data.template, load_tokenizer(cfg.model)), cfg.data)
    spec = S.resolve(cfg.data.safety, "safety")
    rows = [r for r in S.read_records_local(spec).to_pylist() if r["error"] is None]
    rows = [r for r in rows if row_uniform("", r["source_id"], P.HOLDOUT_SALT) >= cfg.data.holdout]
    u = np.array([row_uniform(cfg.data.seed, r["source_id"], "mix") for r in rows])
    _, amounts = M.resolve_mix(cfg.data.mix, cfg.train.method)
    plan = M.plan_kinds(amounts, M.SAFETY_ORDER, len(rows))
    ranks = M.ranks(np.sort(u), u)
    records = [{**r, "kinds": plan.kinds_at(int(k))} for r, k in zip(rows, ranks)]
    out_dir.mkdir(parents=True, exist_ok=True)
    n = tokens = 0
    for i in range(0, len(records), 512):
        samples, _ = builder.build(records[i : i + 512])
        table = P.sample_table(samples, {})
        pq.write_table(table, out_dir / f"part-{i // 512:05d}.parquet", compression="zstd")
        n += len(samples)
        tokens += sum(len(s) for s in samples)
    return {"samples": n, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--model", default="builtin:tiny")
    args = ap.parse_args()

    import ray

    from derta.data import pipeline
    from derta.models import resolve_model_path
    from derta.paths import RunPaths

    model = resolve_model_path(args.model)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    tmp = Path(tempfile.mkdtemp(prefix="derta-bench-"))
    results = []
    try:
        for n in args.sizes:
            src = tmp / f"triples-{n}.jsonl"
            synth_triples(n, src)
            cfg = config(src, tmp / "runs", model)
            t0 = time.perf_counter()
            base = single_process(cfg, tmp / f"loop-{n}")
            t_loop = time.perf_counter() - t0
            t0 = time.perf_counter()
            m = pipeline.build(cfg, RunPaths(str(tmp / "runs"), f"ray-{n}"))
            t_ray = time.perf_counter() - t0
            assert m.num_samples == base["samples"] and m.tokens["total"] == base["tokens"], (m.counts, base)
            for engine, secs in (("python loop (1 process)", t_loop), (f"Ray Data ({args.num_cpus} CPUs)", t_ray)):
                row = {"triples": n, "engine": engine, "seconds": round(secs, 2), "samples": base["samples"],
                       "tokens": base["tokens"], "samples_per_s": round(base["samples"] / secs, 1),
                       "tokens_per_s": round(base["tokens"] / secs)}  # fmt: skip
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"ray {ray.__version__}, {time.strftime('%Y-%m-%d')}\n")  # fmt: skip
    print("| triples | engine | seconds | samples | tokens | samples/s | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['triples']:,} | {r['engine']} | {r['seconds']} | {r['samples']:,} | {r['tokens']:,} | "
              f"{r['samples_per_s']:,} | {r['tokens_per_s']:,} |")  # fmt: skip


if __name__ == "__main__":
    main()
