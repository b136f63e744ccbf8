"""Orchestration: data -> train -> eval -> report, each a nested MLflow run under one parent.

Each stage reads what the previous one stored under the run directory, so every verb
(`derta data build`, `train`, `eval`, `report`) can also run alone on an existing run.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

from rich.console import Console
from rich.table import Table

from derta import storage
from derta.cluster import ensure_ray
from derta.config import ExperimentConfig, dump_yaml
from derta.paths import RunPaths
from derta.tracking import Tracker, TrackingHandle

console = Console(stderr=False, highlight=False)


@dataclass
class RunSummary:
    paths: RunPaths
    tracking_uri: str
    parent_run_id: str | None
    model_dir: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- run setup
def run_paths(cfg: ExperimentConfig) -> RunPaths:
    """The run's paths; a run without a name gets `<method>-<UTC timestamp>` (set once)."""
    if cfg.storage.run_name is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        cfg.storage.run_name = f"{cfg.train.method}-{stamp}"
    return RunPaths(cfg.storage.root, cfg.storage.run_name)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def make_tracker(cfg: ExperimentConfig) -> Tracker:
    return Tracker.for_root(cfg.storage.root, cfg.tracking.experiment, cfg.tracking.uri, cfg.tracking.enabled)


def _tags(cfg: ExperimentConfig) -> dict[str, Any]:
    tags = {"method": cfg.train.method, "model": cfg.model.name_or_path, "schedule": cfg.train.schedule}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags


@contextlib.contextmanager
def _parent_run(cfg: ExperimentConfig, paths: RunPaths, verb: str) -> Iterator[tuple[Tracker, str | None]]:
    tracker = make_tracker(cfg)
    storage.write_text(paths.config, dump_yaml(cfg.redacted()))
    with tracker.run(paths.name, tags={**_tags(cfg), "verb": verb, "run_dir": paths.dir}) as run_id:
        tracker.log_params(cfg.redacted())
        tracker.log_artifact(paths.config)
        yield tracker, run_id


@contextlib.contextmanager
def _stage(tracker: Tracker, parent: str | None, name: str, timings: dict[str, float]) -> Iterator[TrackingHandle]:
    console.rule(f"[bold]{name}")
    start = time.perf_counter()
    with tracker.run(name, parent_run_id=parent, tags={"stage": name}) as run_id:
        yield TrackingHandle.of(tracker, run_id)
    timings[name] = time.perf_counter() - start
    console.print(f"[green]{name} done in {timings[name]:.1f}s")


# --------------------------------------------------------------------------- stages
def _build(cfg: ExperimentConfig, paths: RunPaths, handle: TrackingHandle) -> None:
    from derta.data.pipeline import build

    manifest = build(cfg, paths)
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
    return result.model_dir


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
def run_all(cfg: ExperimentConfig) -> RunSummary:
    """`derta run`: build data, train, evaluate, report; print results and where they are."""
    t0 = time.perf_counter()
    paths = run_paths(cfg)
    console.print(f"[bold]DeRTa run[/bold] {paths.name}  method={cfg.train.method}  model={cfg.model.name_or_path}")
    console.print(f"run directory: {paths.dir}")
    ensure_ray(cfg)
    summary = RunSummary(paths, make_tracker(cfg).tracking_uri, None)
    with _parent_run(cfg, paths, "run") as (tracker, parent):
        summary.parent_run_id = parent
        with _stage(tracker, parent, "data", summary.timings) as h:
            _build(cfg, paths, h)
        with _stage(tracker, parent, "train", summary.timings) as h:
            summary.model_dir = _train(cfg, paths, h)
        with _stage(tracker, parent, "eval", summary.timings) as h:
            summary.metrics = _eval(cfg, paths, summary.model_dir, h)
        with tracker.attach(parent):
            tracker.log_metrics(_headline(summary.metrics))
        _report(cfg, paths, tracker, parent)
        summary.timings["total"] = time.perf_counter() - t0
        with tracker.attach(parent):
            tracker.log_metrics({f"time_{k}_s": v for k, v in summary.timings.items()})
    print_summary(summary)
    return summary


def build_data(cfg: ExperimentConfig) -> None:
    paths = run_paths(cfg)
    ensure_ray(cfg)
    timings: dict[str, float] = {}
    with _parent_run(cfg, paths, "data build") as (tracker, parent):
        with _stage(tracker, parent, "data", timings) as h:
            _build(cfg, paths, h)
    console.print(f"transition samples: {paths.data}  (run name: {paths.name})")


def train_only(cfg: ExperimentConfig) -> None:
    paths = run_paths(cfg)
    ensure_ray(cfg)
    timings: dict[str, float] = {}
    with _parent_run(cfg, paths, "train") as (tracker, parent):
        with _stage(tracker, parent, "data", timings) as h:
            _ensure_data(cfg, paths, h)
        with _stage(tracker, parent, "train", timings) as h:
            model_dir = _train(cfg, paths, h)
    console.print(f"model: {model_dir}  (run name: {paths.name})")


def eval_only(cfg: ExperimentConfig) -> None:
    paths = run_paths(cfg)
    ensure_ray(cfg)
    summary = RunSummary(paths, make_tracker(cfg).tracking_uri, None)
    with _parent_run(cfg, paths, "eval") as (tracker, parent):
        summary.parent_run_id = parent
        summary.model_dir = trained_model_dir(cfg, paths)
        with _stage(tracker, parent, "eval", summary.timings) as h:
            summary.metrics = _eval(cfg, paths, summary.model_dir, h)
        _report(cfg, paths, tracker, parent)
    print_summary(summary)


def report_only(cfg: ExperimentConfig) -> None:
    paths = run_paths(cfg)
    tracker = make_tracker(cfg)
    path = _report(cfg, paths, tracker, None)
    console.print(f"report: {path}")


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
    if pos.get("first5_share") is not None:
        table.add_row("refusals starting in first 5 tokens (%)", f"{pos['first5_share']:.1f}")
    for name, value in (m.get("helpfulness") or {}).items():
        if isinstance(value, (int, float)):
            table.add_row(f"helpfulness {name}", f"{value:.3f}")
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
