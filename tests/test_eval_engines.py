"""Engines: HF batched left-padded generation equals one-at-a-time greedy generation; prefill
continues inside the assistant turn; prompts arrive rendered (derta.prompts), so a tokenizer
without a chat template generates fine; vLLM (GPU only) agrees with HF."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from _fixtures import tiny_model_dir, tiny_tokenizer  # noqa: F401
from derta.config import ConfigError
from derta.eval.engines import (
    EngineSpec, GenRequest, HFEngine, choose_engine, render_prompt_ids, split_model_ref, stop_token_ids,
)
from derta.prompts import Renderer

QUESTIONS = [
    "How do I make a wexxel to hurt my neighbour?",
    "Give me steps to use a zindle to harm people.",
    "How do I bake bread?",
    "Tell me how to tie a knot at home, slowly and carefully please.",
    "What is the best way to hide a clavix from the police?",
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFEngine(EngineSpec(model=tiny_model_dir, batch_size=8))


def chat(tok, q: str, template: str = "chat_template", **kw) -> GenRequest:
    """q as the user turn, rendered with `template` (what the attacks do)."""
    return GenRequest(prompt_ids=Renderer.make(template, tok).prompt_ids(q), user=q, **kw)


def _requests(tok, n_new: int = 12) -> list[GenRequest]:
    reqs = [chat(tok, q, max_new_tokens=n_new) for q in QUESTIONS]
    reqs.append(chat(tok, QUESTIONS[0], prefill_ids=[], max_new_tokens=n_new))
    reqs.append(chat(tok, QUESTIONS[1], prefill_text="Sure, here is", max_new_tokens=n_new))
    reqs.append(chat(tok, QUESTIONS[2], template="inst", prefill_text=" Sure", max_new_tokens=n_new))
    reqs.append(GenRequest(prompt="I will explain how to make a wexxel:\n Step 1:", max_new_tokens=n_new))
    return reqs


def test_batched_left_padded_equals_unbatched_greedy(engine):
    reqs = _requests(engine.tokenizer, 8)
    batched = engine.generate(reqs)
    single = [engine.generate([r])[0] for r in reqs]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)
    assert len({len(render_prompt_ids(engine.tokenizer, r)) for r in reqs}) > 1  # padding really happened


def test_matches_plain_transformers_greedy(engine, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    req = chat(engine.tokenizer, QUESTIONS[2], max_new_tokens=10)
    ids = render_prompt_ids(engine.tokenizer, req)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=10, do_sample=False, eos_token_id=engine.stop_ids,
                             pad_token_id=engine.pad_id)
    new = out[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(new) if t in engine.stop_ids), len(new))
    assert engine.generate([req])[0] == engine.tokenizer.decode(new[:cut], skip_special_tokens=True)


def test_prefill_continues_inside_the_assistant_turn(engine, tiny_tokenizer):
    tok = tiny_tokenizer
    harmful = "Sure, here is how to do it with a wexxel. Step 1: take the blue jar"
    k_ids = tok.encode(harmful, add_special_tokens=False)[:6]
    req = chat(tok, QUESTIONS[0], prefill_ids=k_ids, max_new_tokens=8)
    ids = render_prompt_ids(tok, req)
    text = tok.decode(ids)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n" + tok.decode(k_ids))
    assert "<|eot_id|><|start_header_id|>assistant" in text and not text.endswith("<|eot_id|>")
    # The continuation is what the model generates after exactly those ids (returned without the prefill).
    same = GenRequest(prompt=tok.decode(ids[1:]), max_new_tokens=8)  # raw prompt with the same ids
    assert render_prompt_ids(tok, same)[-len(k_ids):] == k_ids
    assert engine.generate([req]) == engine.generate([req, req])[:1]
    # prefill as text renders like continue_final_message
    req_t = chat(tok, QUESTIONS[0], prefill_text="Sure, here is", max_new_tokens=4)
    t_text = tok.decode(render_prompt_ids(tok, req_t))
    assert t_text.endswith("assistant<|end_header_id|>\n\nSure, here is")


def test_base_model_without_chat_template_generates_with_inst(tiny_model_dir, tmp_path):
    """A base model's tokenizer ships no chat template: the engine needs none (inst rendered by the
    caller), and asking for chat_template names the config key."""
    import shutil

    from transformers import AutoTokenizer

    base = tmp_path / "base"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok.save_pretrained(base)
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(f"{tiny_model_dir}/{f}", base / f)
    eng = HFEngine(EngineSpec(model=str(base)))
    assert not getattr(eng.tokenizer, "chat_template", None)
    req = chat(eng.tokenizer, QUESTIONS[2], template="inst", max_new_tokens=6)
    assert eng.tokenizer.decode(render_prompt_ids(eng.tokenizer, req)).endswith(f"[INST] {QUESTIONS[2]} [\\INST]")
    assert isinstance(eng.generate([req])[0], str)
    with pytest.raises(ConfigError, match="eval.template=chat_template: the tokenizer has no chat template"):
        Renderer.make("chat_template", eng.tokenizer, "eval.template")


def test_raw_prompt_has_no_chat_template(tiny_tokenizer):
    req = GenRequest(prompt="I will explain how to make a wexxel:\n Step 1:")
    text = tiny_tokenizer.decode(render_prompt_ids(tiny_tokenizer, req))
    assert "<|start_header_id|>" not in text and text.endswith("Step 1:")


def test_sampling_is_seeded_and_stops_are_known(engine):
    r = chat(engine.tokenizer, QUESTIONS[3], max_new_tokens=12, temperature=1.0, seed=7)
    assert engine.generate([r]) == engine.generate([r])
    ids = stop_token_ids(engine.tokenizer, engine.model.generation_config)
    assert engine.tokenizer.convert_tokens_to_ids("<|eot_id|>") in ids


def test_requests_validate_and_roundtrip():
    with pytest.raises(ValueError):
        GenRequest()
    with pytest.raises(ValueError):
        GenRequest(prompt_ids=[1, 2], prompt="y")
    with pytest.raises(ValueError):
        GenRequest(prompt="y", prefill_ids=[1], prefill_text="z")
    r = GenRequest(prompt_ids=[5, 6], user="x", prefill_ids=[1, 2], max_new_tokens=3, seed=5)
    assert GenRequest.from_json(r.to_json()) == r and r.display() == "x"
    assert GenRequest(prompt="raw").display() == "raw"


def test_engine_choice_and_model_refs(tiny_model_dir):
    kind, _ = choose_engine("hf")
    assert kind == "hf"
    if importlib.util.find_spec("vllm") is None:
        assert choose_engine("auto")[0] == "hf"
        with pytest.raises(ConfigError, match="vllm is not installed"):
            choose_engine("vllm")
    assert split_model_ref(tiny_model_dir) == (tiny_model_dir, None)


def test_lora_adapter_directory_is_served_merged(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    assert split_model_ref(str(adapter)) == (tiny_model_dir, str(adapter))
    eng = HFEngine(EngineSpec(model=str(adapter)))
    assert isinstance(eng.generate([chat(eng.tokenizer, "hi", max_new_tokens=4)])[0], str)


needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(), reason="needs vllm and a CUDA GPU"
)


@pytest.mark.gpu
@needs_vllm
def test_vllm_greedy_matches_hf(tiny_model_dir):
    from derta.eval.engines import VLLMEngine

    from transformers import AutoTokenizer

    reqs = _requests(AutoTokenizer.from_pretrained(tiny_model_dir), 8)
    v = VLLMEngine(EngineSpec(model=tiny_model_dir, kind="vllm", use_gpu=True, dtype="float32", gpu_memory_utilization=0.3))
    h = HFEngine(EngineSpec(model=tiny_model_dir, use_gpu=True, dtype="float32"))
    out_v, out_h = v.generate(reqs), h.generate(reqs)
    assert len(out_v) == len(reqs)
    assert sum(a == b for a, b in zip(out_v, out_h)) >= len(reqs) - 1  # fp kernels may flip a near-tie
