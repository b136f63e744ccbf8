"""`derta run` with no config (derta.experiments.compare): the shipped base, the preset, the
side-by-side numbers and the findings. The pure parts here; the run itself in tests/test_run_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from derta.config import COMPARE_CONFIG, DEMO_CONFIG, load_config
from derta.experiments import compare as cmp
from derta.experiments.demo_base import ASSET_DIR, COMMAND, DEMO_BASE, corpus_fingerprint, read_provenance


KS = ("0", "5", "10", "20")


def _row(arm: str, asr: list[float], helpfulness: float | None, benign: float | None,
         refusals: list[float] | None = None) -> cmp.CompareRow:
    refusals = refusals if refusals is not None else [100.0 - a for a in asr]
    return cmp.CompareRow(arm, dict(zip(KS, asr)), helpfulness, benign, dict(zip(KS, refusals)))


VANILLA = _row("vanilla", [0.0, 55.0, 75.0, 70.0], 64.0, 0.0, [100.0, 10.0, 5.0, 0.0])
DERTA = _row("derta", [0.0, 2.5, 0.0, 0.0], 60.0, 2.5)
# The degenerate models: each must fail at least one finding, in either arm.
REFUSES_ALL = _row("derta", [0.0, 0.0, 0.0, 0.0], 0.0, 100.0)
COMPLIES_ALL = _row("derta", [100.0, 100.0, 100.0, 100.0], 70.0, 0.0)
# Word salad: neither harmful nor a refusal, so the judge's ASR is 0 everywhere; it is not safety.
GARBLES_ALL = _row("derta", [0.0, 0.0, 0.0, 0.0], 50.0, 0.0, [0.0, 0.0, 0.0, 0.0])


def _holds(v, d) -> dict[str, bool]:
    return {f.claim.split()[0] + " " + f.claim.split()[1]: f.holds for f in cmp.findings(v, d)}


def test_findings_hold_for_the_effect_and_name_their_numbers():
    found = cmp.findings(VANILLA, DERTA)
    assert len(found) == 4 and all(f.holds for f in found), found
    assert "ASR 0.0% -> ASR k>0 66.7%" in found[0].detail and "DeRTa 0.8%" in found[1].detail


@pytest.mark.parametrize("vanilla, derta", [
    (VANILLA, REFUSES_ALL), (VANILLA, COMPLIES_ALL), (VANILLA, GARBLES_ALL),
    (REFUSES_ALL, DERTA), (COMPLIES_ALL, DERTA), (GARBLES_ALL, DERTA),
    (VANILLA, VANILLA),  # no effect: DeRTa trained like vanilla
])
def test_degenerate_or_ineffective_models_fail_a_finding(vanilla, derta):
    assert not all(f.holds for f in cmp.findings(vanilla, derta))


def test_missing_helpfulness_never_passes():
    found = cmp.findings(VANILLA, _row("derta", [0.0, 0.0, 0.0, 0.0], None, None))
    assert [f.holds for f in found] == [True, True, False, False]


def test_row_from_metrics_json_and_table_shape():
    metrics = {"asr_by_k": {"0": 0.0, "5": 50.0, "10": None, "20": 75.0},
               "helpfulness": {"demo": {"score": 61.25, "refusal_rate": 5.0, "n": 40}}}
    gens = [{"kind": "safety", "attack": "prefill", "k": k, "refusal_pos": pos}
            for k, pos in ((0, 0), (0, 3), (5, None), (5, 4), (20, None), (20, None))]
    gens.append({"kind": "helpfulness", "attack": "demo", "refusal_pos": None})
    row = cmp.compare_row("vanilla", metrics, gens)
    assert row.asr_by_k == {"0": 0.0, "5": 50.0, "20": 75.0} and row.attacked == 62.5
    assert (row.helpfulness, row.benign_refused) == (61.25, 5.0)
    assert row.refused_by_k == {"0": 100.0, "5": 50.0, "20": 0.0} and row.refused_attacked == 25.0
    md = cmp.markdown_table([row, DERTA], [0, 5, 10, 20]).splitlines()
    assert md[0] == ("| arm | ASR k=0 % | ASR k=5 % | ASR k=10 % | ASR k=20 % | refusals k=0 % | refusals k>0 % "
                     "| helpfulness | benign refused % |")
    assert md[2] == "| Vanilla | 0.0 | 50.0 | - | 75.0 | 100.0 | 25.0 | 61.2 | 5.0 |" and md[3].startswith("| DeRTa | 0.0 | 2.5 |")
    page = cmp.summary_html([row, DERTA], [0, 5, 10, 20], cmp.findings(row, DERTA))
    assert page.count("<tr>") == 3 and "Vanilla" in page and "DeRTa" in page and "holds" in page


def test_run_without_config_is_the_comparison_other_verbs_the_demo():
    from derta.cli import build_parser, run_preset

    p = build_parser()
    assert run_preset(p.parse_args(["run"])) == "compare"
    assert run_preset(p.parse_args(["run", "--config", "x.yaml"])) == "demo"  # a user's config: one pipeline run
    assert run_preset(p.parse_args(["run", "--preset", "position_bias"])) == "position_bias"
    cfg = load_config(COMPARE_CONFIG)
    assert cfg.model.name_or_path == DEMO_BASE == cfg.position_bias.base_model
    assert cfg.position_bias.arms == ["vanilla", "derta"] and cfg.train.workers == 1
    assert 0 in cfg.eval.prefill_k and len([k for k in cfg.eval.prefill_k if k > 0]) >= 2
    assert load_config(None).model.name_or_path == load_config(DEMO_CONFIG).model.name_or_path == "builtin:tiny"


def test_cli_compare_needs_both_arms_and_writes_nothing_before(tmp_path, capsys):
    from derta.cli import main

    code = main(["run", "--set", f"storage.root={tmp_path}", "--set", "position_bias.arms=[vanilla]"])
    assert code == 2 and "position_bias.arms" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_shipped_base_is_small_complete_and_from_the_current_corpus():
    from derta.models import load_tokenizer, refusal_token_id, resolve_model_path
    from derta.config import ModelConfig

    assert resolve_model_path(DEMO_BASE) == str(ASSET_DIR)
    files = {f.name: f.stat().st_size for f in ASSET_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "demo_base.json"} <= set(files)
    assert sum(files.values()) < 3_000_000, files  # well under the 5 MB the repository allows
    prov = read_provenance()
    assert prov["name"] == DEMO_BASE and prov["command"].startswith(COMMAND) and prov["dtype"] == "bfloat16"
    # A stale base (the demo corpus changed since it was made) fails here: rerun the command.
    assert prov["corpus_fingerprint"] == corpus_fingerprint(), f"regenerate the demo base: {COMMAND}"
    pb = load_config(COMPARE_CONFIG).position_bias  # ... and so does one made with other settings
    assert (prov["from"], prov["epochs"], prov["lr"]) == ("builtin:small", pb.pretrain_epochs, pb.pretrain_lr), COMMAND
    tok = load_tokenizer(ModelConfig(name_or_path=DEMO_BASE))
    assert refusal_token_id(tok) is not None and tok.chat_template


def test_shipped_base_is_package_data():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert "assets/demo_base/*" in text


def test_missing_shipped_base_is_a_clear_config_error(monkeypatch, tmp_path):
    from derta import models
    from derta.config import ConfigError

    monkeypatch.setitem(models.SHIPPED, DEMO_BASE, tmp_path / "absent")
    with pytest.raises(ConfigError, match="demo-base is missing .*python -m derta.experiments.demo_base"):
        models.resolve_model_path(DEMO_BASE)


def test_provenance_is_json():
    assert json.loads((ASSET_DIR / "demo_base.json").read_text())["seed"] == 0
