"""The one prompt renderer: how a user turn (and the start of an assistant turn) becomes the
token ids a model sees. The data build (data/templates.py), response generation
(data/generate.py), every eval attack, helpfulness and the LLM judges render through these
functions, so a model is evaluated in exactly the format it was trained on.

Templates (data.template; eval.template overrides it for eval, None = follow data.template):
  raw            q + "\\n", then the response                 no chat markup
  inst           "[INST] {q} [\\INST]", then " " + response    the paper's public code
  chat_template  the tokenizer's own chat template (add_generation_prompt=True)
  llama3         explicit Llama-3 headers (needs the Llama-3 special tokens)

Ids: the tokenizer's own leading specials (BOS for Llama-3; for llama3 <|begin_of_text|>;
none for chat_template, whose text already holds them), then the prompt text encoded without
special tokens, then assistant-turn text (a response, or a harmful prefix) encoded separately
with the template's lead (" " for inst), so no BPE merge crosses the prompt/response seam.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from derta.config import ConfigError

TEMPLATES = ("raw", "inst", "chat_template", "llama3")

INST_PROMPT = "[INST] {q} [\\INST]"
LLAMA3_PROMPT = "<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


# --------------------------------------------------------------------------- checks (pure)
def needs_chat_template(template: str) -> bool:
    """Whether rendering with `template` needs the tokenizer to ship a chat template."""
    return template == "chat_template"


def single_id(tokenizer: Any, token: str) -> int | None:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def check_template(tokenizer: Any, template: str, key: str) -> None:
    """ConfigError (naming `key`, e.g. data.template / eval.template) when `tokenizer` cannot
    render `template`: an unknown name, chat_template without a chat template (base models ship
    none), llama3 without the Llama-3 special tokens."""
    if template not in TEMPLATES:
        raise ConfigError(f"{key}: unknown template {template!r} (one of {', '.join(TEMPLATES)})")
    if needs_chat_template(template) and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"{key}=chat_template: the tokenizer has no chat template (base models ship none); "
            f"set {key} to inst, raw or llama3 (the format the model was trained with)"
        )
    if template == "llama3":
        missing = [t for t in LLAMA3_SPECIALS if single_id(tokenizer, t) is None]
        if missing:
            raise ConfigError(
                f"{key}=llama3: the tokenizer lacks the Llama-3 special tokens {missing}; "
                f"use {key}=chat_template (the tokenizer's own) or inst"
            )


# --------------------------------------------------------------------------- rendering (pure)
def response_lead(template: str) -> str:
    """Text put before the first assistant-turn segment (" " for inst: "[\\INST] Sure")."""
    return " " if template == "inst" else ""


def tokenizer_prefix(tokenizer: Any) -> tuple[int, ...]:
    """The ids the tokenizer adds in front of text by itself (BOS for Llama-3, often none)."""
    with_sp = list(tokenizer("a")["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for i in range(len(with_sp) - len(without) + 1):
        if with_sp[i : i + len(without)] == without:
            return tuple(with_sp[:i])
    return ()


def special_prefix(template: str, tokenizer: Any) -> tuple[int, ...]:
    """Special ids before the prompt text: none for chat_template (its text has them)."""
    if template == "chat_template":
        return ()
    if template == "llama3":
        return (single_id(tokenizer, "<|begin_of_text|>"),)
    return tokenizer_prefix(tokenizer)


def prompt_text(template: str, tokenizer: Any, user: str) -> str:
    """The rendered prompt text: everything before the assistant's first token."""
    if template == "raw":
        return user + "\n"
    if template == "inst":
        return INST_PROMPT.format(q=user)
    if template == "llama3":
        return LLAMA3_PROMPT.format(q=user)
    if template == "chat_template":
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    raise ConfigError(f"unknown template {template!r} (one of {', '.join(TEMPLATES)})")


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Plain ids of each text, no special tokens added (batched: one Rust call)."""
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def prompt_ids(template: str, tokenizer: Any, users: Sequence[str], prefix: Sequence[int] | None = None) -> list[list[int]]:
    """Prompt ids of each user turn (`prefix`: special_prefix, when the caller has it cached)."""
    pre = list(special_prefix(template, tokenizer) if prefix is None else prefix)
    return [pre + ids for ids in encode(tokenizer, [prompt_text(template, tokenizer, u) for u in users])]


def assistant_ids(template: str, tokenizer: Any, text: str) -> list[int]:
    """Ids of text that starts the assistant turn (a response, a harmful prefix), lead included."""
    return encode(tokenizer, [response_lead(template) + text])[0]


def prefill_ids(template: str, tokenizer: Any, harmful: str, k: int) -> list[int]:
    """The first k tokens of the harmful response as training's harmful-prefix rows hold them."""
    return assistant_ids(template, tokenizer, harmful)[: max(0, k)]


def conversation_ids(tokenizer: Any, messages: Sequence[dict[str, str]], key: str = "eval.judge_model",
                     add_generation_prompt: bool = False) -> list[int]:
    """A whole conversation (system / user / assistant turns) through the tokenizer's own chat
    template, as ids: how a classifier that judges a reply (Llama Guard) is prompted. Llama Guard's
    template ends with its own instruction to assess the last turn, so by default no generation
    prompt is added; a rubric judge (StrongREJECT) asks for one."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{key}: the classifier's tokenizer has no chat template to render the conversation with")
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(ids, "keys"):  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


# --------------------------------------------------------------------------- bound
@dataclass(frozen=True)
class Renderer:
    """A template bound to one model's tokenizer; `key` is the config key it came from (errors)."""

    template: str
    tokenizer: Any
    key: str = "data.template"
    _prefix: tuple[int, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def make(cls, template: str, tokenizer: Any, key: str = "data.template") -> "Renderer":
        check_template(tokenizer, template, key)
        return cls(template, tokenizer, key, special_prefix(template, tokenizer))

    def prompt_ids(self, user: str) -> list[int]:
        return prompt_ids(self.template, self.tokenizer, [user], self._prefix)[0]

    def prefill_ids(self, harmful: str, k: int) -> list[int]:
        return prefill_ids(self.template, self.tokenizer, harmful, k)


def eval_template(cfg: Any) -> tuple[str, str]:
    """(template, config key) eval renders with: eval.template, else the training data.template."""
    if getattr(cfg.eval, "template", None):
        return cfg.eval.template, "eval.template"
    return cfg.data.template, "data.template"


def eval_renderer(cfg: Any, tokenizer: Any) -> Renderer:
    """The renderer for the evaluated model of an ExperimentConfig (ConfigError if it cannot)."""
    template, key = eval_template(cfg)
    return Renderer.make(template, tokenizer, key)
