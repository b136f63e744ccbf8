"""derta.preflight: each kind of failure that used to surface hours into a run is a ConfigError
(exit 2) at config load, naming the key; on small local model directories (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _fixtures import tiny_model_dir  # noqa: F401

from derta.cli import main
from derta.config import ConfigError, load_config, validate_config
from derta.preflight import VLLM_LORA_RANKS, check, storage_problem, vllm_max_lora_rank


def demo_cfg(model: str, root: Path, *sets: str):
    """The demo config (CPU, hf engine, builtin:demo data) on a given model directory."""
    return load_config(None, [f"model.name_or_path={model}", f"storage.root={root}", *sets])


def variant(src: str, dst: Path, *, chat_template: bool = True, context: int | None = None) -> str:
    """A copy of the tiny model directory without a chat template and/or with another context."""
    shutil.copytree(src, dst)
    if not chat_template:
        (dst / "chat_template.jinja").unlink(missing_ok=True)
        tc = json.loads((dst / "tokenizer_config.json").read_text())
        tc.pop("chat_template", None)
        (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    if context is not None:
        c = json.loads((dst / "config.json").read_text())
        c["max_position_embeddings"] = context
        (dst / "config.json").write_text(json.dumps(c))
    return str(dst)


def test_the_demo_config_passes(tiny_model_dir, tmp_path):
    assert check(demo_cfg(tiny_model_dir, tmp_path), ("train", "eval")) == []


def test_template_needs_a_chat_template_the_tokenizer_lacks(tiny_model_dir, tmp_path):
    base = variant(tiny_model_dir, tmp_path / "base", chat_template=False)  # like base Llama-3
    with pytest.raises(ConfigError, match="data.template=chat_template: the tokenizer has no chat template"):
        check(demo_cfg(base, tmp_path), ("train",))
    inst = demo_cfg(base, tmp_path, "data.template=inst")
    assert check(inst, ("train",)) == []
    # eval renders with the training template (inst here) unless eval.template says otherwise
    assert check(inst, ("train", "eval")) == []
    chat_eval = demo_cfg(base, tmp_path, "data.template=inst", "eval.template=chat_template")
    with pytest.raises(ConfigError, match="eval.template=chat_template: the tokenizer has no chat template"):
        check(chat_eval, ("train", "eval"))


def test_refusal_token_must_be_one_token(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.refusal_token='Zorblaxian refusal'"):
        check(demo_cfg(tiny_model_dir, tmp_path, "train.refusal_token=Zorblaxian refusal"), ("train",))
    ok = demo_cfg(tiny_model_dir, tmp_path, "train.refusal_token=Zorblaxian refusal", "train.refusal_token_fallback=Sorry")
    assert check(ok, ("train",)) == []
    assert check(demo_cfg(tiny_model_dir, tmp_path, "train.refusal_token=Zorblaxian refusal"), ("eval",)) == []


def test_unimplemented_attack_and_judge_settings(tiny_model_dir, tmp_path):
    # AutoDAN is implemented on the HF engine only (it needs the target's likelihoods)
    with pytest.raises(ConfigError, match="AutoDAN search needs the target's likelihoods") as e:
        check(demo_cfg(tiny_model_dir, tmp_path, "eval.attacks=[prefill, autodan]", "eval.engine=vllm", "eval.judge=llm"),
              ("eval",))
    assert "eval.judge_model" in str(e.value)  # every problem in one message
    with pytest.raises(ConfigError, match="eval.judge=http needs both"):
        check(demo_cfg(tiny_model_dir, tmp_path, "eval.judge=http", "eval.judge_model=gpt-4o"), ("eval",))
    assert check(demo_cfg(tiny_model_dir, tmp_path, "eval.attacks=[autodan]"), ("train",)) == []  # no eval stage
    with pytest.raises(ConfigError, match="eval.questions"):
        check(demo_cfg(tiny_model_dir, tmp_path, "eval.questions=null"), ("eval",))


def test_missing_local_files_and_benchmark_files(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="eval.helpfulness includes 'gsm8k'") as e:
        check(demo_cfg(tiny_model_dir, tmp_path, "eval.helpfulness=[demo, gsm8k]",
                       f"eval.prompt_files={{completion: {tmp_path}/nope.jsonl}}"), ("eval",))
    assert "eval.prompt_files.completion=" in str(e.value) and "nope.jsonl'" in str(e.value)
    with pytest.raises(ConfigError, match="data.safety.uri: .*missing.jsonl: no such file"):
        check(demo_cfg(tiny_model_dir, tmp_path, f"data.safety.uri={tmp_path}/missing.jsonl"), ("train",))
    s3 = demo_cfg(tiny_model_dir, tmp_path, "data.safety.uri=s3://bucket/safety.jsonl", "eval.questions.uri=s3://b/q.jsonl")
    assert check(s3, ("train", "eval")) == []  # s3:// is read (and reached) by the stages themselves


def test_vllm_lora_rank_rounds_up_to_what_vllm_accepts(tiny_model_dir, tmp_path):
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 33, 96, 128, 200, 257, 320, 321, 512)] == [
        1, 8, 8, 16, 16, 64, 128, 128, 256, 320, 320, 512, 512]
    assert all(vllm_max_lora_rank(r) == r for r in VLLM_LORA_RANKS)
    with pytest.raises(ConfigError, match="model.lora.r=513"):
        vllm_max_lora_rank(513)
    gpu = ("train.use_gpu=true", "eval.engine=vllm", "model.lora={r: 96}")
    notes = check(demo_cfg(tiny_model_dir, tmp_path, *gpu), ("eval",))
    assert any("model.lora.r=96" in n and "max_lora_rank=128" in n for n in notes), notes
    with pytest.raises(ConfigError, match="model.lora.r=600"):
        check(demo_cfg(tiny_model_dir, tmp_path, *gpu, "model.lora.r=600"), ("eval",))
    assert check(demo_cfg(tiny_model_dir, tmp_path, *gpu[:2], "model.lora={r: 64}"), ("eval",)) == []


def test_gpu_engines_and_judges_need_a_declared_gpu(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="eval.engine=vllm needs GPUs"):
        check(demo_cfg(tiny_model_dir, tmp_path, "eval.engine=vllm"), ("eval",))
    judge = ("eval.judge=llm", f"eval.judge_model={tiny_model_dir}")
    with pytest.raises(ConfigError, match="eval.judge=llm serves .* on a GPU engine"):
        check(demo_cfg(tiny_model_dir, tmp_path, *judge, "eval.engine=auto"), ("eval",))
    assert check(demo_cfg(tiny_model_dir, tmp_path, *judge, "eval.engine=hf"), ("eval",)) == []  # a CPU judge, asked for
    assert check(demo_cfg(tiny_model_dir, tmp_path, *judge, "eval.engine=auto", "train.use_gpu=true"), ("eval",)) == []


def test_llm_judge_built_in_a_driver_without_gpu(tiny_model_dir, tmp_path, monkeypatch):
    """PAIR builds its LLM judge in the driver; on a GPU cluster with a CPU-only head that fails."""
    monkeypatch.setattr("derta.preflight.driver_gpu", lambda: False)
    sets = ("train.use_gpu=true", "eval.engine=vllm", "eval.judge=llm", f"eval.judge_model={tiny_model_dir}")
    with pytest.raises(ConfigError, match="eval.judge=llm: pair build the LLM judge in the driver"):
        check(demo_cfg(tiny_model_dir, tmp_path, *sets, "eval.attacks=[prefill, pair]"), ("eval",))
    assert any("in the driver" in n for n in check(demo_cfg(tiny_model_dir, tmp_path, *sets, "eval.attacks=[pair]"),
                                                   ("eval",), planning=True))
    assert check(demo_cfg(tiny_model_dir, tmp_path, *sets), ("eval",)) == []  # prefill only: the judge is an actor
    monkeypatch.setattr("derta.preflight.driver_gpu", lambda: True)
    assert check(demo_cfg(tiny_model_dir, tmp_path, *sets, "eval.attacks=[pair]"), ("eval",)) == []


def test_storage_root_that_cannot_be_written(tiny_model_dir, tmp_path):
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    assert "is a file" in storage_problem(str(a_file / "runs"))
    assert "cannot write" in storage_problem("/proc/derta-runs")
    assert "no bucket" in storage_problem("s3:///runs")
    assert storage_problem(str(tmp_path / "new" / "runs")) is None and not (tmp_path / "new").exists()
    assert storage_problem("s3://bucket/runs") is None  # reachability is the storage check's job
    with pytest.raises(ConfigError, match="storage.root="):
        check(demo_cfg(tiny_model_dir, a_file), ("eval",))


def test_max_len_beyond_the_models_context(tiny_model_dir, tmp_path):
    short = variant(tiny_model_dir, tmp_path / "short", context=128)
    with pytest.raises(ConfigError, match=r"data.max_len=256 exceeds the model's context \(max_position_embeddings=128"):
        check(demo_cfg(short, tmp_path), ("train",))
    assert check(demo_cfg(short, tmp_path, "data.max_len=128", "eval.max_new_tokens=8"), ("train",)) == []


def test_unreadable_model_config_is_exit_2(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match="model.name_or_path=.*cannot read the model config"):
        check(demo_cfg(str(missing), tmp_path), ("eval",))
    broken = Path(variant(tiny_model_dir, tmp_path / "broken"))
    (broken / "config.json").write_text("{not json")
    p = tmp_path / "c.yaml"
    p.write_text(f"model: {{name_or_path: {broken}}}\ndata: {{safety: {{uri: builtin:demo}}}}\n"
                 f"eval: {{questions: {{uri: builtin:demo}}}}\nstorage: {{root: {tmp_path}}}\n")
    assert main(["plan", "--config", str(p)]) == 2  # `plan`'s 1 means "does not fit"
    assert "cannot read the model config" in capsys.readouterr().err
    # config.json alone (how plans size hub models): planning skips the tokenizer checks, a run does not
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(Path(tiny_model_dir) / "config.json", only_config)
    notes = check(demo_cfg(str(only_config), tmp_path), ("train", "eval"), planning=True)
    assert any("cannot read the tokenizer" in n for n in notes), notes
    with pytest.raises(ConfigError, match="cannot read the tokenizer"):
        check(demo_cfg(str(only_config), tmp_path), ("train", "eval"))


def test_a_method_without_its_data_names_data_safety(tiny_model_dir, tmp_path):
    raw = {"model": {"name_or_path": tiny_model_dir}, "storage": {"root": str(tmp_path)}, "eval": {"engine": "hf"}}
    with pytest.raises(ConfigError, match="data.safety: train.method=derta .* data.safety is not set"):
        check(validate_config(raw), ("train",))
    sft = validate_config({**raw, "train": {"method": "sft"}, "data": {"helpful": {"uri": "builtin:demo"}}})
    assert check(sft, ("train",)) == []
    with pytest.raises(ConfigError, match="no training data"):
        check(validate_config({**raw, "train": {"method": "sft"}}), ("train",))
    rto = validate_config({**raw, "data": {"safety": {"uri": "builtin:demo"}}})
    assert check(rto, ("train",)) == ["data.helpful is not set: no helpful samples (safety samples only)"]
    # an eval-only config needs no training data
    ev = validate_config({**raw, "data": {"max_len": 256}, "eval": {"engine": "hf", "questions": {"uri": "builtin:demo"}}})
    assert check(ev, ("eval",)) == []
    long = ev.model_copy(update={"data": ev.data.model_copy(update={"max_len": 1000})})
    assert any("data.max_len + eval.max_new_tokens = 1064 > the model's context 1024" in n for n in check(long, ("eval",)))


def test_tune_needs_held_out_triples(tiny_model_dir, tmp_path):
    """The proxy objective scores trials on held-out triples; the public-code default holds none out."""
    with pytest.raises(ConfigError, match="data.holdout: the tune proxy objective"):
        check(demo_cfg(tiny_model_dir, tmp_path, "data.holdout=0"), ("tune",))
    assert check(demo_cfg(tiny_model_dir, tmp_path), ("tune",)) == []
