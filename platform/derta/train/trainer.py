"""The training stage's entry point: assemble a Ray Train TorchTrainer and run it.

`train(cfg, paths, tracking)` turns the method + schedule into stages, gets one Ray Dataset per
stage from the data stage, lays its samples out in optimizer steps of train.global_batch
samples, one dataset per worker (data.pipeline.step_datasets; so the LR schedule knows the
real number of steps: ceil(samples / global_batch) per epoch), and runs `loop.train_loop_per_worker` on `train.workers` workers (gloo on CPU, NCCL on
GPU). Checkpoints live under paths.checkpoints (Ray's storage path, local or s3://); the final
model is an HF directory at paths.model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from derta import storage
from derta.config import ExperimentConfig
from derta.paths import RunPaths

log = logging.getLogger(__name__)

RAY_RUN_NAME = "train"  # <paths.checkpoints>/train/checkpoint_s<stage>_<step>/
MLE_KINDS = ["helpful", "vanilla", "prefix"]
TRANSITION_KINDS = ["rto", "pref"]
FAULT_ENV = "DERTA_TRAIN_FAULT"  # "<step>:<marker file>[:<rank>]": SIGKILL a worker once (tests)


@dataclass
class TrainResult:
    model_dir: str
    steps: int
    final_metrics: dict[str, float] = field(default_factory=dict)


def transition_of(method: str) -> str:
    """The loss form on rto_mask positions: RTO cross-entropy, per-position preference, or none."""
    return {"rto": "rto", "derta": "rto", "derta_pref": "pref"}.get(method, "none")


def plan_stages(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Stages without row counts: name, dataset key, data kinds (None = all), loss form, weights.

    joint (the paper): one stage, w_mle·MLE + w_rto·RTO summed over one mixed dataset.
    sequential: an MLE stage over helpful/vanilla/prefix rows, then an RTO (or preference)
    stage over rto/pref rows. Methods without a transition term have one stage either way.
    """
    tr = transition_of(cfg.train.method)
    w = cfg.train.loss
    if cfg.train.schedule == "joint" or tr == "none":
        return [{"name": "joint" if tr != "none" else "mle", "dataset": "train", "kinds": None,
                 "transition": tr, "w_mle": w.w_mle, "w_rto": w.w_rto}]
    return [
        {"name": "mle", "dataset": "train", "kinds": MLE_KINDS, "transition": "none", "w_mle": w.w_mle, "w_rto": 0.0},
        {"name": tr, "dataset": "train_transition", "kinds": TRANSITION_KINDS, "transition": tr, "w_mle": w.w_mle, "w_rto": w.w_rto},
    ]


def _dataset(cfg: ExperimentConfig, paths: RunPaths, kinds: list[str] | None):
    from derta.data.pipeline import training_dataset

    """Rows streamed from the sources (no built data to read on the driver)."""
    ds = training_dataset(cfg, paths, kinds=kinds, rto_end=True)  # keep_rule public: EOS is an RTO target
    return ds.select_columns(["input_ids", "labels", "rto_mask", "position_ids"])


TIMELINE_ENV = "DERTA_TRAIN_TIMELINE"  # a directory: each worker writes <rank>.json phase timestamps (profiling)
WORKER_ENV = (TIMELINE_ENV, "DERTA_CACHE", "DERTA_CACHE_DIR", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI",
              "DERTA_FAULT")  # the last: derta.faults, tests only


def _handle_dict(tracking: Any) -> dict | None:
    if tracking is None:
        return None
    if isinstance(tracking, dict):
        return tracking
    return {"tracking_uri": tracking.tracking_uri, "experiment": tracking.experiment, "run_id": tracking.run_id}


def _fault_from_env() -> dict | None:
    text = os.environ.get(FAULT_ENV)
    if not text:
        return None
    parts = text.split(":")
    return {"step": int(parts[0]), "marker": parts[1], "rank": int(parts[2]) if len(parts) > 2 else 1}


def _log_params(handle: dict | None, params: dict[str, Any], tags: dict[str, Any] | None = None) -> None:
    if not handle or not handle.get("run_id"):
        return
    try:
        from derta.tracking import Tracker

        tracker = Tracker(handle["tracking_uri"], handle.get("experiment", "derta"))
        with tracker.attach(handle["run_id"]):
            if params:
                tracker.log_params(params)
            if tags:
                tracker.set_tags(tags)
    except Exception as e:  # a duplicate param or an unreachable server must not fail training
        log.warning("MLflow logging from the trainer failed: %s", e)


def train(cfg: ExperimentConfig, paths: RunPaths, tracking: Any = None, *, datasets: dict[str, Any] | None = None,
          callbacks: list[Any] | None = None, proxy: dict[str, Any] | None = None, export: bool = True) -> TrainResult:
    """Run the training stage; returns where the model is and the last logged metrics.

    `datasets` (stage dataset key -> ray.data.Dataset) overrides the data stage, for tests
    and notebooks that build rows themselves. Tune trials (derta.tune.tuner) pass `callbacks`
    (Ray Train callbacks, e.g. Tune's report callback), `proxy` (the held-out proxy objective,
    evaluated and reported by the loop) and `export=False` when no model directory is needed.
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from derta.cluster import LOCAL_TRAIN_ENV, ensure_ray, started_here
    from derta.data.pipeline import step_datasets, steps_from_samples, training_samples
    from derta.train.loop import step_plan, worker_key

    ensure_ray(cfg)
    tc = cfg.train
    stages = plan_stages(cfg)
    ds_map: dict[str, Any] = {}
    for st in list(stages):
        # global_batch counts samples: lay the samples out in steps of global_batch samples.
        samples = None if datasets else training_samples(cfg, paths, st["kinds"], rto_end=True)
        if samples is not None:  # built data: read on the driver, no Ray Data job
            lay = steps_from_samples(samples, cfg.data.max_len, tc.global_batch, tc.workers, tc.micro_batch,
                                     cfg.data.packing)
        else:
            ds = (datasets or {}).get(st["dataset"]) if datasets else _dataset(cfg, paths, st["kinds"])
            if ds is None:
                raise ValueError(f"no dataset for training stage {st['name']!r} (key {st['dataset']!r})")
            lay = step_datasets(ds, tc.global_batch, tc.workers, tc.micro_batch, cfg.data.packing)
        if lay["samples"] == 0:
            log.warning("training stage %s has no samples; skipped", st["name"])
            stages.remove(st)
            continue
        st.update(rows=lay["rows"], samples=lay["samples"], rows_per_step=lay["rows_per_step"])
        for rank, wds in enumerate(lay["datasets"]):
            ds_map[worker_key(st["dataset"], rank)] = wds
    if not stages:
        from derta.config import ConfigError

        raise ConfigError("train: no training rows for any stage (check data.mix and train.method)")
    plans = [step_plan(st["rows_per_step"], tc.workers, tc.micro_batch, tc.global_batch, st["samples"], tc.epochs,
                       tc.max_steps, tc.warmup_ratio) for st in stages]
    for st, p in zip(stages, plans):
        st["total_steps"] = p.total_steps

    ckpt_root = paths.checkpoints
    if tc.resume == "never":
        storage.delete(storage.join(ckpt_root, RAY_RUN_NAME))
    # No keys in this filesystem: Train pickles it into trainer.pkl under the run directory.
    # Workers get the driver's settings from the sealed `env` below (their own chain otherwise).
    fs, storage_path = storage.pyarrow_fs(ckpt_root)
    if fs is None:
        storage_path = os.path.abspath(storage_path)
        os.makedirs(storage_path, exist_ok=True)

    handle = _handle_dict(tracking)
    # What the trainer derived (never logged by anyone else) ...
    _log_params(handle, {f"trainer.stage{i}.{k}": v for i, (st, p) in enumerate(zip(stages, plans))
                         for k, v in {"name": st["name"], "rows": st["rows"], "samples": st["samples"],
                                      "steps": p.total_steps, "steps_per_epoch": p.steps_per_epoch, "accum": p.accum,
                                      "global_batch_samples": p.global_batch, "warmup_steps": p.warmup_steps}.items()})
    # ... and the config it ran with (may already be logged by the caller with the same values).
    _log_params(handle, {"train": tc.model_dump(mode="json"), "model.name_or_path": cfg.model.name_or_path,
                         "model.lora": cfg.model.lora.model_dump() if cfg.model.lora else None})

    # Settings the workers need to reach the same model cache, object store and tracking
    # server as the driver. Sent inside the (pickled) loop config and applied by the worker,
    # not as a runtime_env, so credentials never show up in Ray's dashboard.
    env = {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}
    from derta.rerun import config_fingerprint
    from derta.train.checkpoint import FINGERPRINT_ENV, LEDGER_ENV

    ledger, fingerprint = storage.join(ckpt_root, "ledger.json"), config_fingerprint(cfg)
    env.update({LEDGER_ENV: ledger, FINGERPRINT_ENV: fingerprint})  # rank 0 records what it saves
    loop_config = {
        "experiment": cfg.to_dict(),
        "stages": [{k: v for k, v in st.items() if k != "kinds"} for st in stages],
        "model_uri": paths.model,
        "run_name": paths.name,
        "tracking": handle,
        "fault": _fault_from_env(),
        "resume_from": None,
        "env": env,
        "proxy": proxy,
        "export": export,
    }
    if tc.resume == "auto":
        from derta.train.checkpoint import find_latest

        loop_config["resume_from"] = find_latest(storage.join(ckpt_root, RAY_RUN_NAME), ledger, fingerprint)

    from derta.security import release, seal

    # The unredacted config, tracking handle and env stay in the cluster's memory (see
    # derta.security): Train pickles train_loop_config into trainer.pkl in the run directory.
    sealed_keys = ("experiment", "tracking", "env")
    loop_config = {k: seal(v) if k in sealed_keys and v is not None else v for k, v in loop_config.items()}
    trainer_cls = interruptible_trainer_class(TorchTrainer)
    if started_here():  # a cluster this process started and will take down: no leak to guard
        for k, v in LOCAL_TRAIN_ENV.items():
            os.environ.setdefault(k, v)  # read by Ray when fit() starts the controller
        trainer_cls = local_trainer_class(trainer_cls)
    trainer = trainer_cls(
        _entry,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(
            name=RAY_RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
        datasets=ds_map,
        # Each worker reads its own dataset (step_datasets splits every step's rows evenly).
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        result = trainer.fit()
    finally:
        if before is not None:  # Ray Train leaves its own handler installed after fit()
            signal.signal(signal.SIGINT, before)
        release(*(loop_config[k] for k in sealed_keys))
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    steps = int(metrics.get("step", sum(p.total_steps for p in plans)))
    if export:
        _log_params(handle, {}, tags={"model_dir": paths.model})
    return TrainResult(model_dir=paths.model, steps=steps, final_metrics=metrics)


ABORT_WAIT_S = 5.0  # Ctrl+C: how long the driver waits for Ray Train's controller to abort


def interruptible_trainer_class(base: type) -> type:
    """`base` whose Ctrl+C aborts the Train run and raises KeyboardInterrupt in the driver.

    Ray Train's own SIGINT handler aborts the controller and then calls sys.exit(0) (the abort
    kills the actor it waits on), so an interrupted run looked like a success to the caller and
    its MLflow runs were not marked KILLED. A second Ctrl+C gets Python's default behaviour.
    Falls back to `base` if Ray's internals moved."""
    if not hasattr(base, "_register_sigint_handler"):
        return base

    class InterruptibleTrainer(base):  # type: ignore[misc, valid-type]
        def _register_sigint_handler(self, controller):
            import signal

            import ray

            previous = signal.getsignal(signal.SIGINT)

            def on_sigint(signum, frame):
                signal.signal(signal.SIGINT, previous if callable(previous) else signal.default_int_handler)
                try:  # a controller busy starting workers answers late; it is the driver's
                    # actor and goes with it anyway, so the abort is not waited for long
                    ray.get(controller.abort.remote(), timeout=ABORT_WAIT_S)
                except Exception:  # noqa: BLE001 - the controller exits while aborting
                    pass
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)

    InterruptibleTrainer.__name__ = InterruptibleTrainer.__qualname__ = f"Interruptible{base.__name__}"
    return InterruptibleTrainer


def local_trainer_class(base: type) -> type:
    """`base` without Ray Train's PlacementGroupCleaner, for a cluster started by this process.

    The cleaner is a detached actor per run (one more Python process to spawn and import on a
    2-core laptop) that removes the run's placement group if the controller dies; a local
    cluster dies with the driver, so there is nothing to clean. It also polls the State API,
    which a local cluster without the dashboard lacks, printing "Failed to query Ray Train
    Controller actor state" every second or two. Falls back to `base` if Ray's internals moved.
    """
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return base
    if not hasattr(base, "_create_default_callbacks"):
        return base

    class LocalTrainer(base):  # type: ignore[misc, valid-type]
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]

    LocalTrainer.__name__ = LocalTrainer.__qualname__ = f"Local{base.__name__}"
    return LocalTrainer


def _entry(config: dict[str, Any]) -> None:
    # Imported inside the worker so the driver does not pickle these modules' globals.
    from derta.security import unseal_keys
    from derta.train.loop import train_loop_per_worker

    config = unseal_keys(config)
    timeline = (config.get("env") or {}).get(TIMELINE_ENV)
    if timeline:
        from derta.train.timeline import traced

        with traced(timeline):
            train_loop_per_worker(config)
        return
    train_loop_per_worker(config)
