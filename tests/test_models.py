"""The tiny-model factory round trip, the refusal-token lookup and LoRA, through from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _fixtures import tiny_model_dir, tiny_tokenizer  # noqa: F401
from derta.config import ConfigError, LoraConfig, ModelConfig
from derta.models import (
    CHAT_TEMPLATE,
    apply_lora,
    build_tiny_model,
    load_model,
    load_tokenizer,
    refusal_token_id,
    resolve_model_path,
)


def test_factory_writes_a_normal_hf_directory(tiny_model_dir):
    cfg = json.load(open(f"{tiny_model_dir}/config.json"))
    assert cfg["model_type"] == "llama"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tok.is_fast and tok.chat_template == CHAT_TEMPLATE
    assert model.config.vocab_size == len(tok)
    ids = tok.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}], add_generation_prompt=True,
                                  return_dict=False)
    text = tok.decode(ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHow do I bake bread?<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= len(ids) + 4


def test_factory_is_deterministic(tmp_path, tiny_model_dir):
    other = build_tiny_model(tmp_path / "again")
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(other).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert open(f"{tiny_model_dir}/tokenizer.json").read() == open(other / "tokenizer.json").read()


def test_builtin_tiny_resolves_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("DERTA_CACHE", str(tmp_path))
    path = resolve_model_path("builtin:tiny")
    assert path.startswith(str(tmp_path))
    cfg = ModelConfig()
    tok, model = load_tokenizer(cfg), load_model(cfg)
    assert model.dtype == torch.float32 and tok.pad_token_id is not None
    with pytest.raises(ConfigError, match="unknown builtin"):
        resolve_model_path("builtin:huge")


def test_refusal_token(tiny_tokenizer):
    sorry = refusal_token_id(tiny_tokenizer, "Sorry")
    assert tiny_tokenizer.decode([sorry]) == "Sorry"
    with pytest.raises(ConfigError, match="train.refusal_token"):
        refusal_token_id(tiny_tokenizer, "Unfortunately-not-a-token")
    assert refusal_token_id(tiny_tokenizer, "Unfortunately-not-a-token", fallback="Sorry") == sorry


def test_lora_wraps_present_modules_and_trains(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 100, (2, 12))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n or "lora_A" in n)
    with pytest.raises(ConfigError, match="target_modules"):
        apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(target_modules=["nope"]))
