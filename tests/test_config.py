"""Config parsing, overrides, errors (exit code 2 naming key and file) and secret redaction."""

from __future__ import annotations

import pytest
import yaml

from derta.cli import main
from derta.config import ConfigError, ExperimentConfig, load_config, redact, set_dotted


def write(tmp_path, text: str):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_demo():
    cfg = load_config(None)
    assert cfg.model.name_or_path == "builtin:tiny"
    assert cfg.train.method == "derta" and cfg.train.schedule == "joint"
    assert cfg.data.safety.uri == "builtin:demo" and cfg.eval.engine == "hf"


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, """
model: {name_or_path: meta-llama/Meta-Llama-3-8B, lora: {r: 8}}
data: {template: inst, prefix: {dist: beta, beta_a: 2.0}}
train: {method: rto, loss: {w_rto: 0.5, rto_keep: 0.05}, workers: 8, use_gpu: true}
storage: {root: s3://bucket/prefix}
""")
    cfg = load_config(p, ["train.lr=1e-4", "train.loss.w_rto=2", "eval.prefill_k=[0, 5]", "model.lora=null"])
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B"
    assert cfg.model.lora is None
    assert cfg.data.prefix.dist == "beta" and cfg.data.prefix.beta_a == 2.0
    assert cfg.train.lr == 1e-4 and cfg.train.loss.w_rto == 2.0 and cfg.train.loss.rto_keep == 0.05
    assert cfg.eval.prefill_k == [0, 5]
    assert cfg.storage.root == "s3://bucket/prefix"


def test_mix_counts_and_ratios():
    cfg = load_config(None, ["data.mix.preset=custom", "data.mix.rto=3000", "data.mix.helpful=0.5"])
    assert cfg.data.mix.rto == 3000 and isinstance(cfg.data.mix.rto, int)
    assert cfg.data.mix.helpful == 0.5
    with pytest.raises(ConfigError, match="data.mix.prefix"):
        load_config(None, ["data.mix.prefix=1.5"])


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("train: {lerning_rate: 1}", "unknown key 'train.lerning_rate'"),
        ("trian: {lr: 1}", "unknown key 'trian'"),
        ("train: {lr: fast}", "key 'train.lr'"),
        ("train: {method: magic}", "key 'train.method'"),
        ("data: {prefix: {p_zero: 2}}", "key 'data.prefix.p_zero'"),
        ("tune: {space: {train.lr: {sampler: uniform}}}", "tune.space"),
        ("- just\n- a list", "top level must be a mapping"),
        ("train: {lr: [1, 2", "invalid YAML"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, text, fragment):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert fragment in str(e.value)
    assert str(p) in str(e.value)


def test_bad_override_names_the_override():
    with pytest.raises(ConfigError, match=r"--set train\.nope=1: unknown key 'train\.nope'"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.lr"])


def test_cli_exit_code_2_on_bad_config(tmp_path, capsys):
    p = write(tmp_path, "train: {workers: zero}")
    assert main(["plan", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "train.workers" in err and str(p) in err
    assert main(["plan", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_no_silent_data_defaults():
    """An omitted source is no data: builtin:demo only where a config names it (demo.yaml does)."""
    cfg = ExperimentConfig()
    assert cfg.data.safety is None and cfg.data.helpful is None and cfg.eval.questions is None
    # the public code's recipe: every triple makes an RTO and a harmful-prefix sample, none held out
    assert cfg.data.mix.triples == "shared" and cfg.data.holdout == 0.0
    demo = load_config(None)
    assert demo.data.safety.uri == demo.data.helpful.uri == demo.eval.questions.uri == "builtin:demo"
    with pytest.raises(ConfigError, match="data.mix.triples"):
        load_config(None, ["data.mix.triples=overlap"])


def test_set_dotted_revalidates():
    cfg = ExperimentConfig()
    new = set_dotted(cfg, "train.loss.w_rto", 0.25)
    assert new.train.loss.w_rto == 0.25 and cfg.train.loss.w_rto == 1.0
    with pytest.raises(ConfigError):
        set_dotted(cfg, "train.loss.w_rto", "heavy")


def test_secrets_are_redacted_everywhere(tmp_path, capsys):
    raw = {
        "tracking": {"uri": "https://alice:hunter2@mlflow.example.com/?token=abc123"},
        "storage": {"root": "s3://bucket/prefix"},
        "eval": {"judge_url": "https://api.example.com/v1?api_key=sk-live-42", "judge_api_key_env": "OPENAI_API_KEY"},
        "train": {"refusal_token": "Sorry"},
    }
    cfg = ExperimentConfig.model_validate(raw)
    red = cfg.redacted()
    text = yaml.safe_dump(red)
    for secret in ("hunter2", "abc123", "sk-live-42"):
        assert secret not in text
    assert "alice:***@mlflow.example.com" in text
    assert red["train"]["refusal_token"] == "Sorry"  # not a secret, despite its name
    assert red["eval"]["judge_api_key_env"] == "OPENAI_API_KEY"
    assert redact({"aws_secret_access_key": "x", "password": "y", "max_new_tokens": 5}) == {
        "aws_secret_access_key": "***", "password": "***", "max_new_tokens": 5}
    # `derta plan` prints the config: no secret on screen either.
    p = write(tmp_path, yaml.safe_dump({"tracking": {"uri": "https://bob:pa55word@host/"},
                                        "data": {"safety": {"uri": "builtin:demo"}},
                                        "eval": {"questions": {"uri": "builtin:demo"}}}))
    assert main(["plan", "--config", str(p)]) == 0
    out = capsys.readouterr().out
    assert "pa55word" not in out and "bob:***@host" in out
