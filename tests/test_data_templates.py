"""Exact tokens, labels and masks of every sample kind under every template (tiny tokenizer).

The expected pieces below were checked by decoding: 'Ġ' is a leading space, 'Ċ' a newline.
"""

from __future__ import annotations

import pytest
from _fixtures import tiny_model_dir, tiny_tokenizer  # noqa: F401

from derta.config import ConfigError, DataConfig, PrefixConfig
from derta.data.templates import make_template
from derta.data.tokenize import SampleBuilder

Q = "How do I bake bread?"
SAFE = "Sorry, I can't help."
HARM = "Sure, here is how. Step 1: take the jar."
RESP = "Sure, here is how."

CHAT_PROMPT = [
    "<|begin_of_text|>", "<|start_header_id|>", "u", "se", "r", "<|end_header_id|>", "Ċ", "Ċ",
    "How", "Ġdo", "ĠI", "Ġbake", "Ġbread", "?", "<|eot_id|>",
    "<|start_header_id|>", "a", "ss", "ist", "ant", "<|end_header_id|>", "Ċ", "Ċ",
]  # fmt: skip
INST_PROMPT = ["[", "I", "N", "S", "T", "]", "Ġ", "How", "Ġdo", "ĠI", "Ġbake", "Ġbread", "?", "Ġ", "[", "\\", "I", "N", "S", "T", "]"]
RAW_PROMPT = ["How", "Ġdo", "ĠI", "Ġbake", "Ġbread", "?", "Ċ"]
HARM_PIECES = ["Sure", ",", "Ġhere", "Ġis", "Ġhow", ".", "ĠStep", "Ġ1", ":", "Ġtake", "Ġthe", "Ġjar", "."]
SAFE_FIRST = ["Sorry", ",", "ĠI", "Ġcan", "'t", "Ġhelp", "."]  # the response starts the turn
SAFE_AFTER = ["ĠS", "orry", ",", "ĠI", "Ġcan", "'t", "Ġhelp", "."]  # after a harmful prefix
EOT = ["<|eot_id|>"]

PROMPTS = {"chat_template": CHAT_PROMPT, "llama3": CHAT_PROMPT, "inst": INST_PROMPT, "raw": RAW_PROMPT}


def _lead(template: str, pieces: list[str]) -> list[str]:
    """inst puts a space before the response: 'Sure' -> 'ĠSure', 'Sorry' -> 'ĠS' 'orry'."""
    if template != "inst":
        return pieces
    if pieces[0] == "Sorry":
        return SAFE_AFTER
    return ["Ġ" + pieces[0]] + pieces[1:]


def _build(tok, template: str, kinds: list[str], fraction: float = 1 / 3, max_len: int = 256, **data):
    t = make_template(template, tok)
    cfg = DataConfig(template=template, max_len=max_len,
                     prefix=PrefixConfig(dist="fixed_fraction", fraction=fraction, unit="word"), **data)
    rec = {"source_id": "safety:0", "query": Q, "safe": SAFE, "harmful": HARM, "response": RESP, "kinds": kinds}
    return SampleBuilder(t, cfg).build([rec])


def _pieces(tok, ids):
    return tok.convert_ids_to_tokens(list(ids))


@pytest.mark.parametrize("template", ["chat_template", "llama3", "inst", "raw"])
def test_helpful_and_vanilla(tiny_tokenizer, template):
    samples, skips = _build(tiny_tokenizer, template, ["helpful", "vanilla"])
    assert not skips
    helpful, vanilla = samples
    prompt = PROMPTS[template]
    resp = _lead(template, HARM_PIECES[:6])
    assert helpful.kind == "helpful" and helpful.prefix_len == 0 and helpful.source_id == "safety:0"
    assert _pieces(tiny_tokenizer, helpful.input_ids) == prompt + resp + EOT
    n = len(prompt)
    assert helpful.labels[:n] == [-100] * n
    assert helpful.labels[n:] == helpful.input_ids[n:]  # response + end of turn are trained
    assert not any(helpful.rto_mask)
    safe = _lead(template, SAFE_FIRST)
    assert _pieces(tiny_tokenizer, vanilla.input_ids) == prompt + safe + EOT
    assert vanilla.labels == [-100] * n + vanilla.input_ids[n:]


@pytest.mark.parametrize("template", ["chat_template", "llama3", "inst", "raw"])
def test_prefix_sample(tiny_tokenizer, template):
    # 9 words, fraction 1/3 -> k = 3 words = "Sure, here is" = 4 tokens
    (s,), _ = _build(tiny_tokenizer, template, ["prefix"])
    prompt = PROMPTS[template]
    harm = _lead(template, HARM_PIECES)[:4]
    assert s.prefix_len == 4
    assert _pieces(tiny_tokenizer, s.input_ids) == prompt + harm + SAFE_AFTER + EOT
    n_ctx = len(prompt) + 4
    assert s.labels[:n_ctx] == [-100] * n_ctx  # neither the prompt nor the harmful prefix is trained
    assert s.labels[n_ctx:] == s.input_ids[n_ctx:]
    assert _pieces(tiny_tokenizer, [x for x in s.labels if x != -100]) == SAFE_AFTER + EOT
    assert not any(s.rto_mask)


@pytest.mark.parametrize("template", ["chat_template", "inst"])
def test_prefix_k0_is_vanilla_shaped(tiny_tokenizer, template):
    (s,), _ = _build(tiny_tokenizer, template, ["prefix"], fraction=0.0)
    (v,), _ = _build(tiny_tokenizer, template, ["vanilla"])
    assert s.kind == "prefix" and s.prefix_len == 0
    assert s.input_ids == v.input_ids and s.labels == v.labels


@pytest.mark.parametrize("template", ["chat_template", "llama3", "inst", "raw"])
@pytest.mark.parametrize("kind", ["rto", "pref"])
def test_rto_and_pref(tiny_tokenizer, template, kind):
    (s,), _ = _build(tiny_tokenizer, template, [kind])
    prompt = PROMPTS[template]
    harm = _lead(template, HARM_PIECES)
    assert s.kind == kind and s.prefix_len == len(harm) == 13
    assert _pieces(tiny_tokenizer, s.input_ids) == prompt + harm  # no end of turn after r^
    assert s.labels == [-100] * len(s)
    assert s.rto_mask == [False] * len(prompt) + [True] * len(harm)


def test_decoded_texts(tiny_tokenizer):
    (h,), _ = _build(tiny_tokenizer, "inst", ["helpful"])
    assert tiny_tokenizer.decode(h.input_ids) == f"[INST] {Q} [\\INST] {RESP}<|eot_id|>"
    (h,), _ = _build(tiny_tokenizer, "raw", ["helpful"])
    assert tiny_tokenizer.decode(h.input_ids) == f"{Q}\n{RESP}<|eot_id|>"
    (p,), _ = _build(tiny_tokenizer, "chat_template", ["prefix"])
    rendered = tiny_tokenizer.apply_chat_template([{"role": "user", "content": Q}], tokenize=False, add_generation_prompt=True)
    assert tiny_tokenizer.decode(p.input_ids) == rendered + "Sure, here is " + SAFE + "<|eot_id|>"


def test_llama3_matches_chat_template_on_llama_style_tokenizer(tiny_tokenizer):
    for kind in ("helpful", "prefix", "rto"):
        (a,), _ = _build(tiny_tokenizer, "llama3", [kind])
        (b,), _ = _build(tiny_tokenizer, "chat_template", [kind])
        assert a.input_ids == b.input_ids and a.labels == b.labels and a.rto_mask == b.rto_mask


def test_template_errors(tiny_model_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        make_template("chat_template", tok)
    with pytest.raises(ConfigError, match="unknown template"):
        make_template("alpaca", tok)
    wl = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]", eos_token="b")
    with pytest.raises(ConfigError, match="Llama-3 special tokens"):
        make_template("llama3", plain)
    assert make_template("inst", plain).end_ids == (1,)


def test_word_unit_counts_tokens_of_whole_words(tiny_tokenizer):
    t = make_template("chat_template", tiny_tokenizer)
    ((ids, ends),) = t.encode_with_word_ends([HARM], "")
    # Sure, | here | is | how. | Step | 1: | take | the | jar.
    assert ends == [2, 3, 4, 6, 7, 9, 10, 11, 13]
    assert len(ids) == 13
