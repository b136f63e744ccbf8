#!/usr/bin/env python3
"""Writes the Grafana dashboards in this folder from the panel lists below.

    python dashboards/grafana/generate.py          # rewrite derta_training.json, derta_eval.json, ray_cluster.json
    python dashboards/grafana/generate.py --check  # exit 1 if a committed file differs (CI / tests)

Queries use only the series the platform exports (derta.telemetry.PROMETHEUS_NAMES: Ray's
agent serves a `derta_x` metric as `ray_derta_x`, counters as `ray_derta_x_total`, histograms
as `_bucket`/`_sum`/`_count`) and series Ray itself exports (the names Ray's own generated
dashboards use). tests/test_dashboards.py checks both. Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
SESSION = 'SessionName=~"$SessionName"'
DERTA = f'{SESSION},run=~"$run"'  # the filter on every derta_* series
NODE = f'{SESSION},instance=~"$Instance"'  # the filter on Ray node series
RATE = "$__rate_interval"


# --------------------------------------------------------------------------- building blocks
def target(expr: str, legend: str = "", ref: str = "A") -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "range": True, "refId": ref}


def panel(title: str, targets: list[tuple[str, str]], *, unit: str = "short", desc: str = "", kind: str = "timeseries",
          w: int = 12, h: int = 8, stack: bool = False, min0: bool = True, maxv: float | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "palette-classic"}}
    if min0:
        defaults["min"] = 0
    if maxv is not None:
        defaults["max"] = maxv
    if kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0, "showPoints": "never",
                              "stacking": {"mode": "normal" if stack else "none", "group": "A"}, "spanNulls": True}
        options: dict[str, Any] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"],
                                              "showLegend": True},
                                   "tooltip": {"mode": "multi", "sort": "desc"}}
    elif kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value",
                   "graphMode": "area", "justifyMode": "auto", "orientation": "auto", "textMode": "auto"}
    else:  # bargauge
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "displayMode": "gradient",
                   "orientation": "horizontal", "showUnfilled": True}
    return {
        "type": kind, "title": title, "description": desc, "datasource": DS,
        "targets": [target(e, leg, chr(ord("A") + i)) for i, (e, leg) in enumerate(targets)],
        "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options, "_w": w, "_h": h,
    }


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_w": 24, "_h": 1}


def variables(run_source: str | None) -> dict[str, Any]:
    out: list[dict[str, Any]] = [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus", "current": {},
         "hide": 0, "refresh": 1, "regex": "", "options": []},
        {"name": "SessionName", "label": "Ray session", "type": "query", "datasource": DS,
         "definition": "label_values(ray_node_cpu_count, SessionName)",
         "query": {"query": "label_values(ray_node_cpu_count, SessionName)", "refId": "SessionName"},
         "includeAll": True, "allValue": ".+", "multi": True, "refresh": 2, "sort": 2, "current": {}, "options": [], "hide": 0},
        {"name": "Instance", "label": "Node", "type": "query", "datasource": DS,
         "definition": f"label_values(ray_node_cpu_count{{{SESSION}}}, instance)",
         "query": {"query": f"label_values(ray_node_cpu_count{{{SESSION}}}, instance)", "refId": "Instance"},
         "includeAll": True, "allValue": ".+", "multi": True, "refresh": 2, "sort": 1, "current": {}, "options": [], "hide": 0},
    ]
    if run_source:
        out.append({"name": "run", "label": "DeRTa run", "type": "query", "datasource": DS,
                    "definition": f"label_values({run_source}{{{SESSION}}}, run)",
                    "query": {"query": f"label_values({run_source}{{{SESSION}}}, run)", "refId": "run"},
                    "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "sort": 1, "current": {},
                    "options": [], "hide": 0})
    return {"list": out}


def dashboard(uid: str, title: str, desc: str, panels: list[dict[str, Any]], run_source: str | None) -> dict[str, Any]:
    """Lay panels out left to right, top to bottom, 24 columns wide; ids in order."""
    x = y = row_h = 0
    laid = []
    for i, p in enumerate(panels, start=1):
        w, h = p.pop("_w"), p.pop("_h")
        if x + w > 24 or p["type"] == "row":
            x, y, row_h = 0, y + row_h, 0
        p = {"id": i, "gridPos": {"x": x, "y": y, "w": w, "h": h}, **p}
        laid.append(p)
        x += w
        row_h = max(row_h, h)
        if p["type"] == "row":
            x, y, row_h = 0, y + h, 0
    return {
        "uid": uid, "title": title, "description": desc, "tags": ["derta", "ray"], "editable": True,
        "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "30s", "timezone": "browser",
        "time": {"from": "now-3h", "to": "now"}, "timepicker": {}, "fiscalYearStartMonth": 0, "liveNow": False,
        "annotations": {"list": []}, "links": [
            {"title": "DeRTa dashboards", "type": "dashboards", "tags": ["derta"], "asDropdown": True, "includeVars": True,
             "keepTime": True}],
        "templating": variables(run_source), "panels": laid,
    }


def node_panels() -> list[dict[str, Any]]:
    """Ray's node metrics (GPU first: where training and generation time goes)."""
    return [
        panel("GPU utilisation", [(f"sum by (instance, GpuIndex) (ray_node_gpus_utilization{{{NODE}}})",
                                   "{{instance}} gpu{{GpuIndex}}")], unit="percent", w=8, maxv=100),
        panel("GPU memory used", [(f"sum by (instance, GpuIndex) (ray_node_gram_used{{{NODE}}}) * 1024 * 1024",
                                   "{{instance}} gpu{{GpuIndex}}")], unit="bytes", w=8),
        panel("CPU utilisation", [(f"avg by (instance) (ray_node_cpu_utilization{{{NODE}}})", "{{instance}}")],
              unit="percent", w=8, maxv=100),
    ]


# --------------------------------------------------------------------------- dashboards
def training() -> dict[str, Any]:
    panels = [
        row("Training (rank 0, every train.log_every steps)"),
        panel("Training throughput", [
            (f"sum by (run) (ray_derta_train_tokens_per_second{{{DERTA}}})", "{{run}} tokens/s (last window)"),
            (f"sum by (run) (rate(ray_derta_train_tokens_total{{{DERTA}}}[{RATE}]))", "{{run}} tokens/s (rate)"),
        ], unit="short", desc="Tokens per second over all workers: the trainer's own window measure and the rate of the token counter."),
        panel("Losses", [(f"max by (run, kind) (ray_derta_train_loss{{{DERTA}}})", "{{run}} {{kind}}")],
              desc="total = w_mle * mle + w_rto * rto (+ pref for derta_pref); mle: MLE with harmful prefix; rto: refusal token at every harmful position.",
              min0=False),
        panel("Optimizer steps per second", [(f"sum by (run) (rate(ray_derta_train_steps_total{{{DERTA}}}[{RATE}]))", "{{run}}")],
              unit="short", w=8),
        panel("Step time", [
            (f"histogram_quantile(0.5, sum by (le, run) (rate(ray_derta_train_step_seconds_bucket{{{DERTA}}}[{RATE}])))", "{{run}} p50"),
            (f"histogram_quantile(0.95, sum by (le, run) (rate(ray_derta_train_step_seconds_bucket{{{DERTA}}}[{RATE}])))", "{{run}} p95"),
            (f"sum by (run) (rate(ray_derta_train_step_seconds_sum{{{DERTA}}}[{RATE}])) / "
             f"sum by (run) (rate(ray_derta_train_step_seconds_count{{{DERTA}}}[{RATE}]))", "{{run}} mean"),
        ], unit="s", w=8),
        panel("Global step", [(f"max by (run) (ray_derta_train_step{{{DERTA}}})", "{{run}}")], kind="stat", w=8),
        panel("Learning rate", [(f"max by (run) (ray_derta_train_learning_rate{{{DERTA}}})", "{{run}}")], unit="sci", w=8),
        panel("Gradient norm (before clipping)", [(f"max by (run) (ray_derta_train_grad_norm{{{DERTA}}})", "{{run}}")], w=8),
        panel("MFU", [(f"max by (run) (ray_derta_train_mfu{{{DERTA}}})", "{{run}}")], unit="percentunit", w=8, maxv=1,
              desc="Model FLOPs utilisation, 6 * params * tokens/s over the GPUs' peak (GPU runs only)."),
        panel("Tokens trained", [(f"sum by (run) (ray_derta_train_tokens_total{{{DERTA}}})", "{{run}}")], kind="stat", w=8),
        row("Data (transition samples)"),
        panel("Samples built per second", [
            (f"sum by (run, kind) (rate(ray_derta_data_samples_built_total{{{DERTA}}}[{RATE}]))", "{{run}} {{kind}}")],
              unit="short", stack=True, w=8),
        panel("Samples built", [(f"sum by (kind) (ray_derta_data_samples_built_total{{{DERTA}}})", "{{kind}}")],
              kind="bargauge", w=8, desc="helpful / vanilla / prefix (MLE with harmful prefix) / rto / pref samples."),
        panel("Source rows skipped", [(f"sum by (run, reason) (ray_derta_data_rows_skipped_total{{{DERTA}}})", "{{run}} {{reason}}")],
              w=8),
        row("Ray nodes"),
        *node_panels(),
    ]
    return dashboard("derta-training", "DeRTa: training and data",
                     "Live metrics of derta data build and training (ray.util.metrics, exported by Ray).",
                     panels, "ray_derta_train_loss")


def evaluation() -> dict[str, Any]:
    panels = [
        row("Generation"),
        panel("Generations per second", [
            (f"sum by (run, attack) (rate(ray_derta_eval_generations_total{{{DERTA}}}[{RATE}]))", "{{run}} {{attack}}")],
              unit="short", stack=True),
        panel("Generated tokens per second", [
            (f"sum by (run, attack) (rate(ray_derta_eval_generated_tokens_total{{{DERTA}}}[{RATE}]))", "{{run}} {{attack}}")],
              unit="short", stack=True),
        panel("Generation batch time", [
            (f"histogram_quantile(0.5, sum by (le, attack) (rate(ray_derta_eval_batch_seconds_bucket{{{DERTA}}}[{RATE}])))", "{{attack}} p50"),
            (f"histogram_quantile(0.95, sum by (le, attack) (rate(ray_derta_eval_batch_seconds_bucket{{{DERTA}}}[{RATE}])))", "{{attack}} p95"),
            (f"sum by (attack) (rate(ray_derta_eval_batch_seconds_sum{{{DERTA}}}[{RATE}])) / "
             f"sum by (attack) (rate(ray_derta_eval_batch_seconds_count{{{DERTA}}}[{RATE}]))", "{{attack}} mean"),
        ], unit="s"),
        panel("Responses generated", [(f"sum by (attack) (ray_derta_eval_generations_total{{{DERTA}}})", "{{attack}}")],
              kind="bargauge"),
        row("Judging"),
        panel("Live ASR per attack", [
            (f"100 * sum by (run, attack) (ray_derta_eval_judge_verdicts_total{{{DERTA},verdict=\"unsafe\"}}) / "
             f"sum by (run, attack) (ray_derta_eval_judge_verdicts_total{{{DERTA}}})", "{{run}} {{attack}}")],
              unit="percent", maxv=100, desc="Share of judged responses that are unsafe so far (the run's final ASR is in eval/metrics.json)."),
        panel("Refusal rate per attack", [
            (f"100 * sum by (run, attack) (ray_derta_eval_refusals_total{{{DERTA}}}) / "
             f"sum by (run, attack) (ray_derta_eval_judge_verdicts_total{{{DERTA}}})", "{{run}} {{attack}}")],
              unit="percent", maxv=100),
        panel("Judge verdicts per second", [
            (f"sum by (attack, verdict) (rate(ray_derta_eval_judge_verdicts_total{{{DERTA}}}[{RATE}]))", "{{attack}} {{verdict}}")],
              unit="short", stack=True),
        panel("Judge verdicts", [(f"sum by (attack, verdict) (ray_derta_eval_judge_verdicts_total{{{DERTA}}})", "{{attack}} {{verdict}}")],
              kind="bargauge"),
        row("Engines (Ray)"),
        *node_panels(),
        panel("Alive actors by name", [
            (f'sum by (Name) (ray_actors{{{SESSION},State!="DEAD",Source="executor"}})', "{{Name}}")], w=12),
        panel("Ray Data rows output per second", [
            (f"sum by (dataset) (rate(ray_data_output_rows{{{SESSION}}}[{RATE}]))", "{{dataset}}")], unit="short", w=12),
    ]
    return dashboard("derta-eval", "DeRTa: evaluation",
                     "Live metrics of derta eval: generations, judge verdicts, live ASR (ray.util.metrics, exported by Ray).",
                     panels, "ray_derta_eval_generations_total")


def cluster() -> dict[str, Any]:
    panels = [
        row("Nodes"),
        *node_panels(),
        panel("Memory used", [(f"sum by (instance) (ray_node_mem_used{{{NODE}}})", "{{instance}}"),
                              (f"sum(ray_node_mem_total{{{NODE}}})", "total")], unit="bytes", w=8),
        panel("Object store memory", [(f"sum by (Location) (ray_object_store_memory{{{NODE}}})", "{{Location}}"),
                                      (f'sum(ray_resources{{Name="object_store_memory",{NODE}}})', "capacity")],
              unit="bytes", w=8),
        panel("Disk used", [(f"sum by (instance) (ray_node_disk_usage{{{NODE}}})", "{{instance}}")], unit="bytes", w=8),
        panel("Network", [(f"sum by (instance) (ray_node_network_send_speed{{{NODE}}})", "{{instance}} send"),
                          (f"sum by (instance) (ray_node_network_receive_speed{{{NODE}}})", "{{instance}} receive")],
              unit="Bps", w=12),
        panel("Disk throughput", [(f"sum by (instance) (ray_node_disk_io_read_speed{{{NODE}}})", "{{instance}} read"),
                                  (f"sum by (instance) (ray_node_disk_io_write_speed{{{NODE}}})", "{{instance}} write")],
              unit="Bps", w=12),
        row("Work"),
        panel("Active tasks by state", [
            (f'sum by (State) (ray_tasks{{{SESSION},State!~"FINISHED|FAILED"}})', "{{State}}")], stack=True, w=8),
        panel("Actors by state", [(f'sum by (State) (ray_actors{{{SESSION},Source="gcs"}})', "{{State}}")], stack=True, w=8),
        panel("Placement groups by state", [(f"sum by (State) (ray_placement_groups{{{SESSION}}})", "{{State}}")], w=8),
        panel("Ray Data rows output per second", [
            (f"sum by (dataset, operator) (rate(ray_data_output_rows{{{SESSION}}}[{RATE}]))", "{{dataset}} {{operator}}")],
              unit="short", w=12),
        panel("Time blocked in ray.train.report", [
            (f"sum by (ray_train_run_name) (ray_train_report_total_blocked_time_s{{{SESSION}}})", "{{ray_train_run_name}}")],
              unit="s", w=12, desc="Cumulative seconds training workers waited in ray.train.report (checkpoint uploads)."),
        panel("Resources in use", [(f'sum by (Name) (ray_resources{{{SESSION},State="USED",Name=~"CPU|GPU"}})', "{{Name}}"),
                                   (f'sum by (Name) (ray_resources{{{SESSION},Name=~"CPU|GPU"}})', "{{Name}} total")], w=12),
        panel("Unexpected worker failures", [
            (f"sum by (instance) (ray_node_manager_unexpected_worker_failure_total{{{SESSION}}})", "{{instance}}")], w=12),
    ]
    return dashboard("derta-ray-cluster", "DeRTa: Ray cluster",
                     "The Ray cluster under the platform (compact; Ray's full default dashboards can be provisioned too, see dashboards/README.md).",
                     panels, None)


DASHBOARDS = {"derta_training.json": training, "derta_eval.json": evaluation, "ray_cluster.json": cluster}


def render(name: str) -> str:
    return json.dumps(DASHBOARDS[name](), indent=2, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name in DASHBOARDS:
        path = HERE / name
        text = render(name)
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python {Path(__file__).relative_to(HERE.parent.parent)}): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
