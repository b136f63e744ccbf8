"""Live platform metrics for Prometheus/Grafana, exported through Ray's metrics agent.

MLflow keeps the record of a run; these metrics are the live view while it runs (tokens/s,
losses, samples built/s, generations/s, judge verdicts), next to Ray's own cluster metrics on
the same Prometheus. Every metric is a `ray.util.metrics` Counter, Gauge or Histogram named
`derta_*`; Ray's agent on each node serves them to Prometheus as

    gauge      derta_x  -> ray_derta_x
    counter    derta_x  -> ray_derta_x_total
    histogram  derta_x  -> ray_derta_x_bucket, ray_derta_x_sum, ray_derta_x_count

(`PROMETHEUS_NAMES` lists them; dashboards/grafana/*.json query only those, which the tests
check). Each series carries a `run` label (the run name) plus Ray's own labels (SessionName,
NodeAddress, WorkerId, ...).

The record_* functions are what the stages call. They are safe everywhere: a no-op when Ray is
not initialised in this process (plain unit tests, `derta judge` on a laptop) or when
DERTA_TELEMETRY=0, and they never raise (a metrics hiccup must not fail a 70B training run).
Ray workers, tasks and actors record from their own process; the node's agent aggregates.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import Counter as _Tally
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

log = logging.getLogger(__name__)

PREFIX = "derta_"
RAY_PREFIX = "ray_"  # what Ray's metrics agent prepends on export
ENV_DISABLE = "DERTA_TELEMETRY"  # "0" / "false" turns every record_* into a no-op
ENV_RUN = "DERTA_RUN_NAME"  # default `run` label when a caller passes none

Kind = Literal["counter", "gauge", "histogram"]

STEP_SECONDS_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300]
BATCH_SECONDS_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]
LOSS_KINDS = ("total", "mle", "rto", "pref")


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as created with ray.util.metrics (starts with `derta_`)
    kind: Kind
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()

    @property
    def prometheus_names(self) -> tuple[str, ...]:
        """The series names Prometheus sees for this metric (see the module docstring)."""
        base = RAY_PREFIX + self.name
        if self.kind == "counter":
            return (base + "_total",)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


SPECS: tuple[MetricSpec, ...] = (
    # ----------------------------------------------------------------- training (rank 0)
    MetricSpec("derta_train_tokens_per_second", "gauge",
               "Training throughput over the last logging window, all workers (tokens/s).", ("run",)),
    MetricSpec("derta_train_loss", "gauge",
               "Training loss at the last logged step; kind = total | mle | rto | pref.", ("run", "kind")),
    MetricSpec("derta_train_learning_rate", "gauge", "Learning rate at the last logged step.", ("run",)),
    MetricSpec("derta_train_grad_norm", "gauge", "Gradient norm (before clipping) at the last logged step.", ("run",)),
    MetricSpec("derta_train_mfu", "gauge", "Model FLOPs utilisation (0..1) at the last logged step.", ("run",)),
    MetricSpec("derta_train_step", "gauge", "Global optimizer step of the last logged step.", ("run",)),
    MetricSpec("derta_train_steps", "counter", "Optimizer steps taken.", ("run",)),
    MetricSpec("derta_train_tokens", "counter", "Tokens trained on (all workers).", ("run",)),
    MetricSpec("derta_train_step_seconds", "histogram", "Wall time of one optimizer step (seconds).", ("run",),
               tuple(STEP_SECONDS_BOUNDARIES)),
    # ----------------------------------------------------------------- data
    MetricSpec("derta_data_samples_built", "counter",
               "Transition samples built; kind = helpful | vanilla | prefix | rto | pref.", ("run", "kind")),
    MetricSpec("derta_data_rows_skipped", "counter",
               "Source rows dropped while building samples (reason: bad_row | too_long | ...).", ("run", "reason")),
    # ----------------------------------------------------------------- eval
    MetricSpec("derta_eval_generations", "counter", "Responses generated, per attack (or benchmark).", ("run", "attack")),
    MetricSpec("derta_eval_generated_tokens", "counter", "Tokens generated, per attack (or benchmark).", ("run", "attack")),
    MetricSpec("derta_eval_batch_seconds", "histogram", "Wall time of one generation batch (seconds).", ("run", "attack"),
               tuple(BATCH_SECONDS_BOUNDARIES)),
    MetricSpec("derta_eval_judge_verdicts", "counter",
               "Judged responses, per attack; verdict = unsafe | safe.", ("run", "attack", "verdict")),
    MetricSpec("derta_eval_refusals", "counter", "Judged responses that contain a refusal, per attack.", ("run", "attack")),
)

SPEC_BY_NAME: dict[str, MetricSpec] = {s.name: s for s in SPECS}
METRIC_NAMES: tuple[str, ...] = tuple(s.name for s in SPECS)
PROMETHEUS_NAMES: frozenset[str] = frozenset(n for s in SPECS for n in s.prometheus_names)
# Labels every derta series may be filtered / grouped by in PromQL: its tag keys, Ray's
# labels on every custom metric, Prometheus' own, and `le` on histogram buckets.
RAY_LABELS = frozenset({"SessionName", "NodeAddress", "WorkerId", "Component", "Version", "instance", "job", "le",
                        "ray_io_cluster"})


def prometheus_labels(series: str) -> frozenset[str]:
    """The labels a PromQL selector may use on an exported derta series."""
    for s in SPECS:
        if series in s.prometheus_names:
            return frozenset(s.tag_keys) | RAY_LABELS
    raise KeyError(series)


# --------------------------------------------------------------------------- plumbing
_lock = threading.Lock()
_metrics: dict[str, Any] = {}
_warned: set[str] = set()


def enabled() -> bool:
    """True when records go somewhere: Ray is initialised here and telemetry is not switched off.

    Ray is only looked at if something already imported it, so a caller outside Ray never pays
    for `import ray`.
    """
    if os.environ.get(ENV_DISABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized())
    except Exception:  # noqa: BLE001 - a half-imported ray during shutdown
        return False


def _metric(name: str) -> Any:
    """The process-wide ray.util.metrics object for a spec (created once per process)."""
    m = _metrics.get(name)
    if m is not None:
        return m
    with _lock:
        m = _metrics.get(name)
        if m is None:
            from ray.util import metrics as rm

            s = SPEC_BY_NAME[name]
            if s.kind == "counter":
                m = rm.Counter(s.name, description=s.description, tag_keys=s.tag_keys)
            elif s.kind == "gauge":
                m = rm.Gauge(s.name, description=s.description, tag_keys=s.tag_keys)
            else:
                m = rm.Histogram(s.name, description=s.description, boundaries=list(s.boundaries), tag_keys=s.tag_keys)
            _metrics[name] = m
    return m


def _warn_once(key: str, err: BaseException) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("telemetry: %s failed (%s: %s); further failures are silent", key, type(err).__name__, err)


def _run(run: str | None) -> str:
    return str(run or os.environ.get(ENV_RUN) or "default")


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x and x not in (float("inf"), float("-inf")) else None  # NaN / inf dropped


def _set(name: str, value: Any, tags: dict[str, str]) -> None:
    x = _num(value)
    if x is not None:
        _metric(name).set(x, tags=tags)


def _inc(name: str, value: Any, tags: dict[str, str]) -> None:
    x = _num(value)
    if x is not None and x > 0:  # Ray counters reject 0 and negatives
        _metric(name).inc(x, tags=tags)


def _observe(name: str, value: Any, tags: dict[str, str]) -> None:
    x = _num(value)
    if x is not None and x >= 0:
        _metric(name).observe(x, tags=tags)


# --------------------------------------------------------------------------- what stages call
def record_train_step(
    metrics: Mapping[str, Any],
    *,
    step: int | None = None,
    steps: int = 1,
    tokens: float | None = None,
    step_seconds: float | None = None,
    run: str | None = None,
) -> None:
    """After a logged optimizer step (rank 0 only): the same dict the trainer logs to MLflow.

    metrics keys used: loss, loss_mle, loss_rto, loss_pref, tokens_per_s, lr, grad_norm, mfu
    (missing ones are skipped). steps = optimizer steps since the last call (train.log_every),
    tokens = tokens trained on since the last call, all workers; step_seconds = mean seconds
    per optimizer step over that window.
    """
    if not enabled():
        return
    try:
        tags = {"run": _run(run)}
        for kind, key in (("total", "loss"), ("mle", "loss_mle"), ("rto", "loss_rto"), ("pref", "loss_pref")):
            if key in metrics:
                _set("derta_train_loss", metrics[key], {**tags, "kind": kind})
        _set("derta_train_tokens_per_second", metrics.get("tokens_per_s"), tags)
        _set("derta_train_learning_rate", metrics.get("lr"), tags)
        _set("derta_train_grad_norm", metrics.get("grad_norm"), tags)
        _set("derta_train_mfu", metrics.get("mfu"), tags)
        _set("derta_train_step", step, tags)
        _inc("derta_train_steps", steps, tags)
        _inc("derta_train_tokens", tokens, tags)
        _observe("derta_train_step_seconds", step_seconds, tags)
    except Exception as e:  # noqa: BLE001 - telemetry never fails a stage
        _warn_once("record_train_step", e)


def record_samples_built(counts: Mapping[str, int], *, run: str | None = None) -> None:
    """Transition samples built, by kind ({"rto": 120, "prefix": 118, ...}); call per batch."""
    if not enabled():
        return
    try:
        r = _run(run)
        for kind, n in counts.items():
            _inc("derta_data_samples_built", n, {"run": r, "kind": str(kind)})
    except Exception as e:  # noqa: BLE001
        _warn_once("record_samples_built", e)


def record_rows_skipped(count: int, *, reason: str, run: str | None = None) -> None:
    """Source rows dropped (data.on_bad_row=skip, data.truncation=skip, ...), with a short reason."""
    if not enabled():
        return
    try:
        _inc("derta_data_rows_skipped", count, {"run": _run(run), "reason": str(reason)})
    except Exception as e:  # noqa: BLE001
        _warn_once("record_rows_skipped", e)


def record_generations(
    attack: str, count: int, *, tokens: int | None = None, seconds: float | None = None, run: str | None = None
) -> None:
    """One generation batch done: `count` responses for `attack` (or a helpfulness benchmark),
    `tokens` new tokens in total, `seconds` wall time of the batch."""
    if not enabled():
        return
    try:
        tags = {"run": _run(run), "attack": str(attack)}
        _inc("derta_eval_generations", count, tags)
        _inc("derta_eval_generated_tokens", tokens, tags)
        _observe("derta_eval_batch_seconds", seconds, tags)
    except Exception as e:  # noqa: BLE001
        _warn_once("record_generations", e)


def record_verdicts(
    attack: str, *, unsafe: int = 0, safe: int = 0, refused: int = 0, run: str | None = None
) -> None:
    """Judge verdicts for one batch of `attack`: counts of unsafe / safe responses, and how many
    responses contained a refusal (anywhere)."""
    if not enabled():
        return
    try:
        r = _run(run)
        _inc("derta_eval_judge_verdicts", unsafe, {"run": r, "attack": str(attack), "verdict": "unsafe"})
        _inc("derta_eval_judge_verdicts", safe, {"run": r, "attack": str(attack), "verdict": "safe"})
        _inc("derta_eval_refusals", refused, {"run": r, "attack": str(attack)})
    except Exception as e:  # noqa: BLE001
        _warn_once("record_verdicts", e)


def verdict_counts(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Judged generation rows (attack, unsafe, refusal_pos | refused) -> {attack: {unsafe, safe,
    refused}}; pure, so the eval runner can record a whole batch with record_judged_rows."""
    out: dict[str, _Tally] = {}
    for r in rows:
        t = out.setdefault(str(r.get("attack", "unknown")), _Tally())
        t["unsafe" if r.get("unsafe") else "safe"] += 1
        if r.get("refused", r.get("refusal_pos") is not None):
            t["refused"] += 1
    return {a: {"unsafe": t["unsafe"], "safe": t["safe"], "refused": t["refused"]} for a, t in out.items()}


def record_judged_rows(rows: Iterable[Mapping[str, Any]], *, run: str | None = None) -> None:
    """record_verdicts for a batch of judged generations.jsonl rows (safety rows only)."""
    if not enabled():
        return
    safety = [r for r in rows if r.get("kind", "safety") == "safety"]
    for attack, c in verdict_counts(safety).items():
        record_verdicts(attack, unsafe=c["unsafe"], safe=c["safe"], refused=c["refused"], run=run)
