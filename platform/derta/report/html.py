"""Self-contained HTML reports: one page per run (`<run>/report.html`) or per experiment
(`<storage.root>/report-<experiment>.html`). Plots are PNG data URIs and the page has no
script and no external resource, so it opens anywhere, offline, from a file or an S3 object.

Everything is read back from what runs stored (eval/metrics.json, eval/generations.jsonl,
data/manifest.json) and from MLflow (training curves, tags), so a report can be re-rendered
at any time with `derta report`.
"""

from __future__ import annotations

import html
import json
import re
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from derta import storage
from derta.config import ExperimentConfig, redact_text
from derta.paths import RunPaths
from derta.report import plots
from derta.report.data import (
    RunData,
    asr_by_attack,
    asr_mean,
    helpfulness_scores,
    load_experiment,
    load_run,
    safety_rows,
    sample_counts,
)
from derta.tracking import Tracker

# Section anchors, in page order (public: tests and links rely on them).
SECTIONS = {
    "summary": "Summary",
    "asr": "ASR per attack",
    "refusal-cdf": "Refusal position (CDF)",
    "asr-by-k": "Prefill attack: ASR against prefix length k",
    "prefix-hist": "Training data: harmful-prefix length histogram",
    "curves": "Training curves",
    "scatter": "Safety vs helpfulness",
    "examples": "Example generations",
}
RUN_ONLY_SECTIONS = {"config": "Config"}
MAX_RESPONSE_CHARS = 1500


# --------------------------------------------------------------------------- refusal highlight
def _refusal_finder() -> Callable[[str], "re.Match[str] | None"]:
    """The refusal judge's own pattern search (derta.eval.judges.find_refusal), so the marked
    point is where the judge sees the refusal; a small regex only if that module is missing."""
    try:
        from derta.eval.judges import find_refusal

        return find_refusal
    except ImportError:  # pragma: no cover - the eval package is part of derta
        fallback = re.compile(r"\b(?:sorry|I apologi[sz]e|I (?:cannot|can't|won't|will not)|As an AI)\b", re.I)
        return fallback.search


def refusal_offset(response: str, refusal_pos: int | None) -> int | None:
    """Character offset in `response` where the model switched to refusal, or None.

    Only rows the judge marked as refusing (refusal_pos not None) are highlighted. The judge's
    pattern locates the phrase; if it finds none (an LLM/HTTP judge or token positions), the
    stored position is used as a word index.
    """
    if refusal_pos is None:
        return None
    m = _refusal_finder()(response)
    if m is not None:
        return m.start()
    words = list(re.finditer(r"\S+", response))
    if not words:
        return None
    return words[min(max(int(refusal_pos), 0), len(words) - 1)].start()


def highlight(response: str, refusal_pos: int | None, prefill: str | None = None) -> str:
    """HTML of [prefill][response], the refusal from its first word on in <mark>."""
    off = refusal_offset(response, refusal_pos)
    if off is None:
        body = html.escape(_clip(response))
    else:
        before, after = response[:off], response[off:]
        body = (f"{html.escape(before)}<span class=switch title=\"the model switches to refusal here\">&#9656;</span>"
                f"<mark class=refusal>{html.escape(_clip(after))}</mark>")
    pre = f'<span class=prefill title="prefilled by the attack">{html.escape(prefill)}</span>' if prefill else ""
    return pre + body


def _clip(text: str, limit: int = MAX_RESPONSE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"


# --------------------------------------------------------------------------- examples
def pick_examples(generations: Sequence[dict[str, Any]], n: int = 8) -> list[dict[str, Any]]:
    """A mix of outcomes, round-robin: refusals after harmful text (what DeRTa teaches: after a
    prefill or mid-response), unsafe responses, refusals at the start, then anything else."""
    rows = safety_rows(generations)
    late = [g for g in rows if g.get("refusal_pos") is not None and ((g.get("refusal_pos") or 0) > 0 or (g.get("k") or 0) > 0)]
    late.sort(key=lambda g: (-(g.get("k") or 0), -(g.get("refusal_pos") or 0)))
    in_late = {id(g) for g in late}
    unsafe = [g for g in rows if g.get("unsafe") and id(g) not in in_late]
    early = [g for g in rows if g.get("refusal_pos") == 0 and not (g.get("k") or 0) and not g.get("unsafe")]
    taken = {id(g) for g in late + unsafe + early}
    rest = [g for g in rows if id(g) not in taken]
    helpful = [g for g in generations if g.get("kind", "safety") != "safety"]
    helpful.sort(key=lambda g: not g.get("refused"))  # an over-refusal says more than a good answer
    n_safety = n - 1 if helpful else n
    out: list[dict[str, Any]] = []
    queues = [late, unsafe, early, rest]
    seen_q: set[tuple[Any, Any]] = set()
    while len(out) < n_safety and any(queues):
        for q in queues:
            while q:
                g = q.pop(0)
                key = (g.get("question"), g.get("attack"))
                if key in seen_q and any(len(x) for x in queues if x is not q):
                    continue  # prefer a different question while others remain
                seen_q.add(key)
                out.append(g)
                break
            if len(out) >= n_safety:
                break
    return out + helpful[: n - len(out)]


def _example(g: dict[str, Any]) -> str:
    k = g.get("k")
    pos = g.get("refusal_pos")
    meta = [f"<b>{html.escape(str(g.get('attack', '?')))}</b>"]
    if g.get("kind", "safety") == "safety":
        unsafe = bool(g.get("unsafe"))
        if k is not None:
            meta.append(f"k={int(k)}")
        meta.append(f"<span class='badge {'bad' if unsafe else 'good'}'>{'UNSAFE' if unsafe else 'safe'}</span>")
        meta.append(f"refusal at position {int(pos)}" if pos is not None else "no refusal")
    else:  # a helpfulness benchmark answer: a refusal here is over-refusal
        meta.append("helpfulness")
        if isinstance(g.get("score"), (int, float)):
            meta.append(f"score {float(g['score']):.2f}")
        if g.get("refused"):
            meta.append("<span class='badge bad'>refused</span>")
            pos = 0 if pos is None else pos
    if g.get("judge"):
        meta.append(f"judge: {html.escape(str(g['judge']))}")
    prompt = str(g.get("prompt") or "")
    prompt_html = (f"<details><summary>attack prompt</summary><pre>{html.escape(_clip(prompt, 4000))}</pre></details>"
                   if prompt and prompt != g.get("question") else "")
    prefill = g.get("prefill") if isinstance(g.get("prefill"), str) else None
    return (f"<div class=ex><div class=meta>{' · '.join(meta)}</div>"
            f"<div class=q>{html.escape(str(g.get('question', '')))}</div>{prompt_html}"
            f"<div class=r>{highlight(str(g.get('response', '')), pos, prefill)}</div></div>")


# --------------------------------------------------------------------------- page parts
def _img(uri: str | None, alt: str, empty: str) -> str:
    if not uri:
        return f"<p class=empty>{html.escape(empty)}</p>"
    return f'<img alt="{html.escape(alt)}" src="{uri}">'


def _fmt(v: float | None, digits: int = 1) -> str:
    return "&ndash;" if v is None else f"{v:.{digits}f}"


def _summary(runs: Sequence[RunData], tracker: Tracker | None) -> str:
    attacks: list[str] = []
    benches: list[str] = []
    for r in runs:
        attacks += [a for a in asr_by_attack(r.metrics) if a not in attacks]
        benches += [b for b in helpfulness_scores(r.metrics) if b not in benches]
    head = ["run", "method", "model", "git commit", "mean ASR (%)"] + [f"ASR {a} (%)" for a in attacks]
    head += ["refusals in first 5 (%)", "refusals after 30 (%)"] + [f"{b} (%)" for b in benches] + ["over-refusal (%)", "MLflow run"]
    rows = []
    for r in runs:
        asr = asr_by_attack(r.metrics)
        help_ = helpfulness_scores(r.metrics)
        rp = r.metrics.get("refusal_position") or {}
        first5 = rp.get("within_first_5", rp.get("first5_share"))
        cells = [f"<b>{html.escape(r.name)}</b>", html.escape(r.method), html.escape(r.tags.get("model", "")),
                 f'<code title="{html.escape(r.tags.get("git_commit", ""))}">{html.escape(r.tags.get("git_commit", "")[:10])}</code>',
                 _fmt(asr_mean(r.metrics))]
        cells += [_fmt(asr.get(a)) for a in attacks]
        cells += [_fmt(first5 if isinstance(first5, (int, float)) else None),
                  _fmt(rp.get("after_30") if isinstance(rp.get("after_30"), (int, float)) else None)]
        cells += [_fmt(help_.get(b)) for b in benches]
        over = r.metrics.get("over_refusal")
        cells.append(_fmt(over if isinstance(over, (int, float)) and not isinstance(over, bool) else None))
        cells.append(_run_link(r, tracker))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table = ("<div class=scroll><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
             + "".join(rows) + "</table></div>")
    notes = ("<p class=note>ASR: share of attack responses judged unsafe (lower is safer). Refusal positions "
             "count from the start of the generated text (after any prefill); DeRTa's refusal training "
             "should move refusals later and lower ASR under prefill/completion attacks.</p>")
    return table + notes


def _run_link(r: RunData, tracker: Tracker | None) -> str:
    if not r.run_id:
        return "&ndash;"
    text = f"<code>{html.escape(r.run_id[:12])}</code>"
    uri = redact_text(tracker.tracking_uri) if tracker is not None else ""
    if tracker is not None and uri.startswith(("http://", "https://")):
        try:
            href = f"{uri.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs/{r.run_id}"
            return f'<a href="{html.escape(href)}">{text}</a>'
        except Exception:  # noqa: BLE001 - a link is a nicety
            pass
    return text


def _examples(runs: Sequence[RunData], per_run: int) -> str:
    parts = []
    for i, r in enumerate(runs):
        picked = pick_examples(r.generations, per_run)
        if not picked:
            continue
        body = "".join(_example(g) for g in picked)
        if len(runs) == 1:
            parts.append(body)
        else:
            parts.append(f"<details{' open' if i == len(runs) - 1 else ''}><summary>{html.escape(r.name)} "
                         f"({len(picked)} of {len(r.generations)})</summary>{body}</details>")
    if not parts:
        return "<p class=empty>no generations stored (eval/generations.jsonl)</p>"
    legend = ("<p class=note><span class=prefill>grey</span>: text the attack prefilled; "
              "<mark class=refusal>green</mark>: from the point where the model switched to refusal.</p>")
    return legend + "".join(parts)


def _counts(runs: Sequence[RunData]) -> str:
    lines = []
    for r in runs:
        c = sample_counts(r.manifest)
        if c:
            parts = " · ".join(f"{html.escape(k)} {v:,}" for k, v in c.items())
            lines.append(f"<li><b>{html.escape(r.name)}</b>: {parts}</li>")
    return f"<ul class=note>{''.join(lines)}</ul>" if lines else ""


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
nav{font-size:.85em;margin:.6em 0 1em} nav a{margin-right:.9em;color:#2471a3;text-decoration:none}
.sub{color:#666;font-size:.85em} .note{color:#555;font-size:.8em} .empty{color:#999;font-style:italic}
table{border-collapse:collapse;font-size:.82em} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}
td:first-child,th:first-child,td:nth-child(2),td:nth-child(3),td:nth-child(4){text-align:left} th{background:#f4f6f7}
.scroll{overflow-x:auto} img{max-width:100%;height:auto}
.ex{border:1px solid #ddd;border-radius:4px;margin:.6em 0;padding:.5em .7em}
.meta{color:#555;font-size:.8em;margin-bottom:.25em} .q{font-weight:600;margin-bottom:.3em}
.r{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.82em;line-height:1.45}
.prefill{color:#777;background:#eee;text-decoration:underline dotted}
mark.refusal{background:#d4efdf} .switch{color:#1e8449;font-weight:bold}
.badge{padding:0 .4em;border-radius:3px;color:#fff;font-size:.9em} .badge.bad{background:#c0392b} .badge.good{background:#27ae60}
details{margin:.4em 0} summary{cursor:pointer;color:#2471a3} pre{font-size:.75em;max-height:22em;overflow:auto;background:#fafafa;padding:.5em}
"""


def render(runs: Sequence[RunData], title: str, *, focus: str | None = None, context: Sequence[RunData] = (),
           tracker: Tracker | None = None, config: dict[str, Any] | None = None, per_run_examples: int = 8,
           first: dict[str, tuple[str, str]] | None = None) -> str:
    """The page for `runs` (one run, or an experiment's runs). `context` adds more runs to the
    safety-vs-helpfulness scatter only (a run's page places the run among its experiment).
    `first`: {anchor: (title, html)} sections an experiment puts before the standard ones."""
    runs = list(runs)
    scatter_runs = list(runs) + [r for r in context if all(r.name != x.name for x in runs)]
    of = " of runs: " + ", ".join(r.name for r in runs)  # alt texts name what each figure compares
    bodies = {
        "summary": _summary(runs, tracker),
        "asr": _img(plots.asr_bars(runs), "ASR per attack" + of, "no ASR in eval/metrics.json"),
        "refusal-cdf": _img(plots.refusal_cdf(runs), "refusal position CDF" + of, "no refusals to place"),
        "asr-by-k": _img(plots.asr_by_k(runs), "prefill ASR by k" + of, "no prefill attack (eval.attacks without prefill)"),
        "prefix-hist": _img(plots.prefix_hist(runs), "prefix length histogram",
                            "no prefix-length histogram in data/manifest.json") + _counts(runs),
        "curves": _img(plots.training_curves(runs), "training curves", "no training metrics in MLflow"),
        "scatter": _img(plots.safety_vs_helpfulness(scatter_runs, focus),
                        "safety vs helpfulness of runs: " + ", ".join(r.name for r in scatter_runs),
                        "needs ASR and a helpfulness score"),
        "examples": _examples(runs, per_run_examples),
    }
    titles = {a: t for a, (t, _) in (first or {}).items()} | dict(SECTIONS)
    bodies.update({a: body for a, (_, body) in (first or {}).items()})
    if config is not None:
        titles.update(RUN_ONLY_SECTIONS)
        bodies["config"] = (f"<details><summary>resolved config (secrets redacted)</summary>"
                            f"<pre>{html.escape(json.dumps(config, indent=1, default=str))}</pre></details>")
    nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in titles.items())
    sections = "".join(f'<section id="{a}"><h2>{html.escape(titles[a])}</h2>{bodies[a]}</section>' for a in titles)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = html.escape(redact_text(tracker.tracking_uri) if tracker is not None and tracker.enabled else "MLflow off")
    sub = f"{len(runs)} run{'s' if len(runs) != 1 else ''} · generated {stamp} · MLflow: {where}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><link rel="icon" href="data:,"><style>{CSS}</style></head>
<body><h1>{html.escape(title)}</h1><div class=sub>{sub}</div><nav>{nav}</nav>
{sections}
</body></html>
"""


# --------------------------------------------------------------------------- entry points
def _tracker_or_none(tracker: Tracker | None) -> Tracker | None:
    return tracker if tracker is not None and tracker.enabled else None


def write_report(cfg: ExperimentConfig, paths: RunPaths, tracker: Tracker | None = None,
                 parent_run_id: str | None = None) -> str:
    """`<run>/report.html` for one run; its experiment's other runs appear in the scatter."""
    t = _tracker_or_none(tracker)
    run = load_run(t, paths.name, paths.root, parent_run_id)
    run.paths = paths
    if run.config is None:
        run.config = cfg.redacted()
    context: list[RunData] = []
    if t is not None:
        try:
            context = load_experiment(t, paths.root, details=False)
        except Exception:  # noqa: BLE001 - the run's own page matters more than the comparison
            context = []
    page = render([run], f"DeRTa report: {paths.name}", focus=paths.name, context=context, tracker=t,
                  config=run.config)
    storage.write_text(paths.report, page)
    return paths.report


def experiment_report_path(cfg: ExperimentConfig) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", cfg.tracking.experiment).strip("_") or "experiment"
    return storage.join(cfg.storage.root, f"report-{slug}.html")


def write_experiment_report(cfg: ExperimentConfig, tracker: Tracker | None = None, path: str | None = None) -> str:
    """One page comparing every run of the experiment (MLflow's runs, or the run directories
    under storage.root when tracking is off)."""
    t = _tracker_or_none(tracker)
    runs = load_experiment(t, cfg.storage.root)
    path = path or experiment_report_path(cfg)
    page = render(runs, f"DeRTa experiment: {cfg.tracking.experiment}", tracker=t, per_run_examples=4)
    storage.write_text(path, page)
    return path
