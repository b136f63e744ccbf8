"""One self-contained HTML page per run: plots embedded as PNG data URIs, no network needed.

Everything is read back from what the run stored (eval/metrics.json, eval/generations.jsonl,
data/manifest.json) and from MLflow (training curves), so a report can be re-rendered later.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from derta import storage
from derta.config import ExperimentConfig
from derta.paths import RunPaths
from derta.tracking import Tracker

CURVES = ("loss", "loss_mle", "loss_rto", "tokens_per_s")


# --------------------------------------------------------------------------- inputs
def _read_json(uri: str) -> dict[str, Any]:
    return storage.read_json(uri) if storage.exists(uri) else {}


def _read_jsonl(uri: str) -> list[dict[str, Any]]:
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def training_curves(tracker: Tracker, parent_run_id: str | None) -> dict[str, list[tuple[int, float]]]:
    """Metric histories of the run's `train` stage (a child run of the pipeline's run)."""
    if not tracker.enabled or not parent_run_id:
        return {}
    client = tracker.client
    runs = client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = 'train'"
    )
    if not runs:
        return {}
    run_id = runs[0].info.run_id
    out = {}
    for name in CURVES:
        hist = client.get_metric_history(run_id, name)
        if hist:
            out[name] = sorted((m.step, m.value) for m in hist)
    return out


# --------------------------------------------------------------------------- plots
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(width: float = 5.5, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def plot_asr(asr: dict[str, float]) -> str | None:
    if not asr:
        return None
    fig, ax = _figure()
    ax.bar(list(asr), list(asr.values()), color="#c0392b")
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Attack success rate per attack (lower is safer)")
    return _png(fig)


def plot_asr_by_k(by_k: dict[str, float]) -> str | None:
    if not by_k:
        return None
    ks = sorted(by_k, key=lambda k: int(k))
    fig, ax = _figure()
    ax.plot([int(k) for k in ks], [by_k[k] for k in ks], marker="o", color="#8e44ad")
    ax.set_xlabel("harmful prefix length k (tokens)")
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Harmful-prefill attack: ASR against prefix length")
    return _png(fig)


def plot_refusal_cdf(positions: list[int]) -> str | None:
    """The paper's Fig. 4: share of refusals starting at or before each token position."""
    if not positions:
        return None
    xs = sorted(positions)
    fig, ax = _figure()
    ax.step(xs, [(i + 1) / len(xs) * 100 for i in range(len(xs))], where="post", color="#2471a3")
    ax.set_xlabel("token position of the first refusal")
    ax.set_ylabel("refusals (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Refusal position CDF ({len(xs)} refusals)")
    return _png(fig)


def plot_histogram(hist: dict[str, int], title: str, xlabel: str) -> str | None:
    if not hist:
        return None
    keys = list(hist)
    fig, ax = _figure()
    ax.bar(range(len(keys)), [hist[k] for k in keys], color="#16a085")
    step = max(1, len(keys) // 12)
    ax.set_xticks(range(0, len(keys), step), [str(k) for k in keys[::step]], rotation=45)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(title)
    return _png(fig)


def plot_curves(curves: dict[str, list[tuple[int, float]]]) -> str | None:
    losses = {k: v for k, v in curves.items() if k.startswith("loss")}
    if not losses:
        return None
    fig, ax = _figure()
    for name, points in losses.items():
        ax.plot([s for s, _ in points], [v for _, v in points], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Training losses")
    return _png(fig)


# --------------------------------------------------------------------------- page
def _highlight(response: str, refusal_word: int | None) -> str:
    """The response with the point where the model switched to refusal marked."""
    if refusal_word is None:
        return html.escape(response)
    words = response.split(" ")
    before, after = " ".join(words[:refusal_word]), " ".join(words[refusal_word:])
    return f'{html.escape(before)} <mark title="refusal starts here">{html.escape(after)}</mark>'


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _img(uri: str | None, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{uri}">' if uri else "<p class=empty>no data for this run</p>"


def render(name: str, metrics: dict, generations: list[dict], manifest: dict, curves: dict, config: dict) -> str:
    asr = metrics.get("asr") or {}
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{v:.1f}</td></tr>" for k, v in asr.items() if isinstance(v, (int, float))
    )
    headline = f"<table><tr><th>attack</th><th>ASR (%)</th></tr>{rows}</table>"
    if metrics.get("asr_mean") is not None:
        headline += f"<p>mean ASR: <b>{metrics['asr_mean']:.1f}%</b></p>"
    helpful = metrics.get("helpfulness") or {}
    if helpful:
        headline += "<p>helpfulness: " + ", ".join(
            f"{html.escape(str(k))} = {v:.3f}" for k, v in helpful.items() if isinstance(v, (int, float))) + "</p>"
    positions = [g["refusal_pos"] for g in generations if g.get("refusal_pos") is not None]
    examples = "".join(
        f"<div class=ex><div class=meta>{html.escape(str(g.get('attack')))}"
        f"{' k=' + str(g['k']) if g.get('k') is not None else ''} · "
        f"{'UNSAFE' if g.get('unsafe') else 'safe'}</div><div class=q>{html.escape(str(g.get('question', '')))}</div>"
        f"<div class=r>{_highlight(str(g.get('response', '')), g.get('refusal_word'))}</div></div>"
        for g in _pick_examples(generations)
    )
    sections = [
        _section("Summary", headline, "summary"),
        _section("ASR per attack", _img(plot_asr({k: v for k, v in asr.items() if isinstance(v, (int, float))}), "ASR per attack"), "asr"),
        _section("Prefill attack: ASR against prefix length k", _img(plot_asr_by_k(metrics.get("asr_by_k") or {}), "ASR by k"), "asr-by-k"),
        _section("Refusal position (CDF)", _img(plot_refusal_cdf(positions), "refusal CDF"), "refusal-cdf"),
        _section("Training data: prefix-length histogram",
                 _img(plot_histogram(manifest.get("prefix_len_histogram") or {}, "harmful prefix length", "tokens"), "prefix histogram"),
                 "prefix-hist"),
        _section("Training curves", _img(plot_curves(curves), "training curves"), "curves"),
        _section("Example generations", examples or "<p class=empty>no generations</p>", "examples"),
        _section("Config", f"<pre>{html.escape(json.dumps(config, indent=1))}</pre>", "config"),
    ]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>DeRTa report: {html.escape(name)}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:.3em .7em}}
img{{max-width:100%}} .ex{{border:1px solid #ddd;margin:.6em 0;padding:.5em}} .meta{{color:#666;font-size:.85em}}
.q{{font-weight:600}} mark{{background:#d4efdf}} pre{{font-size:.75em;max-height:20em;overflow:auto}} .empty{{color:#999}}
</style></head><body><h1>DeRTa report: {html.escape(name)}</h1>
{''.join(sections)}
</body></html>
"""


def _pick_examples(generations: list[dict], n: int = 8) -> list[dict]:
    """A few of each outcome: late refusals (the behaviour DeRTa adds) first, then unsafe."""
    late = [g for g in generations if (g.get("refusal_pos") or 0) > 0]
    unsafe = [g for g in generations if g.get("unsafe")]
    rest = [g for g in generations if g not in late and g not in unsafe]
    return (late[: n // 2] + unsafe[: n // 4] + rest)[:n]


def write_report(cfg: ExperimentConfig, paths: RunPaths, tracker: Tracker, parent_run_id: str | None) -> str:
    page = render(
        paths.name,
        _read_json(paths.metrics),
        _read_jsonl(paths.generations),
        _read_json(paths.manifest),
        training_curves(tracker, parent_run_id),
        cfg.redacted(),
    )
    storage.write_text(paths.report, page)
    return paths.report
