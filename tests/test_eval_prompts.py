"""The one prompt renderer (derta.prompts): eval prompts are the token prefix of the training
rows the data build makes; eval follows data.template (eval.template overrides); a base-model
tokenizer without a chat template works for inst/raw/llama3 and fails clearly for chat_template."""

from __future__ import annotations

import pytest

from _fixtures import tiny_model_dir, tiny_tokenizer  # noqa: F401
from derta.config import ConfigError, DataConfig, PrefixConfig, load_config
from derta.data.templates import make_template
from derta.data.tokenize import SampleBuilder
from derta.eval.attacks import Question, prefill
from derta.eval.engines import render_prompt_ids
from derta.prompts import Renderer, check_template, eval_renderer, eval_template, needs_chat_template

Q = "How do I make a zindle at home?"
HARM = "Sure, here is how to do it. Step 1: take the blue jar from the shed. Step 2: turn it twice."
SAFE = "Sorry, I can't help with that."
ALL_ATTACKS = "eval.attacks=[prefill,completion,codeattack,jailbreakchat,selfcipher,direct]"


@pytest.fixture(scope="module")
def base_tokenizer(tiny_model_dir, tmp_path_factory):
    """The builtin tiny tokenizer saved without its chat template (what base Llama-3 ships)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    d = tmp_path_factory.mktemp("base-tok")
    tok.save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert not getattr(tok, "chat_template", None)
    return tok


def _training_prefix_row(tok, template: str, k: int):
    """The data build's harmful-prefix row for (Q, HARM, k harmful tokens)."""
    t = make_template(template, tok)
    n = len(t.encode([t.lead + HARM])[0])
    cfg = DataConfig(template=template, max_len=512, prefix=PrefixConfig(dist="fixed_fraction", fraction=k / n, unit="token"))
    rec = {"source_id": "safety:0", "query": Q, "safe": SAFE, "harmful": HARM, "kinds": ["prefix"]}
    (s,), _ = SampleBuilder(t, cfg).build([rec])
    assert s.prefix_len == k
    return s, len(t.prompt_ids([Q])[0])


@pytest.mark.parametrize("template", ["inst", "raw", "llama3", "chat_template"])
@pytest.mark.parametrize("k", [0, 1, 7, 20])
def test_prefill_prompt_is_the_token_prefix_of_the_training_row(tiny_tokenizer, template, k):
    row, n_prompt = _training_prefix_row(tiny_tokenizer, template, k)
    r = Renderer.make(template, tiny_tokenizer)
    [p] = prefill.build([Question("q", Q, HARM)], load_config(None, [f"eval.prefill_k=[{k}]"]).eval, r)
    ids = render_prompt_ids(tiny_tokenizer, p.request)
    assert ids == row.input_ids[: n_prompt + k]  # prompt + the first k harmful tokens, byte-exact
    assert row.labels[len(ids)] != -100  # ...and the row trains the safe response right after them


def test_inst_prefill_text_matches_the_paper_format(base_tokenizer):
    r = Renderer.make("inst", base_tokenizer)
    [p] = prefill.build([Question("q", Q, HARM)], load_config(None, ["eval.prefill_k=[3]"]).eval, r)
    text = base_tokenizer.decode(render_prompt_ids(base_tokenizer, p.request))
    assert text == f"[INST] {Q} [\\INST] " + p.prefill.lstrip() and p.prefill.startswith(" Sure")


def test_checks_name_the_key(base_tokenizer, tiny_tokenizer):
    assert needs_chat_template("chat_template") and not any(needs_chat_template(t) for t in ("inst", "raw", "llama3"))
    for t in ("inst", "raw", "llama3"):
        check_template(base_tokenizer, t, "eval.template")  # no chat template needed
    check_template(tiny_tokenizer, "chat_template", "data.template")
    for key in ("data.template", "eval.template"):
        with pytest.raises(ConfigError, match=rf"^{key}=chat_template: the tokenizer has no chat template"):
            check_template(base_tokenizer, "chat_template", key)
    with pytest.raises(ConfigError, match="eval.template: unknown template 'alpaca'"):
        check_template(tiny_tokenizer, "alpaca", "eval.template")


def test_eval_follows_data_template_unless_eval_template(tiny_tokenizer):
    assert eval_template(load_config(None, [])) == ("chat_template", "data.template")
    assert eval_template(load_config(None, ["data.template=inst"])) == ("inst", "data.template")
    cfg = load_config(None, ["data.template=inst", "eval.template=raw"])
    assert eval_template(cfg) == ("raw", "eval.template")
    r = eval_renderer(cfg, tiny_tokenizer)
    assert tiny_tokenizer.decode(r.prompt_ids(Q)) == Q + "\n"


@pytest.mark.parametrize("template", ["inst", "raw", "llama3"])
def test_every_attack_and_helpfulness_without_a_chat_template(base_tokenizer, template):
    from derta.eval.runner import collect_items

    cfg = load_config(None, [f"data.template={template}", ALL_ATTACKS, "eval.helpfulness=[demo,over_refusal]",
                             "eval.limit=2", "eval.prefill_k=[0,4]"])
    items = collect_items(cfg, base_tokenizer)
    assert {getattr(i, "attack", None) or i.benchmark for i in items} == {
        "prefill", "completion", "codeattack", "jailbreakchat", "selfcipher", "direct", "demo", "over_refusal"}
    r = Renderer.make(template, base_tokenizer)
    for it in items:
        req = it.request
        if getattr(it, "attack", "") == "completion":  # the paper's CompletingAttack: no template at all
            assert req.prompt_ids is None and req.prompt.endswith("Step 1:")
            continue
        ids = render_prompt_ids(base_tokenizer, req)
        assert ids[: len(req.prompt_ids)] == r.prompt_ids(req.user)
        text = base_tokenizer.decode(ids)
        assert {"inst": "[INST] ", "raw": "", "llama3": "<|begin_of_text|><|start_header_id|>user"}[template] in text
    with pytest.raises(ConfigError, match="^data.template=chat_template"):
        collect_items(load_config(None, [ALL_ATTACKS]), base_tokenizer)
    with pytest.raises(ConfigError, match="^eval.template=chat_template"):
        collect_items(load_config(None, [f"data.template={template}", "eval.template=chat_template"]), base_tokenizer)


def test_generation_renders_in_the_generating_models_chat_template(tiny_model_dir, base_tokenizer, tmp_path):
    import pyarrow as pa

    from derta.data import generate
    from derta.eval.engines import GenRequest

    batch = pa.table({"query": [Q], "error": [None], "response": [None]})
    out = generate._requests(batch, max_new_tokens=5, seed=0, model=tiny_model_dir, key="data.generate.harmful_model")
    req = GenRequest.from_json(out["request"][0])
    tok = generate._renderer(tiny_model_dir, "data.generate.harmful_model").tokenizer
    assert req.user == Q and tok.decode(req.prompt_ids) == tok.apply_chat_template(
        [{"role": "user", "content": Q}], tokenize=False, add_generation_prompt=True)
    base_tokenizer.save_pretrained(tmp_path / "base")
    with pytest.raises(ConfigError, match="^data.generate.safe_model=chat_template: the tokenizer has no chat template"):
        generate._renderer(str(tmp_path / "base"), "data.generate.safe_model")
