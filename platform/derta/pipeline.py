"""Orchestration: data -> train -> eval -> report, each a nested MLflow run under one parent.

Each stage reads what the previous one stored under the run directory, so every verb
(`derta data build`, `train`, `eval`, `report`) can also run alone on an existing run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

from derta.rerun import resolve_rerun
from derta.security import RedactingConsole, check_services
from rich.table import Table

from derta import storage
from derta.cluster import ensure_ray, ray_logs_dir
from derta.config import ExperimentConfig, dump_yaml
from derta.paths import RunPaths
from derta.tracking import Tracker, TrackingHandle

console = RedactingConsole(stderr=False, highlight=False)  # no secret on screen (derta.security)


@dataclass
class RunSummary:
    paths: RunPaths
    tracking_uri: str
    parent_run_id: str | None
    model_dir: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- run setup
def run_paths(cfg: ExperimentConfig, rerun_check: bool = True) -> RunPaths:
    """The run's paths; a run without a name gets `<method>-<UTC timestamp>` (set once).
    rerun_check=False for verbs that only read a run (report)."""
    if not storage.is_s3(cfg.storage.root) and not os.path.isabs(cfg.storage.root):
        # Ray workers and actors run in other directories: hand them absolute paths.
        cfg.storage.root = os.path.abspath(cfg.storage.root)
    if cfg.storage.run_name is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        cfg.storage.run_name = f"{cfg.train.method}-{stamp}"
    check_services(cfg)  # S3 endpoint / tracking store answer in seconds, else exit 2
    paths = RunPaths(cfg.storage.root, cfg.storage.run_name)
    return resolve_rerun(cfg, paths) if rerun_check else paths  # same name, other config: exit 2


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The platform's commit (asked in the package's directory, so it is found whatever the cwd)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def make_tracker(cfg: ExperimentConfig) -> Tracker:
    return Tracker.for_root(cfg.storage.root, cfg.tracking.experiment, cfg.tracking.uri, cfg.tracking.enabled)


def _tags(cfg: ExperimentConfig) -> dict[str, Any]:
    """Tags on the parent run and every stage run, so MLflow can filter any of them by these."""
    tags = {"method": cfg.train.method, "model": cfg.model.name_or_path, "schedule": cfg.train.schedule,
            "config_fingerprint": cfg.fingerprint()}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    return tags


@contextlib.contextmanager
def parent_run(cfg: ExperimentConfig, paths: RunPaths, verb: str, parent_run_id: str | None = None,
                tracker: Tracker | None = None) -> Iterator[tuple[Tracker, str | None]]:
    """The run that holds a verb's stages (nested under parent_run_id when an experiment runs
    several): the config is written to the run directory and logged as params. The same verb
    on the same run directory again (a resumed run) reopens that MLflow run: one per run name."""
    tracker = tracker or make_tracker(cfg)
    storage.write_text(paths.config, dump_yaml(cfg.redacted()))
    with tracker.run(paths.name, parent_run_id=parent_run_id, tags={**_tags(cfg), "verb": verb, "run_dir": paths.dir},
                     reuse={"verb": verb, "run_dir": paths.dir}) as run_id:
        tracker.log_params(cfg.redacted(), new_only=True)
        tracker.log_artifact(paths.config)
        yield tracker, run_id


@contextlib.contextmanager
def _stage(tracker: Tracker, parent: str | None, name: str, timings: dict[str, float],
           cfg: ExperimentConfig | None = None, label: str | None = None) -> Iterator[TrackingHandle]:
    shown = f"{name} ({label})" if label else name  # an experiment's arms each run every stage
    console.rule(f"[bold]{shown}")
    start = time.perf_counter()
    tags = {**(_tags(cfg) if cfg is not None else {}), "stage": name}
    with tracker.run(name, parent_run_id=parent, tags=tags) as run_id:
        yield TrackingHandle.of(tracker, run_id)
    timings[name] = time.perf_counter() - start
    console.print(f"[green]{shown} done in {timings[name]:.1f}s")


# --------------------------------------------------------------------------- stages
def _build(cfg: ExperimentConfig, paths: RunPaths, handle: TrackingHandle) -> None:
    from derta.data.pipeline import build

    t0 = time.perf_counter()
    manifest = build(cfg, paths)
    secs = max(time.perf_counter() - t0, 1e-9)
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(manifest.counts.items()))
    tokens = manifest.tokens.get("total")
    console.print(f"[derta.data] {manifest.num_samples} samples ({kinds}) in {secs:.1f}s: "
                  f"{manifest.num_samples / secs:,.0f} samples/s"
                  + (f", {tokens / secs:,.0f} tokens/s" if tokens else ""), markup=False, soft_wrap=True)
    with handle.attached() as t:
        t.log_artifact(paths.manifest)
        t.log_metrics(manifest.metrics())


def _ensure_data(cfg: ExperimentConfig, paths: RunPaths, handle: TrackingHandle) -> None:
    if storage.exists(paths.manifest):
        console.print(f"using transition samples in {paths.data}")
    else:
        _build(cfg, paths, handle)


def _train(cfg: ExperimentConfig, paths: RunPaths, handle: TrackingHandle) -> str:
    from derta.train.trainer import train

    result = train(cfg, paths, handle)
    with handle.attached() as t:
        t.set_tags({"model_dir": result.model_dir})
    log_model(cfg, handle, result.model_dir)
    return result.model_dir


MODEL_LOG_MAX_BYTES = 512 * 1024 * 1024  # local models up to this size are copied into MLflow whole
MODEL_META_FILES = ("config.json", "generation_config.json", "adapter_config.json", "tokenizer_config.json",
                    "special_tokens_map.json")


def registered_model_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.tracking.experiment}-{cfg.train.method}"


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def log_model(cfg: ExperimentConfig, handle: TrackingHandle, model_dir: str) -> str | None:
    """Log the final model to the train run and register a version of `registered_model_name`.

    A small local model is logged whole under the run's `model/` artifacts; a large or s3://
    one only by its metadata files, and the registered version points at model_dir itself, so
    70B weights are never copied. Returns "name/version", or None when tracking is off or the
    store has no registry (a warning, never a failed run).
    """
    if not handle.run_id or not storage.exists(model_dir):
        return None
    try:
        from mlflow.exceptions import MlflowException

        with handle.attached() as t:
            whole = not storage.is_s3(model_dir) and _dir_bytes(model_dir) <= MODEL_LOG_MAX_BYTES
            if whole:
                t.log_artifact(model_dir, "model")
            else:
                for f in MODEL_META_FILES:
                    if storage.exists(storage.join(model_dir, f)):
                        t.log_artifact(storage.join(model_dir, f), "model")
            client, name = t.client, registered_model_name(cfg)
            try:
                client.create_registered_model(name, tags={"method": cfg.train.method}, description=(
                    f"DeRTa ({cfg.train.method}) fine-tunes of {cfg.model.name_or_path}, experiment {cfg.tracking.experiment}"))
            except MlflowException as e:
                if "RESOURCE_ALREADY_EXISTS" not in str(getattr(e, "error_code", "")) + str(e):
                    raise
            tags = {"method": cfg.train.method, "base_model": cfg.model.name_or_path, "model_dir": model_dir,
                    "run_name": cfg.storage.run_name or "", **({"git_commit": git_commit()} if git_commit() else {})}
            source = f"runs:/{handle.run_id}/model" if whole else model_dir
            try:
                mv = client.create_model_version(name, source=source, run_id=handle.run_id, tags=tags)
            except MlflowException:  # some servers refuse sources outside their artifact store
                mv = client.create_model_version(name, source=f"runs:/{handle.run_id}/model", run_id=handle.run_id, tags=tags)
            t.set_tags({"registered_model": f"{name}/{mv.version}"})
            return f"{name}/{mv.version}"
    except Exception as e:  # noqa: BLE001 - the model is on disk; tracking it is best effort
        console.print(f"[yellow]MLflow: model not logged/registered: {type(e).__name__}: {e}")
        return None


def _eval(cfg: ExperimentConfig, paths: RunPaths, model_dir: str, handle: TrackingHandle) -> dict[str, Any]:
    from derta.eval.runner import evaluate

    return evaluate(cfg, paths, model_dir, handle).metrics


def _report(cfg: ExperimentConfig, paths: RunPaths, tracker: Tracker, parent: str | None) -> str:
    from derta.report.html import write_report

    write_report(cfg, paths, tracker, parent)
    if parent:
        with tracker.attach(parent):
            tracker.log_artifact(paths.report)
    return paths.report


def trained_model_dir(cfg: ExperimentConfig, paths: RunPaths) -> str:
    """The run's exported model when it has one, else the configured base model."""
    if storage.exists(storage.join(paths.model, "config.json")):
        return paths.model
    return cfg.model.name_or_path


# --------------------------------------------------------------------------- verbs
def run_stages(cfg: ExperimentConfig, paths: RunPaths, tracker: Tracker, parent: str | None, *,
               evaluate: bool = True, label: str | None = None) -> RunSummary:
    """data -> train -> eval, each a run nested under `parent`; the headline metrics go on
    `parent`. The body of `derta run`, and of each arm of an experiment (`label`: the arm, shown
    on the console so no stage line reads the same twice)."""
    summary = RunSummary(paths, tracker.tracking_uri, parent)
    with _stage(tracker, parent, "data", summary.timings, cfg, label) as h:
        _build(cfg, paths, h)
    with _stage(tracker, parent, "train", summary.timings, cfg, label) as h:
        summary.model_dir = _train(cfg, paths, h)
    if evaluate:
        with _stage(tracker, parent, "eval", summary.timings, cfg, label) as h:
            summary.metrics = _eval(cfg, paths, summary.model_dir, h)
        with tracker.attach(parent):
            tracker.log_metrics(_headline(summary.metrics))
    return summary


def run_all(cfg: ExperimentConfig) -> RunSummary:
    """`derta run`: build data, train, evaluate, report; print results and where they are."""
    t0 = time.perf_counter()
    paths = run_paths(cfg)
    console.print(f"[bold]DeRTa run[/bold] {paths.name}  method={cfg.train.method}  model={cfg.model.name_or_path}")
    console.print(f"run directory: {paths.dir}")
    ensure_ray(cfg)
    with parent_run(cfg, paths, "run") as (tracker, parent):
        summary = run_stages(cfg, paths, tracker, parent)
        _report(cfg, paths, tracker, parent)
        _experiment_report(cfg, tracker)
        summary.timings["total"] = time.perf_counter() - t0
        with tracker.attach(parent):
            tracker.log_metrics({f"time_{k}_s": v for k, v in summary.timings.items()})
    print_summary(summary)
    return summary


def build_data(cfg: ExperimentConfig) -> None:
    paths = run_paths(cfg)
    ensure_ray(cfg)
    timings: dict[str, float] = {}
    with parent_run(cfg, paths, "data build") as (tracker, parent):
        with _stage(tracker, parent, "data", timings, cfg) as h:
            _build(cfg, paths, h)
    console.print(f"transition samples: {paths.data}  (run name: {paths.name})")


def train_only(cfg: ExperimentConfig) -> None:
    paths = run_paths(cfg)
    ensure_ray(cfg)
    timings: dict[str, float] = {}
    with parent_run(cfg, paths, "train") as (tracker, parent):
        with _stage(tracker, parent, "data", timings, cfg) as h:
            _ensure_data(cfg, paths, h)
        with _stage(tracker, parent, "train", timings, cfg) as h:
            model_dir = _train(cfg, paths, h)
    console.print(f"model: {model_dir}  (run name: {paths.name})")


def eval_only(cfg: ExperimentConfig) -> None:
    paths = run_paths(cfg)
    ensure_ray(cfg)
    summary = RunSummary(paths, make_tracker(cfg).tracking_uri, None)
    with parent_run(cfg, paths, "eval") as (tracker, parent):
        summary.parent_run_id = parent
        summary.model_dir = trained_model_dir(cfg, paths)
        with _stage(tracker, parent, "eval", summary.timings, cfg) as h:
            summary.metrics = _eval(cfg, paths, summary.model_dir, h)
        _report(cfg, paths, tracker, parent)
    print_summary(summary)


def _experiment_report(cfg: ExperimentConfig, tracker: Tracker) -> str | None:
    """Refresh the experiment's comparison page; a failure here never fails a finished run."""
    from derta.report.html import write_experiment_report

    try:
        return write_experiment_report(cfg, tracker)
    except Exception as e:  # noqa: BLE001
        console.print(f"[yellow]experiment report not written: {type(e).__name__}: {e}")
        return None


def report_only(cfg: ExperimentConfig, all_runs: bool = False) -> str:
    """`derta report`: the run's page with storage.run_name set (and not all_runs), else the
    page comparing every run of the experiment (tracking.experiment)."""
    tracker = make_tracker(cfg)
    if all_runs or cfg.storage.run_name is None:
        from derta.report.html import write_experiment_report

        path = write_experiment_report(cfg, tracker)
    else:
        path = _report(cfg, run_paths(cfg, rerun_check=False), tracker, None)
    console.print(f"report: {path}")
    return path


# --------------------------------------------------------------------------- output
def _headline(metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for attack, value in (metrics.get("asr") or {}).items():
        out[f"asr_{attack}"] = value
    if metrics.get("asr_mean") is not None:
        out["asr_mean"] = metrics["asr_mean"]
    return out


def print_summary(summary: RunSummary) -> None:
    m = summary.metrics
    table = Table(title=f"DeRTa results: {summary.paths.name}", show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for attack, value in (m.get("asr") or {}).items():
        table.add_row(f"ASR {attack} (%)", f"{value:.1f}")
    for k, value in (m.get("asr_by_k") or {}).items():
        table.add_row(f"  prefill k={k} (%)", f"{value:.1f}")
    if m.get("asr_mean") is not None:
        table.add_row("ASR mean (%)", f"{m['asr_mean']:.1f}")
    pos = m.get("refusal_position") or {}
    if pos.get("within_first_5") is not None:
        table.add_row(f"refusals starting in first 5 {pos.get('unit', 'token')}s (%)", f"{pos['within_first_5']:.1f}")
    for name, value in (m.get("helpfulness") or {}).items():
        score = value.get("score") if isinstance(value, dict) else value
        if isinstance(score, (int, float)):
            table.add_row(f"helpfulness {name}", f"{score:.1f}")
    if m.get("over_refusal") is not None:
        table.add_row("over-refusal (%)", f"{m['over_refusal']:.1f}")
    for stage, secs in summary.timings.items():
        table.add_row(f"time {stage} (s)", f"{secs:.1f}")
    console.print(table)
    console.print(f"run directory : {summary.paths.dir}")
    console.print(f"model         : {summary.model_dir}")
    console.print(f"metrics       : {summary.paths.metrics}")
    console.print(f"MLflow store  : {summary.tracking_uri}")
    console.print(f"report        : {summary.paths.report}")
    logs = ray_logs_dir()
    if logs:  # Ray's own logs (workers, Ray Data, Ray Train) stay off the console; here they are
        console.print(f"Ray logs      : {logs}")
