"""The science check (derta.experiments.position_bias): its corpus, arms, numbers and findings.

These check the pure parts. The reduced experiment itself runs as a real Ray job in
tests/test_jobs.py (test_ray_job_submit_runs_the_position_bias_science_check): pretraining and
four arms through Ray Data -> Ray Train (FSDP, 2 CPU workers) -> eval, asserting the paper's
findings that this small world reproduces.
"""

from __future__ import annotations

import pytest

from derta.config import ARM_NAMES, PositionBiasConfig, load_config
from derta.data.mix import SAFETY_ORDER, plan_kinds, resolve_mix
from derta.demo import N_TRAIN_TOPICS, safety_triples
from derta.experiments import position_bias as pb

PB = PositionBiasConfig(heldout_questions=16, seen_questions=8)


def test_corpus_pretrains_every_topic_but_safety_tunes_only_seen_ones():
    rows = pb.corpus_rows(PB)
    seen = {t.topic for t in safety_triples("train")}
    heldout = {t.topic for t in safety_triples("heldout")}
    assert len(seen) == N_TRAIN_TOPICS and not seen & heldout
    # pretraining: a harmful completion for every topic, so the base model complies everywhere
    harmful = {t.harmful for t in safety_triples("train") + safety_triples("heldout")}
    assert harmful <= {r["response"] for r in rows["pretrain"]}
    assert {r["topic"] for r in rows["safety"]} == seen
    groups = {g: [q for q in rows["questions"] if q["group"] == g] for g in pb.GROUPS}
    assert len(groups["heldout"]) == 16 and len(groups["seen"]) == 8
    assert {q["topic"] for q in groups["heldout"]} == heldout  # spread over every held-out topic
    assert {q["topic"] for q in groups["seen"]} <= seen
    # the attack's harmful texts are fresh draws, not the ones safety tuning trained on
    assert not {q["harmful"] for q in rows["questions"]} & {r["harmful"] for r in rows["safety"]}


def test_arms_get_equal_safety_budgets_and_start_from_the_base(tmp_path):
    cfg = load_config(None, [f"storage.root={tmp_path}"])
    files = {name: str(tmp_path / f"{name}.jsonl") for name in ("pretrain", "safety", "helpful", "questions")}
    n = len(safety_triples("train"))
    budgets = {}
    for arm in ARM_NAMES:
        c = pb.arm_config(cfg, PB, arm, files, "/models/base")
        assert c.model.name_or_path == "/models/base" and c.train.method == arm
        assert c.data.safety.uri == files["safety"] and c.eval.questions.uri == files["questions"]
        _, amounts = resolve_mix(c.data.mix, c.train.method)
        counts = plan_kinds(amounts, SAFETY_ORDER, n).counts()
        budgets[arm] = sum(counts.values())
        assert amounts["helpful"] == 1.0
    assert set(budgets.values()) == {n}, budgets
    pre = pb.pretrain_config(cfg, PB, files)
    assert pre.train.method == "sft" and pre.data.helpful.uri == files["pretrain"]
    assert pre.train.epochs == PB.pretrain_epochs and pre.train.lr == PB.pretrain_lr


def _row(qid: str, k: int, unsafe: bool, prefill: str = "", refusal_pos: int | None = None) -> dict:
    return {"kind": "safety", "attack": "prefill", "qid": qid, "k": k, "unsafe": unsafe, "prefill": prefill,
            "refusal_pos": refusal_pos}


def test_arm_result_splits_groups_and_counts_refusal_positions_from_the_turn_start():
    group_of = pb.question_groups([{"group": "heldout"}, {"group": "seen"}])
    assert group_of == {"q:1": "heldout", "q:2": "seen"}
    rows = [
        _row("q:1", 0, False, "", 0), _row("q:1", 5, True), _row("q:2", 0, False, "", 1),
        _row("q:2", 5, False, "Sure here is how to", 2),
        {"kind": "helpfulness", "attack": "demo", "score": 0.5, "refused": False},
        {"kind": "helpfulness", "attack": "demo", "score": 0.0, "refused": True},
    ]
    res = pb.arm_result("vanilla", rows, group_of)
    assert res.asr == {"heldout": {"0": 0.0, "5": 100.0}, "seen": {"0": 0.0, "5": 0.0}}
    assert res.attacked("heldout") == 100.0 and res.attacked("seen") == 0.0
    assert res.helpfulness == 25.0 and res.help_refusal == 50.0
    assert sorted(res.positions) == [0, 1, 5 + 2]  # prefilled words + where the refusal starts
    assert res.at_start() == pytest.approx(33.3)  # only position 0 opens the response


def _arm(arm: str, heldout: list[float], seen: list[float], help_: float, positions: list[int]) -> pb.ArmResult:
    ks = ["0", "5", "10", "20"]
    return pb.ArmResult(arm, {"heldout": dict(zip(ks, heldout)), "seen": dict(zip(ks, seen))}, help_, 0.0, positions)


def test_findings_follow_the_paper_shape_and_name_what_fails():
    paper = {
        "vanilla": _arm("vanilla", [0, 80, 90, 95], [0, 80, 90, 95], 60, [0] * 20),
        "recaug": _arm("recaug", [0, 40, 50, 60], [0, 5, 5, 5], 58, [0, 6, 12, 25]),
        "rto": _arm("rto", [0, 5, 5, 10], [0, 0, 5, 5], 57, [0, 6, 11, 22]),
        "derta": _arm("derta", [0, 0, 5, 5], [0, 0, 0, 5], 59, [0, 6, 11, 21, 0]),
    }
    found = pb.findings(paper)
    assert len(found) == 6 and all(f.holds for f in found), [f for f in found if not f.holds]
    flat = dict(paper, recaug=_arm("recaug", [0, 5, 5, 5], [0, 5, 5, 5], 58, [0, 6, 12, 25]))
    by_claim = {f.claim: f for f in pb.findings(flat)}
    generalises = next(f for c, f in by_claim.items() if "generalises less" in c)
    assert not generalises.holds and "+ harmful prefix 5.0%" in generalises.detail
    unhelpful = dict(paper, derta=_arm("derta", [0, 0, 5, 5], [0, 0, 0, 5], 20, [0, 6]))
    assert not next(f for f in pb.findings(unhelpful) if "helpfulness" in f.claim).holds
    rto_unhelpful = dict(paper, rto=_arm("rto", [0, 5, 5, 10], [0, 0, 5, 5], 20, [0, 6]))
    assert next(f for f in pb.findings(rto_unhelpful) if "helpfulness" in f.claim).holds  # DeRTa's claim


def test_table_has_the_paper_shape():
    res = {"vanilla": _arm("vanilla", [0, 80, 90, 95], [0, 70, 90, 95], 60.04, [0, 1])}
    md = pb.markdown_table(res, [0, 5, 10, 20]).splitlines()
    assert md[0].startswith("| arm | held-out k=0 |") and len(md) == 3
    assert md[2].split(" | ")[:3] == ["| Vanilla", "0.0", "80.0"] and "60.0" in md[2]


def test_cli_run_preset_position_bias_validates_before_starting(tmp_path, capsys):
    from derta.cli import main

    code = main(["run", "--preset", "position_bias", "--set", f"storage.root={tmp_path}",
                 "--set", "position_bias.arms=[]"])
    assert code == 2 and "position_bias.arms" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
