"""`derta tune`: a Ray Tune search over the prefix distribution, loss weights and lr.

Shape (the Ray Train V2 pattern; `Tuner(trainer)` is deprecated):

    Tuner(trial driver fn)  ─ one trial per sampled point, at most N at a time
      └─ trial driver (a Tune actor, 0.5 CPU): config = base + point, data, MLflow child run
           └─ TorchTrainer.fit()   its own controller + `train.workers` workers (FSDP)
                └─ train loop: at ASHA's rungs (or every tune.report_every steps) the proxy
                   objective on held-out data (derta.tune.proxy) -> ray.train.report ->
                   TuneReportCallback -> Tune

* Scheduler: ASHA on the optimizer step (time_attr "step"): a trial below the rung's top
  1/reduction_factor at grace_period * rf^k steps is stopped; FIFO runs all to the end.
* Searcher: random (seeded) or Optuna TPE (model-based); tune.seed, else train.seed.
* Concurrency: tune.max_concurrent_trials, else what the cluster holds: every concurrent
  trial's workers (CPU and GPU) plus its driver, with one CPU left for Ray Data tasks.
* Data: trials that search no data.* key share the base run's samples (built once under
  <run>/data, training rows materialized once in the object store when small); trials that
  do build their own under <run>/trials/<trial id>/data.
* Early stopping frees resources at once: ASHA kills the trial actor, Ray Train's workers
  go with it, and a small detached janitor per trial (TrialJanitor) releases their placement
  group, which Train's own cleaner does only when the Ray dashboard (state API) is up.
* Resume: Tune's state lives at <run>/tune/search (local or s3://). Running `derta tune`
  again with the same storage.run_name restores it (Tuner.restore): finished trials are
  kept, unfinished ones restart (from their last Train checkpoint when
  train.checkpoint_every is set), unsampled points are drawn. Ctrl+C stops a search
  cleanly (Tune saves its state first).
* MLflow: one parent run (tag verb=tune) and one nested run per trial (its params, its
  training curves, its proxy metrics, final status and early_stopped tag); best metrics and
  the best config on the parent.
* Output: <run>/tune/best_config.yaml (the best completed trial's full config, secrets
  redacted; runnable with `derta run --config`), <run>/tune/trials.json (every trial), and
  with tune.top_n_full_eval = N the full evaluation (derta.eval) of the N best trials'
  models under <run>/trials/<trial id>/eval/.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from derta import storage
from derta.config import ConfigError, ExperimentConfig, dump_yaml, redact_text
from derta.paths import RunPaths
from derta.tune.proxy import PROXY_KEYS
from derta.tune.space import apply_params, changes_data, space_dims, to_tune

log = logging.getLogger("derta.tune")

EXPERIMENT = "search"  # Tune experiment directory under <run>/tune/
TRIAL_DRIVER_CPU = 0.5  # the trial actor only orchestrates (data build driver, trainer.fit)
DATA_CPU_HEADROOM = 1.0  # CPUs kept free for Ray Data tasks (builds and training ingest)
ASHA_MAX_T = 10**7  # steps; trials end on their own (stop_last_trials=False)
SHARE_MATERIALIZE_MAX_BYTES = 2 * 1024**3  # shared training rows above this stay lazy
SEALED_CTX = ("experiment", "tracking", "env")  # ctx keys that may hold secrets (run_trial unseals)
DONE_FILE = "tune_done.json"  # written by a trial that trained to the end
JANITOR_FILE = "tune_janitor.json"  # name of the trial's janitor actor (see TrialJanitor)


@dataclass
class TuneSummary:
    paths: RunPaths
    experiment_path: str
    parent_run_id: str | None
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    best_config: ExperimentConfig | None = None
    best_config_path: str | None = None
    interrupted: bool = False
    restored: bool = False
    seconds: float = 0.0


# --------------------------------------------------------------------------- small pure helpers
def trial_paths(run_dir: str, trial_id: str) -> RunPaths:
    """<run>/trials/<trial id>/ laid out like a run directory (data/, checkpoints/, model/, eval/)."""
    return RunPaths(storage.join(run_dir, "trials"), trial_id)


def trial_need(cfg: ExperimentConfig) -> dict[str, float]:
    """Resources one running trial holds: its Train workers plus its driver actor."""
    t = cfg.train
    return {"CPU": t.workers * t.cpus_per_worker + TRIAL_DRIVER_CPU, "GPU": float(t.workers) if t.use_gpu else 0.0}


def max_concurrent(cfg: ExperimentConfig, cluster: dict[str, float]) -> int:
    """tune.max_concurrent_trials, else as many trials as the cluster runs at once with
    DATA_CPU_HEADROOM CPUs left for Ray Data (at least 1, at most num_samples)."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    need = trial_need(cfg)
    n = int((float(cluster.get("CPU", 0)) - DATA_CPU_HEADROOM) // need["CPU"])
    if need["GPU"]:
        n = min(n, int(float(cluster.get("GPU", 0)) // need["GPU"]))
    return max(1, min(n, cfg.tune.num_samples))


def report_schedule(cfg: ExperimentConfig) -> dict[str, Any]:
    """When trials evaluate the proxy (a forward pass over the held-out set): every
    tune.report_every steps when set; else exactly at ASHA's rungs (grace_period ·
    reduction_factor^k steps), where its decisions are made; FIFO needs only the end. The
    end of every stage (and every checkpoint) reports anyway."""
    if cfg.tune.report_every:
        return {"every": cfg.tune.report_every, "milestones": []}
    if cfg.tune.scheduler != "asha":
        return {"every": 0, "milestones": []}
    rungs, t = [], cfg.tune.grace_period
    while t <= ASHA_MAX_T:
        rungs.append(t)
        t *= cfg.tune.reduction_factor
    return {"every": 0, "milestones": rungs}


def rank_trials(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Trials best first: those that trained to the end (by their final metric) before those
    ASHA stopped or that failed (a stopped trial's early number is not a trained model's)."""
    sign = -1.0 if mode == "max" else 1.0

    def key(r: dict[str, Any]) -> tuple:
        v = r.get("metrics", {}).get(metric)
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        return (not r.get("completed"), not ok, sign * v if ok else 0.0, r.get("trial_id", ""))

    return sorted(rows, key=key)


# --------------------------------------------------------------------------- held-out proxy data
def _ensure_base_data(cfg: ExperimentConfig, paths: RunPaths):
    """The base config's samples under <run>/data (reused when the manifest matches)."""
    from derta.data import pipeline as DP

    manifest = DP.read_manifest(paths)
    if manifest is None or manifest.fingerprint != DP.data_fingerprint(cfg):
        manifest = DP.build(cfg, paths)
    return manifest


def heldout_safety_rows(cfg: ExperimentConfig, paths: RunPaths, base_built: bool) -> list[dict[str, Any]]:
    """The data stage's held-out safety triples (data.holdout of the safety source, split by
    a hash of the row id that no searched key changes): paths.heldout after a base build, else
    the same split from the data stage's scan pass."""
    from derta.data import generate
    from derta.data import pipeline as DP

    if base_built or generate.wanted(cfg):
        if not base_built:
            _ensure_base_data(cfg, paths)
        return storage.read_jsonl(paths.heldout) if storage.exists_file(paths.heldout) else []
    return list(DP.make_plan(cfg).heldout_rows)


def heldout_helpful_rows(cfg: ExperimentConfig, limit: int) -> list[dict[str, Any]]:
    """Held-out helpful pairs. builtin:demo: the demo's held-out split (tasks never trained
    on). Other sources: the rows the data stage's held-out rule would pick (hash of the row id
    < data.holdout, first `limit` by hash). The data stage holds out safety rows only, so for
    these sources the rows are also in the training mix: the NLL then measures how well
    helpful behaviour is kept rather than generalisation."""
    src = cfg.data.helpful
    if src is None:
        return []
    if src.uri == "builtin:demo":
        from derta.demo import helpful_pairs

        return [{"query": h.query, "response": h.response, "source_id": f"demo-heldout:{i}"}
                for i, h in enumerate(helpful_pairs("heldout"))][:limit]
    import pyarrow as pa

    from derta.data import sources as S
    from derta.data.pipeline import HOLDOUT_SALT
    from derta.data.prefix import row_uniform

    frac = cfg.data.holdout or 0.1
    spec = S.resolve(src, "helpful")

    def pick(batch: pa.Table) -> pa.Table:
        rows = [r for r in batch.select(["source_id", "error", "query", "response"]).to_pylist()
                if r["error"] is None and r["query"] and r["response"]]
        u = [row_uniform("", r["source_id"], HOLDOUT_SALT) for r in rows]
        keep = [(x, r) for x, r in zip(u, rows) if x < frac]
        return pa.table({"u": [x for x, _ in keep], "source_id": [r["source_id"] for _, r in keep],
                         "query": [r["query"] for _, r in keep], "response": [r["response"] for _, r in keep]},
                        schema=pa.schema([("u", pa.float64()), ("source_id", pa.string()), ("query", pa.string()),
                                          ("response", pa.string())]))

    rows = S.read_records(spec).map_batches(pick, batch_format="pyarrow").take_all()
    rows.sort(key=lambda r: r["u"])
    return [{"query": r["query"], "response": r["response"], "source_id": r["source_id"]} for r in rows[:limit]]


def prepare_proxy(cfg: ExperimentConfig, paths: RunPaths, tune_dir: str, base_built: bool) -> dict[str, Any]:
    """The proxy spec every trial's loop gets: held-out samples tokenized with the training
    template, fixed for the whole search (cached at <run>/tune/proxy_heldout.json, so a
    restored search scores its new trials on exactly the same data)."""
    from derta.data.pipeline import pad_token_id
    from derta.data.templates import make_template
    from derta.models import load_tokenizer
    from derta.tune.proxy import ProxySet, build_proxy_set

    cache = storage.join(tune_dir, "proxy_heldout.json")
    if storage.exists_file(cache):
        ps = ProxySet.from_dict(storage.read_json(cache))
    else:
        n = cfg.tune.proxy_samples
        safety = heldout_safety_rows(cfg, paths, base_built)
        if not safety:
            raise ConfigError(
                "tune: the proxy objective needs held-out safety triples, but data.holdout gives none "
                f"(data.holdout={cfg.data.holdout}); set data.holdout > 0")
        helpful = heldout_helpful_rows(cfg, n)
        template = make_template(cfg.data.template, load_tokenizer(cfg.model))
        ps = build_proxy_set(template, cfg.data, safety, helpful, pad_token_id(cfg), limit=n)
        if not ps.safety:
            raise ConfigError(f"tune: no held-out safety triple fits data.max_len={cfg.data.max_len}")
        storage.write_json(cache, ps.to_dict())
    return {**report_schedule(cfg), "batch_size": cfg.train.micro_batch, **ps.to_dict()}


def training_datasets(cfg: ExperimentConfig, paths: RunPaths, manifest) -> dict[str, Any]:
    """Training rows per trainer stage, materialized (object store) when small, so that the
    pipeline (read, shuffle, pack) runs once instead of once for the trainer's row count and
    again for ingest. Built once for all trials that keep the base data, else per trial."""
    from derta.data.pipeline import training_dataset
    from derta.train.trainer import plan_stages

    approx = manifest.num_samples * cfg.data.max_len * 25  # int64 ids/labels/positions + mask
    out: dict[str, Any] = {}
    for st in plan_stages(cfg):
        ds = training_dataset(cfg, paths, kinds=st["kinds"], rto_end=True)  # the trainer's rows exactly
        ds = ds.select_columns(["input_ids", "labels", "rto_mask", "position_ids"])
        out[st["dataset"]] = ds.materialize() if approx <= SHARE_MATERIALIZE_MAX_BYTES else ds
    return out


# --------------------------------------------------------------------------- MLflow
def _tracker(t: dict[str, Any]):
    from derta.tracking import Tracker

    return Tracker(t["tracking_uri"], t["experiment"])


def find_trial_run(tracker, parent_run_id: str, trial_id: str) -> str | None:
    """The nested run of a trial (a restarted trial logs into the run it started)."""
    exp = tracker.experiment_id
    runs = tracker.client.search_runs(
        [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`tune.trial_id` = '{trial_id}'",
        max_results=1)
    return runs[0].info.run_id if runs else None


def trial_run(t: dict[str, Any] | None, trial_id: str, params: dict[str, Any] | None = None,
              tags: dict[str, Any] | None = None) -> str | None:
    """Find or create a trial's nested run under the tune parent run; None when tracking is
    off or unreachable (tracking never fails a trial)."""
    if not t or not t.get("parent_run_id"):
        return None
    try:
        tracker = _tracker(t)
        run_id = find_trial_run(tracker, t["parent_run_id"], trial_id)
        if run_id is None:
            run_id = tracker.start_run(f"trial-{trial_id}", parent_run_id=t["parent_run_id"],
                                       tags={"tune.trial_id": trial_id, "verb": "tune-trial", **(tags or {})})
        if params:
            with tracker.attach(run_id):
                tracker.log_params({f"tune.{k}": v for k, v in params.items()})
        return run_id
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow: no run for trial %s: %s", trial_id, e)
        return None


_DRIVER_TRACKING: dict[str, Any] = {}


def _tune_callback_cls():
    from ray.tune import Callback

    class TrialTracking(Callback):
        """Driver side, when a trial ends: removes the resume state of a trial ASHA stopped
        (it will never resume) and closes its nested MLflow run with the outcome (the trial's
        actor may have been killed before it could)."""

        def __init__(self, tracking: dict[str, Any] | None, run_dir: str, metric: str):
            from derta.tune import tuner  # by reference: see `tracking`

            tuner._DRIVER_TRACKING["handle"] = tracking
            self.run_dir = run_dir
            self.metric = metric

        @property
        def tracking(self) -> dict[str, Any] | None:
            # Kept in the driver, not on the callback: Tune pickles its callbacks into
            # tuner.pkl, and a tracking URI may carry a password. run_tune sets it per session.
            # The module is imported here, not named as a global: this class is defined in a
            # function, so cloudpickle pickles it by value with every global its methods name
            # (the dict itself, tracking URI included, would land in tuner.pkl).
            from derta.tune import tuner

            return tuner._DRIVER_TRACKING.get("handle")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._finish(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._finish(trial, "FAILED")

        def _finish(self, trial, status: str) -> None:
            tpaths = trial_paths(self.run_dir, trial.trial_id)
            completed = storage.exists_file(storage.join(tpaths.dir, DONE_FILE))
            if not completed:
                _stop_worker_group(tpaths)
            if not completed and status == "FINISHED":
                try:
                    storage.delete(tpaths.checkpoints)
                except Exception as e:  # noqa: BLE001
                    log.warning("trial %s: checkpoints not removed: %s", trial.trial_id, e)
            if not self.tracking:
                return
            try:
                run_id = trial_run(self.tracking, trial.trial_id, trial.config)
                if run_id is None:
                    return
                tracker = _tracker(self.tracking)
                last = trial.last_result or {}
                outcome = "completed" if completed else ("error" if status == "FAILED" else "early_stopped")
                with tracker.attach(run_id):
                    tracker.set_tags({"tune.outcome": outcome, "tune.early_stopped": str(outcome == "early_stopped").lower()})
                    final = {f"final_{k}": last[k] for k in (*PROXY_KEYS, "step")
                             if isinstance(last.get(k), (int, float)) and math.isfinite(last[k])}
                    tracker.log_metrics(final, step=int(last.get("step") or 0))
                tracker.client.set_terminated(run_id, status=status)
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow: trial %s not closed: %s", trial.trial_id, e)

    return TrialTracking


# --------------------------------------------------------------------------- the trial driver
def _report_callback():
    """Train's TuneReportCallback, with the loop's final-report key `done` renamed
    `train_done`: Tune reads `done` as "this trial is over" and would stop the trial actor
    (and with it the Train run) before the driver function returns."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            renamed = [{("train_done" if k == "done" else k): v for k, v in m.items()} for m in metrics]
            super().after_report(run_context, renamed, checkpoint)

    return ReportToTune()


class TrialJanitor:
    """A detached actor that removes a trial's Train worker placement group when the trial
    actor dies without Train shutting down (ASHA stops it, Ctrl+C, a crash).

    Ray Train's own cleaner for that case asks the state API (the dashboard) whether its
    controller is alive; on a cluster started without a dashboard (the local default) it never
    fires, the stopped trial's workers' CPUs/GPUs stay reserved and later trials wait forever.
    This janitor needs no dashboard: it holds a call on the trial actor, which fails when the
    actor dies. Workers register the group (`register_worker_group`); the trial releases the
    janitor when its Train run ended normally."""

    def __init__(self, trial_actor: Any):
        self.trial = trial_actor
        self.groups: list[Any] = []
        self.released = False

    def register(self, pg: Any) -> None:
        if all(pg.id != g.id for g in self.groups):
            self.groups.append(pg)
            print(f"[derta.tune] janitor: watching worker group {pg.id.hex()}", flush=True)

    def release(self) -> None:
        self.released = True

    def remove_now(self) -> int:
        """The trial is being stopped (ASHA, Ctrl+C): end its Train run at once by removing its
        worker group (the workers die, fit() returns, the trial actor can exit)."""
        from ray.util.placement_group import remove_placement_group

        removed = 0
        for pg in self.groups:
            try:
                remove_placement_group(pg)
                removed += 1
            except Exception:  # noqa: BLE001 - already removed
                pass
        self.groups = []
        print(f"[derta.tune] janitor: trial stopped, {removed} worker group(s) removed", flush=True)
        return removed

    def watch(self) -> int:
        """Runs until the trial actor is gone or released the janitor; returns groups removed."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.util.placement_group import remove_placement_group

        while not self.released:
            try:
                ray.get(self.trial.__ray_ready__.remote())
            except ActorUnavailableError:  # restarting or unreachable for a moment: ask again
                pass
            except RayActorError:  # the trial actor is gone
                break
            time.sleep(1.0)
        removed = 0
        if not self.released:
            for pg in self.groups:
                try:
                    remove_placement_group(pg)
                    removed += 1
                except Exception as e:  # noqa: BLE001 - already removed
                    print(f"[derta.tune] janitor: {pg.id.hex()} not removed: {e}", flush=True)
        print(f"[derta.tune] janitor: trial {'finished' if self.released else 'gone'}, "
              f"{removed} worker group(s) removed", flush=True)
        try:
            ray.actor.exit_actor()
        except Exception:  # noqa: BLE001
            pass
        return removed


def _start_janitor(trial_id: str) -> tuple[Any, str, str]:
    import uuid

    import ray

    name = f"derta-tune-janitor-{trial_id}-{uuid.uuid4().hex[:8]}"
    namespace = ray.get_runtime_context().namespace
    actor = ray.remote(num_cpus=0, max_concurrency=4)(TrialJanitor).options(
        name=name, lifetime="detached").remote(ray.get_runtime_context().current_actor)
    actor.watch.remote()
    return actor, name, namespace


def _stop_worker_group(tpaths: RunPaths) -> None:
    """Driver side, when Tune ended a trial that did not finish training (ASHA stopped it):
    have its janitor end the Train run now (see _on_tune_stop for why it would linger)."""
    uri = storage.join(tpaths.dir, JANITOR_FILE)
    try:
        if storage.exists_file(uri):
            import ray

            j = storage.read_json(uri)
            ray.get_actor(j["name"], namespace=j.get("namespace")).remove_now.remote()
    except Exception:  # noqa: BLE001 - the janitor is gone: nothing left to release
        pass


def register_worker_group(spec: dict[str, Any]) -> None:
    """On a Train worker of a Tune trial: hand this worker group's placement group to the
    trial's janitor (best effort; see TrialJanitor)."""
    if not spec.get("janitor"):
        return
    try:
        import ray

        pg = ray.util.get_current_placement_group()
        if pg is not None:
            janitor = ray.get_actor(spec["janitor"], namespace=spec.get("janitor_namespace"))
            ray.get(janitor.register.remote(pg), timeout=60)
    except Exception as e:  # noqa: BLE001
        print(f"[derta.tune] worker group not registered for cleanup: {e}", flush=True)


def _on_tune_stop(action) -> Any:
    """Run `action` once Tune asks this trial to stop; returns the stop event (None when it
    cannot be found). Tune stops a function trial by setting its session's stop event and
    then waits (up to TUNE_FORCE_TRIAL_CLEANUP_S, 600 s) for the function to return, which a
    trial blocked in TorchTrainer.fit() never does by itself: its workers would keep their
    CPUs/GPUs for ten minutes after ASHA stopped it. (The session is Ray-internal: without it
    the janitor still frees the group when the actor is finally killed.)"""
    import threading

    try:
        from ray.train._internal.session import get_session

        event = get_session().stop_event
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(event, threading.Event):
        return None

    def watch() -> None:
        event.wait()
        try:
            action()
        except Exception:  # noqa: BLE001
            pass

    threading.Thread(target=watch, name="derta-tune-stop", daemon=True).start()
    return event


def run_trial(config: dict[str, Any], ctx: dict[str, Any], datasets: dict[str, Any] | None = None) -> None:
    """One Tune trial: base config + sampled point -> data -> a full Ray Train run whose loop
    reports the proxy objective to Tune (via Train's TuneReportCallback)."""
    from ray import tune

    from derta.tracking import TrackingHandle
    from derta.train.trainer import train

    from derta.security import unseal_keys

    ctx = unseal_keys(ctx)  # experiment, tracking and env come sealed (see run_tune)
    for k, v in (ctx.get("env") or {}).items():
        os.environ.setdefault(k, v)
    trial_id = tune.get_context().get_trial_id()
    cfg = apply_params(ExperimentConfig.model_validate(ctx["experiment"]), config)
    tpaths = trial_paths(ctx["run_dir"], trial_id)
    storage.write_text(tpaths.config, dump_yaml(cfg.redacted()))
    run_id = trial_run(ctx.get("tracking"), trial_id, config, tags={"run_dir": tpaths.dir})
    t = ctx.get("tracking") or {}
    handle = TrackingHandle(t["tracking_uri"], t["experiment"], run_id) if run_id else None
    if datasets is None:  # this trial's point changes the samples: its own data build
        from derta.data import pipeline as DP

        manifest = DP.read_manifest(tpaths)
        if manifest is None or manifest.fingerprint != DP.data_fingerprint(cfg):
            manifest = DP.build(cfg, tpaths)
        if handle is not None:
            try:
                with handle.attached() as tr:
                    tr.log_metrics(manifest.metrics())
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow: data metrics not logged: %s", e)
        datasets = training_datasets(cfg, tpaths, manifest)
    janitor, name, namespace = _start_janitor(trial_id)
    storage.write_json(storage.join(tpaths.dir, JANITOR_FILE), {"name": name, "namespace": namespace})
    proxy = {**ctx["proxy"], "janitor": name, "janitor_namespace": namespace}
    finished = False
    stopping = _on_tune_stop(lambda: None if finished else janitor.remove_now.remote())
    try:
        result = train(cfg, tpaths, handle, datasets=datasets, callbacks=[_report_callback()], proxy=proxy,
                       export=bool(ctx.get("export")))
    except Exception:
        if stopping is not None and stopping.is_set():
            return  # stopped by Tune (ASHA, Ctrl+C): the Train run was ended on purpose
        raise  # the janitor removes the group once this actor is gone (a no-op when Train did)
    finished = True
    # Released only now: were the trial being torn down, fit() would have raised above, and a
    # release then would beat the janitor to it.
    janitor.release.remote()
    storage.write_json(storage.join(tpaths.dir, DONE_FILE), {
        "trial_id": trial_id, "steps": result.steps, "model_dir": tpaths.model if ctx.get("export") else None,
        "metrics": result.final_metrics})  # fmt: skip
    if storage.exists(tpaths.checkpoints):
        storage.delete(tpaths.checkpoints)  # resume state of a finished trial: no longer needed


# --------------------------------------------------------------------------- the search
def _searcher(cfg: ExperimentConfig, seed: int, max_concurrent: int):
    """Optuna (TPE, a Searcher: Tune limits its concurrency) or seeded random sampling (a
    SearchAlgorithm, which takes the concurrency limit itself)."""
    if cfg.tune.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def _scheduler(cfg: ExperimentConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", max_t=ASHA_MAX_T, grace_period=cfg.tune.grace_period,
                         reduction_factor=cfg.tune.reduction_factor, stop_last_trials=False)


def _trial_dirname(trial) -> str:
    return trial.trial_id


@contextlib.contextmanager
def _parent_run(cfg: ExperimentConfig, paths: RunPaths, tune_dir: str) -> Iterator[tuple[Any, str | None, dict[str, str]]]:
    """The tune parent run for the block: the one a previous session of this search opened
    (reopened), else a new one. Yields (tracker, run id | None, outcome): the block sets
    outcome["status"] (FINISHED, or KILLED for an interrupted search); FAILED if it raises."""
    from derta.pipeline import _tags, make_tracker

    tracker = make_tracker(cfg)
    outcome = {"status": "FAILED"}
    if not tracker.enabled:
        yield tracker, None, outcome
        return
    state_uri = storage.join(tune_dir, "state.json")
    run_id = (storage.read_json(state_uri) if storage.exists_file(state_uri) else {}).get("parent_run_id")
    if run_id:
        try:
            tracker.client.update_run(run_id, status="RUNNING")
        except Exception as e:  # noqa: BLE001 - e.g. another tracking store now: start afresh
            log.warning("MLflow: parent run %s not reopened (%s); starting a new one", run_id, e)
            run_id = None
    if not run_id:
        run_id = tracker.client.create_run(tracker.experiment_id, run_name=f"{paths.name}-tune").info.run_id
        storage.write_json(state_uri, {"parent_run_id": run_id, "tracking_uri": redact_text(tracker.tracking_uri)})
        with tracker.attach(run_id):
            tracker.set_tags({**_tags(cfg), "verb": "tune", "run_dir": paths.dir})
            tracker.log_params(cfg.redacted())
    try:
        with tracker.attach(run_id):
            yield tracker, run_id, outcome
    finally:
        try:
            tracker.client.set_terminated(run_id, status=outcome["status"])
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow: tune run not closed: %s", e)


def _trial_rows(results, run_dir: str) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        m = r.metrics or {}
        tid = m.get("trial_id") or os.path.basename(str(r.path).rstrip("/"))
        done_uri = storage.join(trial_paths(run_dir, tid).dir, DONE_FILE)
        done = storage.read_json(done_uri) if storage.exists_file(done_uri) else None
        rows.append({
            "trial_id": tid, "params": dict(r.config or {}), "completed": done is not None,
            "status": "error" if r.error else ("completed" if done else "early_stopped"),
            "error": str(r.error)[:500] if r.error else None,
            "steps": int(m.get("step") or 0),
            "metrics": {k: float(v) for k, v in m.items() if k in (*PROXY_KEYS, "loss", "loss_mle", "loss_rto")
                        and isinstance(v, (int, float))},
            "model_dir": (done or {}).get("model_dir"),
        })  # fmt: skip
    return rows


def _fit(tuner):
    """Tuner.fit, leaving the process's SIGINT handler as it found it (Tune installs its own
    to stop a search cleanly on Ctrl+C and does not put the previous one back)."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        return tuner.fit()
    finally:
        if main and before is not None:
            signal.signal(signal.SIGINT, before)


def run_tune(cfg: ExperimentConfig, callbacks: list[Any] | None = None) -> TuneSummary:
    """`derta tune`: search, then write and print the best config (see the module doc).

    callbacks: extra ray.tune Callbacks for a new search (progress hooks, tests); a restored
    search keeps the callbacks it was started with (Tune stores them with its state)."""
    from ray import tune

    from derta.cluster import ensure_ray
    from derta.pipeline import console, run_paths
    from derta.security import keep_secrets_out_of_tune_runtime_envs, sealed
    from derta.train.trainer import WORKER_ENV

    t0 = time.perf_counter()
    dims = space_dims(cfg)  # a bad space fails before anything starts
    paths = run_paths(cfg)
    tune_dir = storage.join(paths.dir, "tune")
    if not storage.is_s3(tune_dir):
        tune_dir = os.path.abspath(tune_dir)
    console.print(f"[bold]DeRTa tune[/bold] {paths.name}: {cfg.tune.num_samples} trials, {cfg.tune.search_alg} search, "
                  f"{cfg.tune.scheduler} scheduler, {cfg.tune.metric} ({cfg.tune.mode})")
    console.print("search space: " + ", ".join(f"{k} ~ {d.sampler}" for k, d in dims.items()))
    ensure_ray(cfg)
    import ray

    storage.write_text(paths.config, dump_yaml(cfg.redacted()))
    with _parent_run(cfg, paths, tune_dir) as (tracker, parent, outcome):
        shares = not changes_data(dims)
        manifest = _ensure_base_data(cfg, paths) if shares else None
        proxy = prepare_proxy(cfg, paths, tune_dir, base_built=shares)
        datasets = training_datasets(cfg, paths, manifest) if shares else None
        run_dir = paths.dir if storage.is_s3(paths.dir) else os.path.abspath(paths.dir)
        tracking = ({"tracking_uri": tracker.tracking_uri, "experiment": tracker.experiment, "parent_run_id": parent}
                    if parent else None)
        ctx = {"experiment": cfg.to_dict(), "run_dir": run_dir, "proxy": proxy, "tracking": tracking,
               "export": cfg.tune.top_n_full_eval > 0, "env": {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}}
        # The unredacted config, tracking URI and worker env stay in the cluster's memory (see
        # derta.security): with_parameters puts ctx in the object store, which spills to disk.
        keep_secrets_out_of_tune_runtime_envs()
        with sealed(ctx, SEALED_CTX) as ctx:
            trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx, datasets=datasets),
                                            {"CPU": TRIAL_DRIVER_CPU})
            n_conc = max_concurrent(cfg, ray.cluster_resources())
            # No keys in this filesystem: Tune pickles it into tuner.pkl under the run directory.
            fs, storage_path = storage.pyarrow_fs(tune_dir)
            exp_path = storage.join(tune_dir, EXPERIMENT)
            restore_path = exp_path if fs is None else f"{storage_path.rstrip('/')}/{EXPERIMENT}"  # a path inside fs
            restored = tune.Tuner.can_restore(restore_path, storage_filesystem=fs)
            _DRIVER_TRACKING["handle"] = tracking  # the restored callbacks read it (see TrialTracking)
            if restored:
                console.print(f"resuming the search saved at {exp_path}")
                tuner = tune.Tuner.restore(restore_path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                           restart_errored=False, storage_filesystem=fs)
            else:
                seed = cfg.tune.seed if cfg.tune.seed is not None else cfg.train.seed
                tuner = tune.Tuner(
                    trainable,
                    param_space=to_tune(dims),
                    tune_config=tune.TuneConfig(
                        metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                        search_alg=_searcher(cfg, seed, n_conc), scheduler=_scheduler(cfg),
                        max_concurrent_trials=None if cfg.tune.search_alg == "random" else n_conc,
                        trial_dirname_creator=_trial_dirname,
                    ),
                    run_config=tune.RunConfig(
                        name=EXPERIMENT, storage_path=storage_path, storage_filesystem=fs,
                        callbacks=[_tune_callback_cls()(tracking, run_dir, cfg.tune.metric), *(callbacks or [])],
                        failure_config=tune.FailureConfig(max_failures=0), verbose=1,
                    ),
                )  # fmt: skip
            when = (f"every {proxy['every']} steps" if proxy["every"] else
                    f"at steps {', '.join(map(str, proxy['milestones'][:4]))}, ..." if proxy["milestones"] else "at the end")
            console.print(f"up to {n_conc} trial(s) at a time; each: {cfg.train.workers} worker(s), proxy {when} "
                          f"on {len(proxy['safety'])} safety + {len(proxy['helpful'])} helpful held-out samples")
            results = _fit(tuner)
        rows = _trial_rows(results, run_dir)
        summary = TuneSummary(paths, exp_path, parent, rows, restored=restored)
        summary.interrupted = results.num_terminated + results.num_errors < cfg.tune.num_samples
        _finish(cfg, summary, tracker, tune_dir)
        summary.seconds = time.perf_counter() - t0
        outcome["status"] = "KILLED" if summary.interrupted else "FINISHED"
    print_summary(cfg, summary)
    return summary


def _finish(cfg: ExperimentConfig, s: TuneSummary, tracker: Any, tune_dir: str) -> None:
    """Best config (YAML), top-N full evaluation, trials.json and the parent run's summary."""
    ranked = rank_trials(s.trials, cfg.tune.metric, cfg.tune.mode)
    for i, r in enumerate(ranked):
        r["rank"] = i + 1
    s.trials = ranked
    best = next((r for r in ranked if cfg.tune.metric in r["metrics"]), None)
    if best is not None:
        s.best = best
        s.best_config = apply_params(cfg, best["params"])
        out = s.best_config.model_copy(deep=True)
        out.storage.run_name = None
        header = (f"# derta tune: best of {len(ranked)} trial(s) of run {s.paths.name}: trial {best['trial_id']} "
                  f"({best['status']}), {cfg.tune.metric} = {best['metrics'][cfg.tune.metric]:.4f}\n"
                  f"# searched: {', '.join(f'{k}={v}' for k, v in sorted(best['params'].items()))}\n")
        s.best_config_path = storage.join(tune_dir, "best_config.yaml")
        storage.write_text(s.best_config_path, header + dump_yaml(out.redacted()))
    if cfg.tune.top_n_full_eval and not s.interrupted:
        _full_eval(cfg, s, tracker, [r for r in ranked if r["completed"]][: cfg.tune.top_n_full_eval])
    storage.write_json(storage.join(tune_dir, "trials.json"), {"interrupted": s.interrupted, "trials": ranked})
    if s.parent_run_id:
        try:
            if best is not None:
                tracker.log_params({f"best.{k}": v for k, v in best["params"].items()} | {"best.trial_id": best["trial_id"]})
                tracker.log_metrics({f"best_{k}": v for k, v in best["metrics"].items()})
                tracker.log_artifact(s.best_config_path)
            tracker.log_metrics({"trials_completed": sum(r["completed"] for r in ranked),
                                 "trials_early_stopped": sum(r["status"] == "early_stopped" for r in ranked),
                                 "trials_failed": sum(r["status"] == "error" for r in ranked)})
            tracker.log_table([{"trial_id": r["trial_id"], "rank": r["rank"], "status": r["status"], "steps": r["steps"],
                                **{f"param.{k}": v for k, v in r["params"].items()}, **r["metrics"],
                                **{f"eval.{k}": v for k, v in (r.get("eval") or {}).items()}} for r in ranked], "tune_trials")
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow: tune summary not logged: %s", e)


def _full_eval(cfg: ExperimentConfig, s: TuneSummary, tracker: Any, top: list[dict[str, Any]]) -> None:
    """derta.eval on the exported models of the best trials (into their nested runs)."""
    from derta.eval.runner import evaluate
    from derta.pipeline import _headline
    from derta.tracking import TrackingHandle

    tracking = ({"tracking_uri": tracker.tracking_uri, "experiment": tracker.experiment, "parent_run_id": s.parent_run_id}
                if s.parent_run_id else None)
    run_dir = s.paths.dir if storage.is_s3(s.paths.dir) else os.path.abspath(s.paths.dir)
    for r in top:
        tpaths = trial_paths(run_dir, r["trial_id"])
        if not r.get("model_dir") or not storage.exists(storage.join(r["model_dir"], "config.json")):
            r["eval"] = None
            continue
        tcfg = apply_params(cfg, r["params"])
        run_id = trial_run(tracking, r["trial_id"])
        handle = TrackingHandle(tracker.tracking_uri, tracker.experiment, run_id) if run_id else None
        res = evaluate(tcfg, tpaths, r["model_dir"], handle)
        r["eval"] = _headline(res.metrics)


def _short(key: str) -> str:
    return key.split(".", 1)[1] if key.count(".") > 1 else key.rsplit(".", 1)[-1]


def print_summary(cfg: ExperimentConfig, s: TuneSummary) -> None:
    from rich.table import Table

    from derta.pipeline import console

    metric = cfg.tune.metric
    evals = any(r.get("eval") for r in s.trials)
    table = Table(title=f"derta tune: {s.paths.name}")
    for col in ("rank", "trial", "status", "steps", metric, *(["ASR mean"] if evals else []), "params"):
        table.add_column(col, overflow="fold")
    for r in s.trials:
        m = r["metrics"]
        asr = [f"{r['eval']['asr_mean']:.1f}" if (r.get("eval") or {}).get("asr_mean") is not None else "-"] if evals else []
        params = ", ".join(f"{_short(k)}={v:.3g}" if isinstance(v, float) else f"{_short(k)}={v}" for k, v in sorted(r["params"].items()))
        table.add_row(str(r["rank"]), r["trial_id"], r["status"], str(r["steps"]), f"{m[metric]:.4f}" if metric in m else "-",
                      *asr, params)
    console.print(table)
    if s.interrupted:
        console.print(f"[yellow]search interrupted: {len(s.trials)} of {cfg.tune.num_samples} trial(s) have results. "
                      f"Run the same `derta tune` again (storage.run_name={s.paths.name}) to resume it.")
    if s.best_config_path:
        console.print(f"best config ({s.best['trial_id']}, {metric} = {s.best['metrics'][metric]:.4f}): {s.best_config_path}")
        console.print(storage.read_text(s.best_config_path), markup=False, highlight=False, soft_wrap=True)
    console.print(f"all trials: {storage.join(s.paths.dir, 'tune', 'trials.json')}   Tune experiment: {s.experiment_path}   "
                  f"({s.seconds:.0f}s)")
