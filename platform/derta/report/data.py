"""What a report shows, read back from a run's stored files and from MLflow.

A run is known by its name (`storage.run_name`). Its files (eval/metrics.json,
eval/generations.jsonl, data/manifest.json) live under the run directory; its training curves
are the metric histories of the `train` stage run, a child (tags.stage = train) of one of the
pipeline's parent runs with that name. Several parent runs can share a name (`derta train`,
then `derta eval` on the same run directory): the newest `train` child wins.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from statistics import mean
from typing import Any, Iterable

from derta import storage
from derta.paths import RunPaths
from derta.tracking import Tracker

log = logging.getLogger(__name__)

# Histories read from the train stage run (what derta.train.loop logs each step).
CURVES = ("loss", "loss_mle", "loss_rto", "loss_pref", "tokens_per_s", "lr")
PARENT_TAG = "mlflow.parentRunId"


@dataclass
class RunData:
    """Everything one run contributes to a report (any part may be empty)."""

    name: str
    paths: RunPaths | None = None
    run_id: str | None = None  # newest MLflow parent run with this name
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # eval/metrics.json
    generations: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    start_time: int | None = None  # ms since epoch of the newest parent run

    @property
    def method(self) -> str:
        return self.tags.get("method") or str(((self.config or {}).get("train") or {}).get("method") or "?")

    @property
    def has_data(self) -> bool:
        return bool(self.metrics or self.curves or self.manifest or self.generations)


# --------------------------------------------------------------------------- numbers from metrics.json
def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def asr_by_attack(metrics: dict[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in (metrics.get("asr") or {}).items() if _number(v) is not None}


def asr_mean(metrics: dict[str, Any]) -> float | None:
    v = _number(metrics.get("asr_mean"))
    if v is None:
        vals = list(asr_by_attack(metrics).values())
        v = mean(vals) if vals else None
    return v


def helpfulness_scores(metrics: dict[str, Any]) -> dict[str, float]:
    """{benchmark: score %}; accepts {"name": {"score": %}} (eval/metrics.py) and {"name": %}."""
    out = {}
    for name, v in (metrics.get("helpfulness") or {}).items():
        if isinstance(v, dict):
            v = v.get("score")
        x = _number(v)
        if x is not None:
            out[str(name)] = x
    return out


def helpfulness_mean(metrics: dict[str, Any]) -> float | None:
    vals = list(helpfulness_scores(metrics).values())
    return mean(vals) if vals else None


def safety_rows(generations: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [g for g in generations if g.get("kind", "safety") == "safety"]


def refusal_positions(run: RunData) -> list[int]:
    """First-refusal positions of every refusing safety response (the population of Fig. 4)."""
    rows = safety_rows(run.generations)
    pos = [int(g["refusal_pos"]) for g in rows if g.get("refusal_pos") is not None]
    if pos or rows:
        return pos
    # No generations file: expand the stored CDF ([[position, fraction], ...]) back to positions.
    rp = run.metrics.get("refusal_position") or {}
    cdf, n = rp.get("cdf") or [], int(rp.get("n_refusals") or 0)
    out, prev = [], 0.0
    for p, frac in cdf:
        count = round((float(frac) - prev) * n)
        out += [int(p)] * max(count, 0)
        prev = float(frac)
    return out


def position_unit(run: RunData) -> str:
    return str((run.metrics.get("refusal_position") or {}).get("unit") or "word")


def prefix_histogram(manifest: dict[str, Any]) -> dict[str, int]:
    """The training data's harmful-prefix-length histogram from data/manifest.json: its
    `prefix_hist`, else the first dict of bucket label -> count under a key naming prefix + hist."""

    def ok(v: Any) -> bool:
        return isinstance(v, dict) and bool(v) and all(_number(x) is not None for x in v.values())

    def search(node: Any, path: str, depth: int) -> dict[str, int] | None:
        if not isinstance(node, dict) or depth > 3:
            return None
        for k, v in node.items():
            key = f"{path}.{k}".lower()
            if "prefix" in key and "hist" in key and ok(v):
                return {str(b): int(c) for b, c in v.items()}
        for k, v in node.items():
            found = search(v, f"{path}.{k}", depth + 1)
            if found:
                return found
        return None

    if ok(manifest.get("prefix_hist")):  # derta.data.pipeline.DataManifest
        return {str(b): int(c) for b, c in manifest["prefix_hist"].items()}
    return search(manifest, "", 0) or {}


# --------------------------------------------------------------------------- files
def _read_json(uri: str) -> dict[str, Any]:
    try:
        return storage.read_json(uri) if storage.exists(uri) else {}
    except (OSError, ValueError) as e:
        log.warning("report: cannot read %s: %s", uri, e)
        return {}


def _read_jsonl(uri: str) -> list[dict[str, Any]]:
    if not storage.exists(uri):
        return []
    out = []
    for line in storage.read_text(uri).splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line of an interrupted eval
    return out


def _read_config(paths: RunPaths) -> dict[str, Any] | None:
    if not storage.exists(paths.config):
        return None
    import yaml

    try:
        data = yaml.safe_load(storage.read_text(paths.config))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def load_files(run: RunData, details: bool = True) -> RunData:
    """Fill a run from its directory; details=False reads only eval/metrics.json."""
    if run.paths is None:
        return run
    p = run.paths
    run.metrics = _read_json(p.metrics) or run.metrics
    if not details:
        return run
    run.generations = _read_jsonl(p.generations)
    run.manifest = _read_json(p.manifest)
    if run.config is None:
        run.config = _read_config(p)
    return run


# --------------------------------------------------------------------------- MLflow
def _search(tracker: Tracker, filter_string: str, order_by: list[str] | None = None) -> list[Any]:
    client, out, token = tracker.client, [], None
    while True:
        page = client.search_runs([tracker.experiment_id], filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def parent_runs(tracker: Tracker, name: str | None = None) -> list[Any]:
    """Pipeline (top-level) runs, newest first; only those called `name` when given."""
    flt = f"attributes.run_name = {_quote(name)}" if name else ""
    runs = _search(tracker, flt, order_by=["attributes.start_time DESC"])
    return [r for r in runs if PARENT_TAG not in r.data.tags]


def train_runs(tracker: Tracker, parent_ids: Iterable[str] | None = None) -> dict[str, list[Any]]:
    """`train` stage runs that logged metrics, newest first, by parent run id (one query for
    all parents when parent_ids is None, else one per parent)."""
    if parent_ids is None:
        found = _search(tracker, "tags.stage = 'train'", order_by=["attributes.start_time DESC"])
    else:
        found = [r for pid in parent_ids for r in _search(
            tracker, f"tags.stage = 'train' and tags.`{PARENT_TAG}` = {_quote(pid)}", order_by=["attributes.start_time DESC"])]
    out: dict[str, list[Any]] = {}
    for r in found:
        if r.data.metrics and r.data.tags.get(PARENT_TAG):
            out.setdefault(r.data.tags[PARENT_TAG], []).append(r)
    return out


def newest_train_run(by_parent: dict[str, list[Any]], parent_ids: Iterable[str]) -> Any | None:
    """The newest `train` run under any of these parents."""
    cands = [r for pid in parent_ids for r in by_parent.get(pid, [])]
    return max(cands, key=lambda r: r.info.start_time or 0) if cands else None


def metric_histories(tracker: Tracker, run_id: str, names: Iterable[str] = CURVES) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for name in names:
        hist = tracker.client.get_metric_history(run_id, name)
        if hist:
            out[name] = sorted((int(m.step), float(m.value)) for m in hist)
    return out


def _headline_metrics(parent: Any) -> dict[str, Any]:
    """ASR from the parent run's logged headline (asr_<attack>, asr_mean) when no metrics.json."""
    m = parent.data.metrics
    asr = {k[len("asr_"):]: v for k, v in m.items() if k.startswith("asr_") and k != "asr_mean"}
    return {"asr": asr, "asr_mean": m.get("asr_mean")} if asr else {}


def _paths_from_tag(run_dir: str | None, name: str, fallback_root: str) -> RunPaths:
    if run_dir:
        d = run_dir.rstrip("/")
        if d.endswith("/" + name) or d.endswith(os.sep + name):
            return RunPaths(d[: -len(name) - 1] or "/", name)
    return RunPaths(fallback_root, name)


def load_run(tracker: Tracker | None, name: str, root: str, parent_run_id: str | None = None) -> RunData:
    """One run by name: files under <root>/<name>, curves + tags from MLflow when tracking is on."""
    run = RunData(name=name, paths=RunPaths(root, name))
    if tracker is not None and tracker.enabled:
        try:
            _attach_mlflow(run, tracker, parent_run_id)
        except Exception as e:  # noqa: BLE001 - an unreachable tracking server still gives a report
            log.warning("report: MLflow lookup for run %s failed: %s", name, e)
    return load_files(run)


def _attach_mlflow(run: RunData, tracker: Tracker, parent_run_id: str | None) -> None:
    parents = parent_runs(tracker, run.name)
    if parent_run_id and all(p.info.run_id != parent_run_id for p in parents):
        parents.insert(0, tracker.client.get_run(parent_run_id))
    if not parents:
        return
    newest = parents[0]
    run.run_id = newest.info.run_id
    run.start_time = newest.info.start_time
    run.tags = {k: v for k, v in newest.data.tags.items() if not k.startswith("mlflow.")}
    run.metrics = _headline_metrics(newest)
    ids = [p.info.run_id for p in parents]
    tr = newest_train_run(train_runs(tracker, ids), ids)
    if tr is not None:
        run.curves = metric_histories(tracker, tr.info.run_id)


def load_experiment(tracker: Tracker | None, root: str, details: bool = True) -> list[RunData]:
    """Every run of the experiment with something to show, oldest first.

    details=False: metrics and tags only (no generations, manifest or curves), for a scatter.

    With tracking on, the runs are the experiment's pipeline runs (one entry per run name; its
    directory from the run_dir tag). With tracking off, the run directories under root that
    hold eval/metrics.json.
    """
    runs: list[RunData] = []
    if tracker is not None and tracker.enabled:
        parents = parent_runs(tracker)
        trains = train_runs(tracker) if details else {}
        by_name: dict[str, list[Any]] = {}
        for p in parents:  # newest first
            by_name.setdefault(p.info.run_name, []).append(p)
        for name, group in by_name.items():
            newest = group[0]
            run = RunData(name=name, paths=_paths_from_tag(newest.data.tags.get("run_dir"), name, root))
            run.run_id, run.start_time = newest.info.run_id, newest.info.start_time
            run.tags = {k: v for k, v in newest.data.tags.items() if not k.startswith("mlflow.")}
            run.metrics = _headline_metrics(newest)
            tr = newest_train_run(trains, [p.info.run_id for p in group])
            if tr is not None:
                run.curves = metric_histories(tracker, tr.info.run_id)
            runs.append(load_files(run, details))
        runs.sort(key=lambda r: (r.start_time or 0, r.name))
    else:
        for name in _run_dirs_with_metrics(root):
            runs.append(load_files(RunData(name=name, paths=RunPaths(root, name)), details))
        runs.sort(key=lambda r: r.name)
    return [r for r in runs if r.has_data]


def _run_dirs_with_metrics(root: str) -> list[str]:
    """Names of the run directories directly under root that hold eval/metrics.json."""
    if storage.is_s3(root):
        prefix = root.rstrip("/") + "/"
        names = {u[len(prefix):].split("/")[0] for u in storage.list_files(root, suffix="/eval/metrics.json")}
        return sorted(n for n in names if storage.exists(RunPaths(root, n).metrics))
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isfile(RunPaths(root, d).metrics))


def sample_counts(manifest: dict[str, Any]) -> dict[str, int]:
    """Transition samples per kind from the manifest's `counts`."""
    return {str(k): int(v) for k, v in (manifest.get("counts") or {}).items() if _number(v) is not None}
