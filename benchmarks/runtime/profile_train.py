"""Where the fixed cost of a small Ray Train run goes: `python benchmarks/runtime/profile_train.py`.

Runs the data and train stages of `derta run` on the built-in demo (the e2e test's settings:
6 steps, global batch 8) in one process and prints one JSON object of phase durations in
seconds: driver marks (imports, Ray init, data build, dataset materialise + count, trainer
construct, fit, MLflow model logging, Ray shutdown) and, from DERTA_TRAIN_TIMELINE, the workers'
marks (controller + worker start, imports, tokenizer/model build, first batch, steps, reports,
checkpoints, export, teardown). `--runs N` repeats the train stage N times on the same Ray
cluster (the second run shows what is paid once per process vs once per run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

T0 = time.time()
MARKS: dict[str, float] = {}


def mark(name: str, start: float) -> None:
    MARKS[name] = round(time.time() - start, 2)


def worker_phases(timeline_dir: str, fit_start: float, fit_end: float) -> dict[str, float]:
    """Rank 0's phases relative to the driver's fit() call."""
    with open(os.path.join(timeline_dir, "rank0.json")) as f:
        tl = json.load(f)
    ev = tl["events"]
    first = {}
    total: dict[str, float] = {}
    for name, a, b in ev:
        first.setdefault(name, (a, b))
        total[name] = total.get(name, 0.0) + (b - a)
    out = {
        "fit->worker_process_start": tl["proc_start"] - fit_start,
        "worker_process_start->entry (ray worker init, torch import, process group)": tl["entry"] - tl["proc_start"],
        "import derta.train.loop": total.get("import_loop", 0.0),
        "load_tokenizer": total.get("load_tokenizer", 0.0),
        "build_models": total.get("build_models", 0.0),
        "first_batch (data ingest start)": total.get("first_batch", 0.0),
        "ray.train.report (all calls)": total.get("report", 0.0),
        "save_checkpoint (all calls)": total.get("save_checkpoint", 0.0),
        "export_model": total.get("export_model", 0.0),
        "entry->done": tl["done"] - tl["entry"],
        "worker done->fit returns (report poll, teardown)": fit_end - tl["done"],
    }
    if "first_batch" in first and "export_model" in first:
        steps_wall = first["export_model"][0] - first["first_batch"][1]
        out["steps incl. reports+checkpoints (first batch->export)"] = steps_wall
    return {k: round(v, 2) for k, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--variants", default="after", help="comma list of before|after, cycled over the runs: "
                   "before = Ray Train defaults (PlacementGroupCleaner, 2 s health checks), after = this repo's "
                   "local-cluster settings; alternating them in one process gives ratios under the same load")
    args = p.parse_args()

    t = time.time()
    import ray  # noqa: F401

    from derta import pipeline
    from derta.config import load_config
    from derta.train import trainer as trainer_mod

    mark("import ray + derta.pipeline", t)
    root = tempfile.mkdtemp(prefix="derta-profile-")
    os.environ.setdefault("DERTA_CACHE", os.path.join(root, "cache"))
    cfg = load_config(None, [f"storage.root={root}/runs", "storage.run_name=profile", f"train.max_steps={args.steps}",
                             "train.global_batch=8", "train.micro_batch=4", "data.max_len=256", "train.resume=never"])
    variants = args.variants.split(",")
    paths = pipeline.run_paths(cfg)

    t = time.time()
    from derta.cluster import ensure_ray

    ensure_ray(cfg)
    mark("ray init", t)

    tracker = pipeline.make_tracker(cfg)
    timings: dict[str, float] = {}
    result: dict = {"marks": MARKS, "runs": []}
    with pipeline.parent_run(cfg, paths, "profile") as (tracker, parent):
        t = time.time()
        with pipeline._stage(tracker, parent, "data", timings, cfg) as h:
            pipeline._build(cfg, paths, h)
        mark("data stage (build transition samples)", t)

        from derta import cluster

        fast_env = dict(cluster.LOCAL_TRAIN_ENV)
        fast_cls = trainer_mod.local_trainer_class
        for i in range(args.runs):
            variant = variants[i % len(variants)]
            run: dict = {"variant": variant}
            for k in fast_env:
                os.environ.pop(k, None)
            if variant == "before":
                cluster.LOCAL_TRAIN_ENV.clear()
                trainer_mod.local_trainer_class = lambda base: base
            else:
                cluster.LOCAL_TRAIN_ENV.update(fast_env)
                trainer_mod.local_trainer_class = fast_cls
            orig_dataset = trainer_mod._dataset

            def timed_dataset(*a, _orig=orig_dataset, **kw):
                s = time.time()
                ds = _orig(*a, **kw)
                run["driver: dataset build + materialise"] = round(time.time() - s, 2)
                return ds

            trainer_mod._dataset = timed_dataset
            from ray.train.torch import TorchTrainer

            orig_fit = TorchTrainer.fit
            fit_t: dict[str, float] = {}

            def timed_fit(self, _orig=orig_fit):
                fit_t["start"] = time.time()
                try:
                    return _orig(self)
                finally:
                    fit_t["end"] = time.time()

            TorchTrainer.fit = timed_fit
            timeline = os.path.join(root, f"timeline{i}")
            os.environ["DERTA_TRAIN_TIMELINE"] = timeline
            try:
                t = time.time()
                with pipeline._stage(tracker, parent, "train", timings, cfg) as h:
                    from derta.train.trainer import train as train_fn

                    res = train_fn(cfg, paths, h)
                    t_fit_done = time.time()
                    s = time.time()
                    pipeline.log_model(cfg, h, res.model_dir)
                    run["driver: MLflow log_model + register"] = round(time.time() - s, 2)
                run["train stage total"] = round(time.time() - t, 2)
            finally:
                trainer_mod._dataset = orig_dataset
                TorchTrainer.fit = orig_fit
                os.environ.pop("DERTA_TRAIN_TIMELINE", None)
            run["driver: fit() total"] = round(fit_t["end"] - fit_t["start"], 2)
            run["driver: train() before fit (count, params, trainer construct)"] = round(
                fit_t["start"] - t - run.get("driver: dataset build + materialise", 0.0), 2)
            run["driver: after fit (stage close)"] = round(time.time() - t_fit_done - run["driver: MLflow log_model + register"], 2)
            run.update({f"worker rank0: {k}": v for k, v in worker_phases(timeline, fit_t["start"], fit_t["end"]).items()})
            steps = run.get("worker rank0: steps incl. reports+checkpoints (first batch->export)", 0.0)
            run["fixed cost (train stage total - steps)"] = round(run["train stage total"] - steps, 2)
            result["runs"].append(run)

    t = time.time()
    ray.shutdown()
    mark("ray shutdown", t)
    MARKS["process total"] = round(time.time() - T0, 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
