"""Connecting to Ray: a running cluster when an address is given, else a local one; and what a
local run needs to start fast and print only what a person reads.

One cluster per process: `ensure_ray` starts it once and every stage (data, train, eval, each
arm of an experiment, each tune trial) reuses it; nothing here shuts it down.
"""

from __future__ import annotations

import logging
import os
import re

from derta.config import ExperimentConfig

# Ray Train V2's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default): a finished run is noticed up to one interval late and a worker-group start waits in
# whole intervals. On a local cluster a poll is a cheap loopback call, so poll faster.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def local_cpus(cfg: ExperimentConfig) -> int:
    """Logical CPUs for a local cluster: enough for every train worker plus Ray Data / eval
    tasks beside them, even on a 2-core laptop (the OS shares the real cores)."""
    need = int(cfg.train.workers * cfg.train.cpus_per_worker) + 2
    return max(os.cpu_count() or 1, need)


def started_here() -> bool:
    """True when Ray is initialised and this process started the cluster (a local one that
    dies with it), False for a driver connected to a running cluster or a job's entrypoint."""
    try:
        import ray

        node = ray._private.worker.global_worker.node if ray.is_initialized() else None
        return bool(node is not None and node.head)
    except Exception:  # noqa: BLE001 - any doubt: behave as on a shared cluster
        return False


def ensure_ray(cfg: ExperimentConfig) -> None:
    """Initialise Ray once per process; a no-op inside a Ray job, where Ray is already up."""
    import ray

    if ray.is_initialized():
        quiet_console()
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or local_cpus(cfg), include_dashboard=False, log_to_driver=True,
                 logging_level=logging.WARNING)
    quiet_console()


# Lines Ray's workers, actors and raylet print that say nothing a person running DeRTa acts
# on; they stay in the session's log files (ray_logs_dir()), only the console drops them.
NOISE_ACTORS = frozenset({"PlacementGroupCleaner"})  # Ray Train's PG watchdog (remote clusters keep it)
NOISE = re.compile("|".join(re.escape(s) for s in (
    "Failed to query Ray Train Controller actor state",  # the PG watchdog without the State API
    "Progress bars disabled. To enable",  # Ray Data, once per process, after quiet_console
    "logging_progress.py",  # Ray Data's non-TTY progress tables
    "PYTHON worker processes have been started on node",  # raylet: expected on a 2-core laptop
)))


def drop_noise(data: dict) -> dict | None:
    """A batch of forwarded worker log lines without the noise; None when nothing is left."""
    if data.get("actor_name") in NOISE_ACTORS:
        return None
    lines = [ln for ln in data.get("lines") or [] if not NOISE.search(ln)]
    return {**data, "lines": lines} if lines else None


def _filter_forwarded_logs() -> None:
    """Wrap the driver's handler of forwarded worker logs (log_to_driver) with drop_noise."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # Ray moved it: the console is noisier, nothing breaks
        return

    def filtered(handler):
        def handle(data):
            kept = drop_noise(data)
            if kept is not None:
                handler(kept)

        handle.derta_filtered = True  # type: ignore[attr-defined]
        return handle

    with dispatcher._lock:
        dispatcher.handlers = [(name, h if getattr(h, "derta_filtered", False) else filtered(h))
                               for name, h in dispatcher.handlers]
    # The raylet's warnings reach the console by another path: the driver's error listener
    # calls this module function directly (looked up at call time, so wrapping it here works).
    from ray._private import worker as ray_worker

    fn = getattr(ray_worker, "print_to_stdstream", None)
    if fn is not None and not getattr(fn, "derta_filtered", False):
        def print_to_stdstream(data, *a, _fn=fn, **kw):
            kept = drop_noise(data)
            if kept is not None:
                _fn(kept, *a, **kw)

        print_to_stdstream.derta_filtered = True  # type: ignore[attr-defined]
        ray_worker.print_to_stdstream = print_to_stdstream


def quiet_console() -> None:
    """Ray's internal chatter goes to the session's log files only (`ray_logs_dir()`): Ray
    Data's per-operator progress bars and INFO lines are off on the console (they are still
    written to <logs>/ray-data*.log); warnings and errors still print. Idempotent."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # copied into every dataset's plan: workers and split coordinators too
    ctx.print_on_execution_start = False
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # spends Ray Data's one "Progress bars disabled" warning
    _filter_forwarded_logs()
    for h in logging.getLogger("ray.data").handlers:
        if not hasattr(h, "baseFilename"):  # the console handler; file handlers keep DEBUG
            h.setLevel(logging.WARNING)


def ray_logs_dir() -> str | None:
    """Where this Ray session writes its logs (workers, raylet, Ray Data, Ray Train), or None."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        node = ray._private.worker.global_worker.node
        return node.get_logs_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001
        return None
