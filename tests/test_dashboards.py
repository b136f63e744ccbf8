"""Grafana dashboards and the platform's live metrics (derta.telemetry).

* every metric a dashboard queries is one the code exports: a `ray_derta_*` series from
  derta.telemetry.PROMETHEUS_NAMES (with only that metric's labels), or a series Ray itself
  exports (the names in the dashboards Ray generates for the installed version);
* every exported derta metric is on some dashboard; the committed JSON is what generate.py makes;
* provisioning files are valid; the README explains the setup;
* the naming rule behind PROMETHEUS_NAMES holds on a real local Ray: metrics recorded through
  the record_* functions (driver and a Ray task) appear under exactly those names on the
  node's Prometheus endpoint.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import yaml

from _fixtures import ray_local  # noqa: F401
from derta import telemetry

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "dashboards" / "grafana"
DASHBOARD_FILES = ["derta_training.json", "derta_eval.json", "ray_cluster.json"]


# --------------------------------------------------------------------------- a small PromQL reader
_TOKEN = re.compile(r"""
    (?P<string>"(?:[^"\\]|\\.)*") |
    (?P<labels>\{[^}]*\}) |
    (?P<range>\[[^\]]*\]) |
    (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?) |
    (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*) |
    (?P<other>\S)
""", re.X)
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
# Aggregation operators: `sum by (x) (...)` puts the clause between the name and its "(".
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                 "quantile", "limitk", "limit_ratio"}
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"')


def parse_promql(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """(selectors [(metric name, labels matched)], labels in by/without/on/ignoring clauses)."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
    toks = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    selectors: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else (None, "")
        if kind == "ident" and text in _KEYWORDS:
            if text in ("by", "without", "on", "ignoring", "group_left", "group_right") and nxt[1] == "(":
                j = i + 2
                while j < len(toks) and toks[j][1] != ")":
                    if toks[j][0] == "ident":
                        grouping.add(toks[j][1])
                    j += 1
                i = j
        elif kind == "ident" and (nxt[1] == "(" or text in _AGGREGATIONS):
            pass  # a function or an aggregation
        elif kind == "ident":
            labels = set(_MATCHER.findall(nxt[1])) if nxt[0] == "labels" else set()
            selectors.append((text, labels))
        elif kind == "labels" and (i == 0 or toks[i - 1][0] != "ident"):
            selectors.append(("", set(_MATCHER.findall(text))))  # a bare {__name__=~...} selector
        i += 1
    return selectors, grouping


def test_promql_reader():
    sel, grp = parse_promql('histogram_quantile(0.5, sum by (le, run) (rate(ray_derta_x_bucket{SessionName=~"$S",run=~"a|b"}[$__rate_interval]))) / on() vector(1)')
    assert sel == [("ray_derta_x_bucket", {"SessionName", "run"})] and grp == {"le", "run"}
    sel, _ = parse_promql('100 * sum(a_total{verdict="unsafe"}) / sum(b) or clamp_min(c{x!~"y"}, 0)')
    assert sel == [("a_total", {"verdict"}), ("b", set()), ("c", {"x"})]


# --------------------------------------------------------------------------- what the dashboards query
def load(name: str) -> dict[str, Any]:
    return json.loads((GRAFANA / name).read_text())


def all_panels(d: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def queries(d: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for p in all_panels(d):
        for t in p.get("targets", []):
            yield f"panel {p['title']!r} {t['refId']}", t["expr"]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)", q.strip())
            assert m, f"variable {v['name']}: expected label_values(selector, label), got {q!r}"
            yield f"variable {v['name']}", m.group(1)


@lru_cache(maxsize=1)
def ray_exported_names() -> frozenset[str]:
    """Series Ray exports, as Ray's own generated dashboards (default, data, train) query them."""
    from ray.dashboard.modules.metrics.grafana_dashboard_factory import (
        generate_data_grafana_dashboard,
        generate_default_grafana_dashboard,
        generate_train_grafana_dashboard,
    )

    names: set[str] = set()
    for gen in (generate_default_grafana_dashboard, generate_data_grafana_dashboard, generate_train_grafana_dashboard):
        d = json.loads(gen()[0])
        for p in all_panels(d):
            for t in p.get("targets", []):
                names |= {n for n, _ in parse_promql(t.get("expr", ""))[0] if n}
    return frozenset(names)


def metric_problems(d: dict[str, Any]) -> list[str]:
    """Every query of a dashboard whose series the code does not export, or that uses a label
    (matcher or grouping) the derta series does not carry."""
    ray_names = ray_exported_names()
    out = []
    for where, expr in queries(d):
        selectors, grouping = parse_promql(expr)
        if not selectors:
            out.append(f"{where}: no metric in {expr!r}")
        derta_labels: set[str] = set()
        for metric, labels in selectors:
            if metric == "":
                if not labels <= telemetry.RAY_LABELS | {"__name__"}:
                    out.append(f"{where}: unknown label(s) {labels}")
            elif metric.startswith("ray_derta_"):
                if metric not in telemetry.PROMETHEUS_NAMES:
                    out.append(f"{where}: {metric} is not exported by derta.telemetry")
                    continue
                allowed = telemetry.prometheus_labels(metric)
                if not labels <= allowed:
                    out.append(f"{where}: {metric} has no label(s) {sorted(labels - allowed)}")
                derta_labels |= allowed
            elif metric not in ray_names:
                out.append(f"{where}: {metric} is neither a derta nor a Ray metric")
        if derta_labels and all(m.startswith("ray_derta_") for m, _ in selectors if m) and not grouping <= derta_labels:
            out.append(f"{where}: grouping by unknown label(s) {sorted(grouping - derta_labels)}")
    return out


def test_every_dashboard_metric_is_exported_by_the_code():
    assert {"ray_node_cpu_utilization", "ray_node_gpus_utilization", "ray_tasks"} <= ray_exported_names()
    for name in DASHBOARD_FILES:
        assert metric_problems(load(name)) == [], name
    # The check is not vacuous: a typo'd series, a Ray-looking name Ray does not export, a label
    # the metric lacks and a grouping by it are all caught.
    bad = {"panels": [{"title": "t", "targets": [
        {"refId": "A", "expr": 'sum(rate(ray_derta_train_token_total{run=~"$run"}[5m]))'},
        {"refId": "B", "expr": "ray_node_gpu_utilisation"},
        {"refId": "C", "expr": 'sum by (attack) (ray_derta_train_loss{attack="x"})'}]}], "templating": {"list": []}}
    problems = metric_problems(bad)
    assert len(problems) == 4 and "ray_derta_train_token_total" in problems[0] and "ray_node_gpu_utilisation" in problems[1]


def test_every_exported_metric_is_on_a_dashboard():
    used = {m for name in DASHBOARD_FILES for _, e in queries(load(name)) for m, _ in parse_promql(e)[0]}
    for spec in telemetry.SPECS:
        assert used & set(spec.prometheus_names), f"{spec.name} is exported but on no dashboard"
    training, evaluation = load("derta_training.json"), load("derta_eval.json")
    text = {n: json.dumps(d) for n, d in (("training", training), ("eval", evaluation))}
    for series in ("ray_derta_train_tokens_per_second", "ray_derta_train_loss", "ray_derta_data_samples_built_total"):
        assert series in text["training"]
    for series in ("ray_derta_eval_generations_total", "ray_derta_eval_judge_verdicts_total"):
        assert series in text["eval"]


def test_dashboards_are_well_formed_and_generated():
    uids = set()
    for name in DASHBOARD_FILES:
        d = load(name)
        assert d["uid"] not in uids and d["title"] and d["schemaVersion"] >= 36
        uids.add(d["uid"])
        ids = [p["id"] for p in all_panels(d)]
        assert len(ids) == len(set(ids))
        names = {v["name"] for v in d["templating"]["list"]}
        assert {"datasource", "SessionName"} <= names
        assert next(v for v in d["templating"]["list"] if v["name"] == "datasource")["query"] == "prometheus"
        for p in all_panels(d):
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, (name, p["title"])
            if p["type"] != "row":
                assert p["targets"] and p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert all(t["datasource"] == p["datasource"] and t["expr"] for t in p["targets"])
                assert "$SessionName" in json.dumps(p["targets"]), (name, p["title"])
        used_vars = set(re.findall(r"\$([A-Za-z]\w*)", json.dumps(d["panels"]))) - {"__rate_interval", "__range"}
        assert used_vars <= names, f"{name}: undefined variable(s) {used_vars - names}"
    spec = importlib.util.spec_from_file_location("derta_dashboards_generate", GRAFANA / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for name in DASHBOARD_FILES:
        assert (GRAFANA / name).read_text() == gen.render(name), f"{name} is stale: run python dashboards/grafana/generate.py"


def test_provisioning_and_readme():
    dash = yaml.safe_load((GRAFANA / "provisioning" / "dashboards.yaml").read_text())
    assert dash["apiVersion"] == 1
    paths = [p["options"]["path"] for p in dash["providers"]]
    assert all(p["type"] == "file" for p in dash["providers"]) and "/etc/grafana/dashboards/derta" in paths
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources.yaml").read_text())
    prom = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    assert ds["apiVersion"] == 1 and len(prom) == 1 and prom[0]["url"].startswith("http")
    prom_cfg = yaml.safe_load((REPO / "dashboards" / "prometheus" / "prometheus.yml").read_text())
    sd = prom_cfg["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert sd == ["/tmp/ray/prom_metrics_service_discovery.json"]
    readme = (REPO / "dashboards" / "README.md").read_text()
    for needle in [*DASHBOARD_FILES, "provisioning/dashboards.yaml", "provisioning/datasources.yaml",
                   "metrics-export-port", "prom_metrics_service_discovery.json", "ray_derta_", "generate.py"]:
        assert needle in readme, needle


# --------------------------------------------------------------------------- telemetry without Ray
def test_metric_specs_follow_prometheus_and_ray_rules():
    assert len(set(telemetry.METRIC_NAMES)) == len(telemetry.METRIC_NAMES)
    for s in telemetry.SPECS:
        assert re.fullmatch(r"derta_[a-z0-9_]+", s.name) and s.description and "run" in s.tag_keys
        assert not s.name.endswith("_total"), "Ray appends _total to counters itself"
        assert s.kind != "histogram" or list(s.boundaries) == sorted(s.boundaries)
    assert telemetry.SPEC_BY_NAME["derta_data_samples_built"].prometheus_names == ("ray_derta_data_samples_built_total",)
    assert telemetry.SPEC_BY_NAME["derta_train_loss"].prometheus_names == ("ray_derta_train_loss",)
    assert len(telemetry.PROMETHEUS_NAMES) == sum(len(s.prometheus_names) for s in telemetry.SPECS)


def test_record_functions_are_safe_no_ops_without_ray(monkeypatch):
    monkeypatch.setenv("DERTA_TELEMETRY", "0")
    assert not telemetry.enabled()
    telemetry.record_train_step({"loss": 1.0, "tokens_per_s": float("nan")}, step=1, tokens=10, step_seconds=0.1)
    telemetry.record_samples_built({"rto": 3})
    telemetry.record_rows_skipped(1, reason="bad_row")
    telemetry.record_generations("prefill", 4, tokens=40, seconds=0.5)
    telemetry.record_verdicts("prefill", unsafe=1, safe=3, refused=3)
    telemetry.record_judged_rows([{"attack": "prefill", "unsafe": True, "refusal_pos": None}])
    rows = [{"attack": "prefill", "unsafe": True, "refusal_pos": 7}, {"attack": "prefill", "unsafe": False, "refusal_pos": 0},
            {"attack": "completion", "unsafe": False, "refusal_pos": None, "refused": False}]
    assert telemetry.verdict_counts(rows) == {"prefill": {"unsafe": 1, "safe": 1, "refused": 2},
                                              "completion": {"unsafe": 0, "safe": 1, "refused": 0}}


# --------------------------------------------------------------------------- the naming rule on a real Ray
def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_recorded_metrics_reach_prometheus_under_the_dashboard_names(ray_local):  # noqa: F811
    import ray

    assert telemetry.enabled()
    run = "telemetry-test"
    telemetry.record_train_step({"loss": 2.0, "loss_mle": 1.5, "loss_rto": 0.5, "loss_pref": 0.0, "tokens_per_s": 1234.0,
                                 "lr": 1e-4, "grad_norm": 0.7, "mfu": 0.41}, step=3, steps=1, tokens=4096,
                                step_seconds=0.8, run=run)
    telemetry.record_samples_built({"rto": 5, "prefix": 4}, run=run)
    telemetry.record_rows_skipped(2, reason="too_long", run=run)
    telemetry.record_judged_rows([{"attack": "prefill", "unsafe": True, "refusal_pos": None},
                                  {"attack": "prefill", "unsafe": False, "refusal_pos": 3}], run=run)

    @ray.remote(num_cpus=0)
    class Engine:  # eval engines and training workers record from their own Ray processes
        def generate(self) -> bool:
            from derta import telemetry as t

            t.record_generations("prefill", 8, tokens=96, seconds=1.5, run="telemetry-test")
            return t.enabled()

    engine = Engine.remote()  # kept alive until scraped: a process reports its metrics periodically
    assert ray.get(engine.generate.remote())
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    deadline, missing, text = time.monotonic() + 60, set(telemetry.PROMETHEUS_NAMES), ""
    while missing and time.monotonic() < deadline:
        time.sleep(1.0)
        text = _scrape(port)
        exported = set(re.findall(r"^(ray_derta_[a-zA-Z0-9_:]*)", text, re.M))
        missing = set(telemetry.PROMETHEUS_NAMES) - exported
    ray.kill(engine)
    assert not missing, f"not exported under the expected name: {sorted(missing)}"
    stray = exported - set(telemetry.PROMETHEUS_NAMES)
    assert not stray, f"exported but unknown to derta.telemetry: {sorted(stray)}"

    def value(series: str, **labels: str) -> float:
        for line in text.splitlines():
            if line.startswith(series + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{series} {labels} not in the scrape")

    assert value("ray_derta_train_loss", run=run, kind="rto") == 0.5
    assert value("ray_derta_train_tokens_per_second", run=run) == 1234.0
    assert value("ray_derta_data_samples_built_total", run=run, kind="rto") == 5
    assert value("ray_derta_eval_judge_verdicts_total", run=run, attack="prefill", verdict="unsafe") == 1
    assert value("ray_derta_eval_generations_total", run=run, attack="prefill") == 8
    assert value("ray_derta_train_step_seconds_count", run=run) == 1
