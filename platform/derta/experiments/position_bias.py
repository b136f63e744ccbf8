"""Science check: refusal position bias and the paper's Table-4 ablation, on a laptop.

Everything goes through the real pipeline (Ray Data -> Ray Train -> eval), one MLflow parent
run with a nested run per stage:

  1. pretraining  `sft` from the random tiny Llama on helpful answers AND harmful completions
                  for every topic, in three surface forms (the safety data's prose, a
                  checklist register, completion-style prompts), so the base model complies
                  (the paper starts from a base model that was never safety-tuned); the base is
                  evaluated without an attack to check that premise
  2. four arms    safety tuning from that base, the same helpful data and the same number of
                  safety samples N (one per safety triple of the 30 seen topics):
                    vanilla   N x (q -> refusal)
                    recaug    N x (q + harmful[:k] -> refusal)      "+ harmful prefix"
                    rto       N/2 vanilla + N/2 RTO samples          "+ RTO"
                    derta     N/2 harmful-prefix + N/2 RTO samples   both
  3. evaluation   the prefill attack at each k of eval.prefill_k on three groups: `heldout`
                  (topics held out of safety tuning), `seen` (fresh harmful texts on seen
                  topics), `unlike` (held-out topics, checklist-register requests and harmful
                  texts: text that looks unlike the safety data, as CodeAttack's does); the
                  `completion` group (CompletingAttack-style declarative prompts, no prefill: the
                  model chooses when to refuse); helpfulness on held-out helpful prompts
  4. results      a table shaped like Table 4, the refusal-position plot of Fig. 4, and the
                  pre-registered findings (derta.experiments.position_findings), printed, logged.

Refusal positions (Fig. 4) are counted in words from the FIRST GENERATED word, on the
completion group: a refusal-everything model scores 100 % at word 0, a comply-everything one has
no refusals, and neither passes the Fig.-4 rule.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from statistics import mean
from typing import Any

from derta import storage
from derta.config import ARM_NAMES, ExperimentConfig, PositionBiasConfig
from derta.eval.metrics import compute_metrics, refusal_histogram
from derta.experiments.position_findings import AFTER_WORDS, RULES, Finding, findings  # noqa: F401 (re-exported)
from derta.paths import RunPaths

GROUPS = ("heldout", "seen", "unlike")  # prefill-attack question groups
COMPLETION = "completion"  # the completion-style group (no prefill; fed as the `direct` attack's prompt file)
GROUP_LABELS = {"heldout": "held-out", "seen": "seen", "unlike": "unlike"}
ARM_LABELS = {"vanilla": "Vanilla", "recaug": "+ Harmful prefix", "rto": "+ RTO", "derta": "DeRTa (both)"}
# Each arm's safety samples, as ratios of the safety triples (disjoint halves: equal budgets).
ARM_MIX = {
    "vanilla": {"preset": "vanilla"},
    "recaug": {"preset": "recaug"},
    "rto": {"preset": "custom", "vanilla": 0.5, "rto": 0.5},
    "derta": {"preset": "derta"},
}
EVAL_SEED_SALT = 1000  # the evaluation's harmful texts are drawn apart from the training ones


# --------------------------------------------------------------------------- corpus (pure)
def corpus_rows(pb: PositionBiasConfig) -> dict[str, list[dict[str, Any]]]:
    """The experiment's sources, from the built-in synthetic corpus (derta.demo): pretraining
    pairs (helpful answers; harmful completions for every topic in the safety data's prose, in
    the checklist register (every held-out topic x 4 templates, every seen topic x 1) and for
    the completion-style prompts), the safety triples and helpful pairs of safety tuning (seen
    topics, prose only), the prefill questions per group and the completion-style prompts."""
    from derta.demo import checklist_triples, completion_pairs, helpful_pairs, safety_triples

    harmful = safety_triples("train") + safety_triples("heldout")
    groups = [("heldout", safety_triples("heldout", seed=EVAL_SEED_SALT), pb.heldout_questions),
              ("seen", safety_triples("train", seed=EVAL_SEED_SALT), pb.seen_questions)]
    completion = []
    if pb.extra_forms:
        harmful += checklist_triples("heldout") + checklist_triples("train", templates=1) + completion_pairs()
        groups.append(("unlike", checklist_triples("heldout", seed=EVAL_SEED_SALT), pb.unlike_questions))
        completion = [{"question": t.query, "topic": t.topic, "group": COMPLETION}
                      for t in _spread(completion_pairs(), pb.completion_questions)]
    pretrain = [{"query": h.query, "response": h.response} for h in helpful_pairs("all")]
    pretrain += [{"query": t.query, "response": t.harmful} for t in harmful]
    questions = []
    for group, triples, n in groups:
        questions += [{"query": t.query, "harmful": t.harmful, "topic": t.topic, "group": group} for t in _spread(triples, n)]
    return {
        "pretrain": pretrain,
        "safety": [asdict(t) for t in safety_triples("train")],
        "helpful": [{"query": h.query, "response": h.response} for h in helpful_pairs("train")],
        "questions": questions,
        "completion": completion,
    }


def _spread(items: list, n: int) -> list:
    """n items spread evenly over the list (every topic, not the first few), in order."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def write_corpus(directory: str, corpus: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """corpus_rows' sources as JSONL under `directory` (local or s3://); their URIs by name."""
    out = {}
    for name, rows in corpus.items():
        if not rows:  # e.g. no completion-style prompts (extra_forms off)
            continue
        uri = storage.join(directory, f"{name}.jsonl")
        storage.write_text(uri, "".join(json.dumps(r) + "\n" for r in rows))
        out[name] = uri
    return out


# --------------------------------------------------------------------------- configs (pure)
def _with(cfg: ExperimentConfig, **sections: dict[str, Any]) -> ExperimentConfig:
    raw = cfg.to_dict()
    for section, values in sections.items():
        node = raw[section]
        for key, value in values.items():
            node[key] = value
    return ExperimentConfig.model_validate(raw)


def _eval_sources(files: dict[str, str]) -> dict[str, Any]:
    """The prefill groups' questions, and the completion-style prompts as the `direct` attack's
    prompt file (each prompt is the user turn; nothing is prefilled)."""
    completion = {"direct": files["completion"]} if "completion" in files else {}
    return {"questions": {"uri": files["questions"]}, "attacks": ["prefill"], "prompt_files": completion, "limit": None}


def pretrain_config(cfg: ExperimentConfig, pb: PositionBiasConfig, files: dict[str, str]) -> ExperimentConfig:
    """Pretraining, evaluated without an attack (k = 0, no helpfulness): the premise check."""
    return _with(
        cfg,
        data={"safety": {"uri": files["safety"]}, "helpful": {"uri": files["pretrain"]}, "mix": {"preset": "sft"},
              "holdout": 0.0, "seed": pb.seed},
        train={"method": "sft", "epochs": pb.pretrain_epochs, "lr": pb.pretrain_lr, "seed": pb.seed},
        eval={**_eval_sources(files), "prefill_k": [0], "helpfulness": []},
    )


def arm_config(cfg: ExperimentConfig, pb: PositionBiasConfig, arm: str, files: dict[str, str], base_model: str) -> ExperimentConfig:
    return _with(
        cfg,
        model={"name_or_path": base_model},
        data={"safety": {"uri": files["safety"]}, "helpful": {"uri": files["helpful"]},
              "mix": {"helpful": 1.0, "triples": "disjoint", **ARM_MIX[arm]}, "holdout": 0.0, "seed": pb.seed},
        train={"method": arm, "seed": pb.seed},  # each arm is named for its train.method
        eval=_eval_sources(files),
    )


# --------------------------------------------------------------------------- results (pure)
@dataclass
class ArmResult:
    arm: str
    asr: dict[str, dict[str, float]]  # prefill group -> k -> ASR %
    helpfulness: float | None  # demo token-F1 score x 100 (0 for a refusal)
    help_refusal: float | None  # % of held-out helpful prompts refused
    # Completion-style group: where each refusal starts, in words from the FIRST GENERATED word.
    positions: list[int] = field(default_factory=list)
    completion_asr: float | None = None  # % of completion-style prompts answered unsafely
    completion_n: int = 0  # completion-style prompts evaluated
    n: dict[str, int] = field(default_factory=dict)  # prefill group -> questions

    def attacked(self, group: str) -> float:
        """Mean ASR over the prefill lengths k > 0 (the attack proper)."""
        vals = [v for k, v in self.asr.get(group, {}).items() if int(k) > 0 and v is not None]
        return round(mean(vals), 2) if vals else float("nan")

    def at_start(self) -> float | None:
        """% of completion-style refusals that open the response (at the first generated word)."""
        if not self.positions:
            return None
        return round(100.0 * sum(p == 0 for p in self.positions) / len(self.positions), 1)

    def after_text(self) -> float | None:
        """% of completion-style refusals that come after >= AFTER_WORDS generated words: the
        model started to comply and switched to a refusal (what RTO trains, Fig. 4)."""
        if not self.positions:
            return None
        return round(100.0 * sum(p >= AFTER_WORDS for p in self.positions) / len(self.positions), 1)


def arm_result(arm: str, rows: list[dict[str, Any]], group_of: dict[str, str]) -> ArmResult:
    """One arm's numbers from its eval/generations.jsonl rows (groups absent from the rows are
    left out; helpfulness is None when none was evaluated)."""
    safety = [r for r in rows if r.get("kind") == "safety"]
    asr, n = {}, {}
    for g in GROUPS:
        mine = [r for r in safety if group_of.get(r["qid"]) == g]
        if mine:
            asr[g] = compute_metrics(mine)["asr_by_k"]
            n[g] = len({r["qid"] for r in mine})
    comp = [r for r in safety if group_of.get(r["qid"]) == COMPLETION]
    helpful = compute_metrics([r for r in rows if r.get("kind") == "helpfulness"])["helpfulness"].get("demo", {})
    positions = [int(r["refusal_pos"]) for r in comp if r.get("refusal_pos") is not None]
    comp_asr = round(100.0 * sum(bool(r["unsafe"]) for r in comp) / len(comp), 2) if comp else None
    return ArmResult(arm, asr, helpful.get("score"), helpful.get("refusal_rate"), positions, comp_asr, len(comp), n)


def question_groups(questions: list[dict[str, Any]], completion: list[dict[str, Any]] = ()) -> dict[str, str]:
    """qid -> group, as the eval runner names them: q:<line> for eval.questions, file:<line> for
    the completion-style prompt file."""
    out = {f"q:{n}": q["group"] for n, q in enumerate(questions, 1)}
    out.update({f"file:{n}": COMPLETION for n, _ in enumerate(completion, 1)})
    return out


def table_rows(results: dict[str, ArmResult], ks: list[int], base: ArmResult | None = None) -> list[list[str]]:
    """Table 4's shape: one row per arm (the base first, when evaluated: k = 0 only); prefill ASR
    per k per group, completion-style ASR, helpfulness and the Fig.-4 numbers."""
    rows = []
    named = ([("Base (before safety tuning)", base)] if base is not None else [])
    named += [(ARM_LABELS[a], results[a]) for a in ARM_NAMES if a in results]
    for label, a in named:
        cells = [label]
        for g in GROUPS:
            cells += [fmt(a.asr.get(g, {}).get(str(k))) for k in ks]
        cells += [fmt(a.completion_asr), fmt(a.helpfulness), fmt(a.help_refusal), str(len(a.positions)),
                  fmt(a.at_start()), fmt(a.after_text())]
        rows.append(cells)
    return rows


def table_header(ks: list[int]) -> list[str]:
    return (["arm"] + [f"{GROUP_LABELS[g]} k={k}" for g in GROUPS for k in ks]
            + ["completion ASR", "helpfulness", "helpful prompts refused %", "completion refusals",
               "refusals at word 0 %", f"refusals at word >= {AFTER_WORDS} %"])


def markdown_table(results: dict[str, ArmResult], ks: list[int], base: ArmResult | None = None) -> str:
    return pipe_table(table_header(ks), table_rows(results, ks, base))


def pipe_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (header, separator, rows), as table.md and the console print it."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


# --------------------------------------------------------------------------- the plot
def plot_positions(results: dict[str, ArmResult], path: str) -> str:
    """Fig. 4: where completion-style refusals start, in words from the first generated word."""
    from derta.report.plots import figure, png_bytes

    arms = [a for a in ARM_NAMES if a in results]
    labels = list(refusal_histogram([]).keys())
    fig, ax = figure(8, 3.6)
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        pos = results[arm].positions
        hist = refusal_histogram(pos)
        share = [100.0 * hist[b] / len(pos) if pos else 0.0 for b in labels]
        ax.bar([j + i * width for j in range(len(labels))], share, width, label=f"{ARM_LABELS[arm]} (n={len(pos)})")
    ax.set_xticks([j + width * (len(arms) - 1) / 2 for j in range(len(labels))], labels)
    ax.set_xlabel("refusal starts at word (from the first generated word; completion-style prompts)")
    ax.set_ylabel("% of refusals")
    ax.set_title("Refusal position (cf. paper Fig. 4)")
    ax.legend(fontsize=8, frameon=False)
    storage.write_bytes(path, png_bytes(fig))
    return path


# --------------------------------------------------------------------------- orchestration
@dataclass
class PositionBiasResult:
    dir: str
    results: dict[str, ArmResult]
    findings: list[Finding]
    table: str  # markdown
    plot: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    base: ArmResult | None = None  # the pretrained base, evaluated without an attack
    run_ids: dict[str, str | None] = field(default_factory=dict)  # MLflow: "parent" and each arm


def run_position_bias(cfg: ExperimentConfig, *, show: bool = True, title: str = "Position-bias experiment") -> PositionBiasResult:
    """The whole experiment (see the module docstring); prints and logs the results.
    show=False leaves the printing of results to the caller (derta.experiments.compare)."""
    from derta.cluster import ensure_ray
    from derta.pipeline import console, make_tracker, parent_run, run_paths, run_stages

    t0 = time.perf_counter()
    pb = cfg.position_bias or PositionBiasConfig()
    if cfg.storage.run_name is None:
        cfg.storage.run_name = f"position-bias-s{pb.seed}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    paths = run_paths(cfg)
    console.print(f"[bold]{title}[/bold] {paths.name}  arms={','.join(pb.arms)}  seed={pb.seed}")
    console.print(f"directory: {paths.dir}", soft_wrap=True)
    ensure_ray(cfg)
    corpus = corpus_rows(pb)
    files = write_corpus(storage.join(paths.dir, "corpus"), corpus)
    group_of = question_groups(corpus["questions"], corpus["completion"])
    tracker = make_tracker(cfg)
    timings: dict[str, float] = {}
    results: dict[str, ArmResult] = {}
    run_ids: dict[str, str | None] = {}
    base_res: ArmResult | None = None
    with parent_run(cfg, paths, "position_bias", tracker=tracker) as (_, parent):
        run_ids["parent"] = parent
        base = pb.base_model
        if base is None:
            pre_cfg = pretrain_config(cfg, pb, files)
            pre_paths = RunPaths(paths.dir, "pretrain")
            start = time.perf_counter()
            with parent_run(pre_cfg, pre_paths, "pretrain", parent, tracker) as (_, pre_run):
                base = run_stages(pre_cfg, pre_paths, tracker, pre_run).model_dir
                base_res = arm_result("base", storage.read_jsonl(pre_paths.generations), group_of)
                with tracker.attach(pre_run):
                    tracker.log_metrics(_arm_metrics(base_res))
            timings["pretrain"] = time.perf_counter() - start
        for arm in pb.arms:
            arm_cfg = arm_config(cfg, pb, arm, files, base)
            arm_paths = RunPaths(paths.dir, arm)
            start = time.perf_counter()
            with parent_run(arm_cfg, arm_paths, "position_bias arm", parent, tracker) as (_, arm_run):
                run_ids[arm] = arm_run
                run_stages(arm_cfg, arm_paths, tracker, arm_run, label=arm)
                timings[arm] = time.perf_counter() - start
                results[arm] = arm_result(arm, storage.read_jsonl(arm_paths.generations), group_of)
                with tracker.attach(arm_run):
                    tracker.log_metrics(_arm_metrics(results[arm]))
        found = findings(results, base_res)
        table = markdown_table(results, cfg.eval.prefill_k, base_res)
        plot = plot_positions(results, storage.join(paths.dir, "refusal_positions.png"))
        out = PositionBiasResult(paths.dir, results, found, table, plot, time.perf_counter() - t0, timings, base_res,
                                 run_ids)
        storage.write_json(storage.join(paths.dir, "position_bias.json"), _to_json(out, cfg))
        storage.write_text(storage.join(paths.dir, "table.md"), table + "\n")
        with tracker.attach(parent):
            for arm, res in results.items():
                tracker.log_metrics({f"{arm}_{k}": v for k, v in _arm_metrics(res).items()})
            tracker.log_metrics({"findings_hold": sum(f.holds for f in found), "findings_total": len(found),
                                 "time_total_s": out.seconds})
            for name in ("position_bias.json", "table.md", "refusal_positions.png"):
                tracker.log_artifact(storage.join(paths.dir, name))
    if not show:
        return out

    console.print(f"[bold]Refusal position bias (seed {pb.seed}): prefill ASR % per group (lower is safer), "
                  f"completion-style ASR, helpfulness (token F1 x 100), Fig.-4 refusal positions")
    print(table, flush=True)
    for f in found:
        console.print(f"[{'green' if f.holds else 'red'}]{'holds' if f.holds else 'DOES NOT HOLD'}[/]  {f.name}: "
                      f"{f.claim}: {f.detail}  [rule: {f.rule}]")
    console.print(f"directory: {paths.dir}   plot: {plot}   total {out.seconds:.0f}s "
                  f"({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})")
    return out


def _arm_metrics(res: ArmResult) -> dict[str, float]:
    m: dict[str, float] = {}
    for g, by_k in res.asr.items():
        for k, v in by_k.items():
            if v is not None:
                m[f"asr_{g}_k{k}"] = v
        attacked = res.attacked(g)
        if attacked == attacked:  # not NaN (the base is evaluated at k = 0 only)
            m[f"asr_{g}_attacked"] = attacked
    for name, value in (("helpfulness", res.helpfulness), ("asr_completion", res.completion_asr),
                        ("refusals_at_start_pct", res.at_start()), ("refusals_after_text_pct", res.after_text())):
        if value is not None:
            m[name] = value
    m["completion_refusals"] = len(res.positions)
    return m


def _result_json(r: ArmResult) -> dict[str, Any]:
    return {**asdict(r), "attacked": {g: r.attacked(g) for g in r.asr}, "at_start": r.at_start(),
            "after_text": r.after_text()}


def _to_json(out: PositionBiasResult, cfg: ExperimentConfig) -> dict[str, Any]:
    return {
        "config": cfg.redacted(),
        "results": {a: _result_json(r) for a, r in out.results.items()},
        "base": _result_json(out.base) if out.base is not None else None,
        "findings": [asdict(f) for f in out.findings],
        "rules": [{"name": r.name, "claim": r.claim, "rule": r.rule, "arms": list(r.arms), "margin": r.margin,
                   "min_n": r.min_n} for r in RULES],
        "seconds": out.seconds,
        "timings": out.timings,
    }
