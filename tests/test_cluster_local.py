"""derta.cluster's local-run settings, without starting Ray: Ray Train without the
PlacementGroupCleaner on a cluster this process started, and a quiet console (Ray Data's
progress tables and INFO lines go to its log file only)."""

from __future__ import annotations

import logging


def _callback_names(trainer) -> list[str]:
    return [type(c).__name__ for c in trainer._create_default_callbacks()]


def test_local_trainer_drops_only_the_placement_group_cleaner():
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from derta.train.trainer import local_trainer_class

    def loop(config):  # never runs: fit() is not called
        raise AssertionError

    cls = local_trainer_class(TorchTrainer)
    assert issubclass(cls, TorchTrainer) and cls is not TorchTrainer
    base = _callback_names(TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1)))
    local = _callback_names(cls(loop, scaling_config=ScalingConfig(num_workers=1)))
    assert "PlacementGroupCleanerCallback" in base
    assert local == [n for n in base if n != "PlacementGroupCleanerCallback"]
    assert "BackendSetupCallback" in local  # the process group is still set up


def test_local_trainer_falls_back_when_ray_has_no_such_hook():
    from derta.train.trainer import local_trainer_class

    class Other:
        pass

    assert local_trainer_class(Other) is Other


def test_not_started_here_without_ray():
    import ray

    from derta.cluster import ray_logs_dir, started_here

    if not ray.is_initialized():
        assert started_here() is False and ray_logs_dir() is None


def test_quiet_console_turns_off_ray_data_progress_but_keeps_its_log_file():
    from ray.data import DataContext

    from derta.cluster import quiet_console

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start)
    handlers = logging.getLogger("ray.data").handlers
    levels = [h.level for h in handlers]
    try:
        quiet_console()
        assert ctx.enable_progress_bars is False and ctx.print_on_execution_start is False
        console = [h for h in handlers if not hasattr(h, "baseFilename")]
        files = [h for h in handlers if hasattr(h, "baseFilename")]
        assert console and all(h.level == logging.WARNING for h in console)
        assert all(h.level < logging.INFO for h in files)  # everything still reaches ray-data.log
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved
        for h, lvl in zip(handlers, levels):
            h.setLevel(lvl)


def test_forwarded_worker_logs_lose_only_ray_noise():
    from derta.cluster import drop_noise

    mine = "[derta.train] step 3/6 loss 12.1686 tok/s 4,645 ETA 0:14"
    batch = {"pid": 7, "actor_name": "RayTrainWorker", "is_err": False, "lines": [
        mine,
        "2026-12-02 02:01:51,693\tINFO logging_progress.py:225 -- Total Progress: 0/?",
        "WARNING: 8 PYTHON worker processes have been started on node: abc with address: 1.2.3.4",
    ]}
    assert drop_noise(batch) == {**batch, "lines": [mine]}
    assert drop_noise({"actor_name": "PlacementGroupCleaner", "lines": ["Failed to query Ray Train Controller "
                                                                        "actor state. State API ..."]}) is None
    assert drop_noise({"actor_name": "", "lines": ["Progress bars disabled. To enable, set ..."]}) is None
    warning = {"actor_name": "RayTrainWorker", "lines": ["UserWarning: something that matters"]}
    assert drop_noise(warning) == warning


def test_the_raylet_path_to_the_console_is_filtered_too():
    from ray._private import worker as ray_worker

    from derta.cluster import _filter_forwarded_logs

    seen: list = []
    saved = ray_worker.print_to_stdstream
    ray_worker.print_to_stdstream = lambda data, ignore_prefix: seen.append(data["lines"])
    try:
        _filter_forwarded_logs()
        _filter_forwarded_logs()  # idempotent: wrapped once
        ray_worker.print_to_stdstream({"pid": "raylet", "is_err": False, "lines": [
            "WARNING: 8 PYTHON worker processes have been started on node: abc"]}, ignore_prefix=False)
        ray_worker.print_to_stdstream({"pid": "raylet", "is_err": False, "lines": ["out of memory"]}, ignore_prefix=False)
    finally:
        ray_worker.print_to_stdstream = saved
    assert seen == [["out of memory"]]
