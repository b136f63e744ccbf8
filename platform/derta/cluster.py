"""Connecting to Ray: a running cluster when an address is given, else a local one."""

from __future__ import annotations

import os

from derta.config import ExperimentConfig


def local_cpus(cfg: ExperimentConfig) -> int:
    """Logical CPUs for a local cluster: enough for every train worker plus Ray Data / eval
    tasks beside them, even on a 2-core laptop (the OS shares the real cores)."""
    need = int(cfg.train.workers * cfg.train.cpus_per_worker) + 2
    return max(os.cpu_count() or 1, need)


def ensure_ray(cfg: ExperimentConfig) -> None:
    """Initialise Ray once per process; a no-op inside a Ray job, where Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or local_cpus(cfg), include_dashboard=False, log_to_driver=True)
