"""The report's figures: matplotlib (Agg) rendered to PNG data URIs, so a page needs no network.

Every function takes the runs to compare (one for a run's page, all for an experiment's page)
and returns None when there is nothing to draw, so the page can say "no data" instead.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Sequence

from derta.report.data import (
    RunData,
    asr_by_attack,
    asr_mean,
    helpfulness_mean,
    position_unit,
    prefix_histogram,
    refusal_positions,
)

PALETTE = ["#2471a3", "#c0392b", "#27ae60", "#8e44ad", "#d35400", "#16a085", "#7f8c8d", "#b7950b", "#2c3e50", "#e84393"]
CURVE_PANELS = (("loss", "loss (total)"), ("loss_mle", "loss_mle (MLE with harmful prefix)"),
                ("loss_rto", "loss_rto (refusal at every position)"), ("tokens_per_s", "throughput (tokens/s)"))


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure(width: float = 7.5, height: float = 3.6, **kw: Any):
    return _plt().subplots(figsize=(width, height), **kw)


def png_bytes(fig, tight: bool = True) -> bytes:
    """The figure as PNG (and closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight" if tight else None)
    _plt().close(fig)
    return buf.getvalue()


def png_uri(fig, tight: bool = True) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(fig, tight)).decode()


def _legend(ax, n: int) -> None:
    if n > 1:
        ax.legend(fontsize=8, frameon=False, ncols=1 if n < 6 else 2)


# --------------------------------------------------------------------------- safety
def asr_bars(runs: Sequence[RunData]) -> str | None:
    """ASR per attack, one bar per run in each attack's group (lower is safer)."""
    data = [(r.name, asr_by_attack(r.metrics)) for r in runs]
    data = [(n, a) for n, a in data if a]
    if not data:
        return None
    attacks: list[str] = []
    for _, a in data:
        attacks += [k for k in a if k not in attacks]
    fig, ax = figure(max(6.0, 1.4 * len(attacks) * max(1, len(data)) ** 0.5 + 3))
    width = 0.8 / len(data)
    for i, (name, a) in enumerate(data):
        xs = [j + (i - (len(data) - 1) / 2) * width for j in range(len(attacks))]
        vals = [a.get(k) for k in attacks]
        bars = ax.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None],
                      width=width * 0.95, color=color(i), label=name)
        if len(data) * len(attacks) <= 24:
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(attacks)), attacks)
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Attack success rate per attack (lower is safer)")
    _legend(ax, len(data))
    return png_uri(fig)


def refusal_cdf(runs: Sequence[RunData]) -> str | None:
    """The paper's Fig. 4: share of refusals that start at or before each position, per run."""
    data = [(r.name, refusal_positions(r), position_unit(r)) for r in runs]
    data = [d for d in data if d[1]]
    if not data:
        return None
    fig, ax = figure()
    for i, (name, pos, _) in enumerate(data):
        xs = sorted(pos)
        first5 = 100.0 * sum(p < 5 for p in xs) / len(xs)
        ys = [100.0 * (j + 1) / len(xs) for j in range(len(xs))]
        ax.step([0] + xs, [0.0] + ys, where="post", color=color(i), label=f"{name} ({len(xs)} refusals, {first5:.0f}% in first 5)")
    ax.axvline(5, color="#999", ls=":", lw=1)
    units = {u for _, _, u in data}
    ax.set_xlabel(f"position of the first refusal in the response ({'/'.join(sorted(units))}s)")
    ax.set_ylabel("refusals at or before (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(left=0)
    ax.set_title("Refusal position CDF (paper Fig. 4; DeRTa moves mass to the right)")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return png_uri(fig)


def asr_by_k(runs: Sequence[RunData]) -> str | None:
    """Harmful-prefill attack: ASR against the prefilled prefix length k, one line per run."""
    data = []
    for r in runs:
        by_k = {}
        for k, v in (r.metrics.get("asr_by_k") or {}).items():
            try:
                if v is not None:
                    by_k[int(k)] = float(v)
            except (TypeError, ValueError):
                continue
        if by_k:
            data.append((r.name, dict(sorted(by_k.items()))))
    if not data:
        return None
    fig, ax = figure()
    for i, (name, by_k) in enumerate(data):
        ax.plot(list(by_k), list(by_k.values()), marker="o", color=color(i), label=name)
    ax.set_xlabel("harmful prefix length k (tokens prefilled)")
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("Prefill attack: ASR against prefix length k")
    _legend(ax, len(data))
    return png_uri(fig)


def safety_vs_helpfulness(runs: Sequence[RunData], focus: str | None = None) -> str | None:
    """One point per run: helpfulness (mean benchmark score) against safety (100 - mean ASR)."""
    pts = []
    for r in runs:
        a, h = asr_mean(r.metrics), helpfulness_mean(r.metrics)
        if a is not None and h is not None:
            pts.append((r, h, 100.0 - a))
    if not pts:
        return None
    methods: list[str] = []
    for r, _, _ in pts:
        if r.method not in methods:
            methods.append(r.method)
    fig, ax = figure(6.5, 4.2)
    seen: set[str] = set()
    for r, h, s in pts:
        c = color(methods.index(r.method))
        big = focus is not None and r.name == focus
        ax.scatter([h], [s], s=110 if big else 55, color=c, edgecolors="black" if big else "none", linewidths=1.5,
                   label=None if r.method in seen else r.method, zorder=3)
        seen.add(r.method)
        ax.annotate(r.name, (h, s), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("helpfulness (mean benchmark score, %)")
    ax.set_ylabel("safety (100 - mean ASR, %)")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title("Safety vs helpfulness across runs (top right is best)")
    ax.legend(fontsize=8, frameon=False, title="method", title_fontsize=8, loc="lower left")
    return png_uri(fig)


# --------------------------------------------------------------------------- training
def prefix_hist(runs: Sequence[RunData]) -> str | None:
    """Harmful-prefix lengths of the training samples (data/manifest.json), grouped by bucket."""
    data = [(r.name, prefix_histogram(r.manifest)) for r in runs]
    data = [(n, h) for n, h in data if h and sum(h.values()) > 0]
    if not data:
        return None
    buckets: list[str] = []
    for _, h in data:
        buckets += [b for b in h if b not in buckets]
    fig, ax = figure()
    width = 0.8 / len(data)
    for i, (name, h) in enumerate(data):
        total = sum(h.values())
        xs = [j + (i - (len(data) - 1) / 2) * width for j in range(len(buckets))]
        ax.bar(xs, [100.0 * h.get(b, 0) / total for b in buckets], width=width * 0.95, color=color(i),
               label=f"{name} ({total} samples)")
    ax.set_xticks(range(len(buckets)), buckets, rotation=30 if len(buckets) > 8 else 0)
    ax.set_xlabel("harmful prefix length (tokens) of a training sample")
    ax.set_ylabel("samples (%)")
    ax.set_title("Training data: harmful-prefix length histogram")
    ax.legend(fontsize=8, frameon=False)
    return png_uri(fig)


def training_curves(runs: Sequence[RunData]) -> str | None:
    """loss, loss_mle, loss_rto and tokens/s against the optimizer step, one line per run."""
    data = [r for r in runs if r.curves]
    if not data:
        return None
    fig, axes = figure(10.0, 6.2, nrows=2, ncols=2)
    for ax, (key, title) in zip(axes.flat, CURVE_PANELS):
        drawn = 0
        for i, r in enumerate(runs):
            pts = r.curves.get(key) or []
            if not pts:
                continue
            ax.plot([s for s, _ in pts], [v for _, v in pts], color=color(i), label=r.name, lw=1.4,
                    marker="o" if len(pts) < 12 else None, ms=3)
            drawn += 1
            if key == "loss_rto" and any(v for _, v in r.curves.get("loss_pref") or []):
                pref = r.curves["loss_pref"]
                ax.plot([s for s, _ in pref], [v for _, v in pref], color=color(i), ls="--", lw=1.2,
                        label=f"{r.name} loss_pref")
                drawn += 1
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=8)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="#999")
        elif drawn > 1:
            ax.legend(fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.95, hspace=0.38, wspace=0.18)  # cheaper than tight
    return png_uri(fig, tight=False)
