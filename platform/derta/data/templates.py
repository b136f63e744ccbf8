"""Prompt templates for training rows: how (query, response) becomes token ids. The prompt
rendering itself is derta.prompts (the one renderer eval, generation and judges use too), so
eval prompts are the token prefix of the training rows; this module adds what only training
needs (end-of-turn ids, the separator after a harmful prefix, word boundaries).

The prompt and each response segment are tokenized *separately* and their ids concatenated,
so the boundary between "what the user wrote", "the harmful prefix the model emitted" and
"the response we train on" is exact (no BPE merge across it). The harmful prefix is part of
the assistant turn: it sits after the generation prompt, as model output.

Templates (data.template):
  raw            q + "\n" + response                        no chat markup (completion style)
  inst           "[INST] {q} [\\INST]" + " " + response + eos   the paper's public code
  chat_template  the tokenizer's own chat template (add_generation_prompt=True for the prompt)
  llama3         explicit Llama-3 headers (needs a tokenizer with the Llama-3 special tokens)

`inst` and `raw` start with whatever special tokens the tokenizer itself adds (BOS for
Llama-3, nothing for tokenizers that add none), so they match what `tokenizer(text)` gives at
inference time. The end-of-turn ids (eos / <|eot_id|> / the chat template's turn suffix) end
every MLE row and are trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from derta import prompts as P
from derta.config import ConfigError
from derta.prompts import (  # noqa: F401  (re-exported: one renderer, see derta.prompts)
    INST_PROMPT, LLAMA3_PROMPT, LLAMA3_SPECIALS, TEMPLATES, check_template, needs_chat_template,
)

_PROBE = "XQZJ"  # a marker for locating the assistant content inside a rendered chat template


@dataclass(frozen=True)
class Template:
    """A template bound to one tokenizer.

    lead: text put before the first response segment (" " for inst: "[\\INST] Sure").
    sep:  text put before a response segment that continues another one (the safe response
          after a harmful prefix: "... step 2 Sorry" needs the space).
    """

    name: str
    tokenizer: Any
    lead: str
    sep: str
    prefix_ids: tuple[int, ...]  # special ids before the prompt text (BOS), for raw/inst/llama3
    end_ids: tuple[int, ...]

    # ------------------------------------------------------------------ prompts
    def prompt_texts(self, queries: Sequence[str]) -> list[str]:
        """The rendered prompt text (everything before the assistant's first token)."""
        return [P.prompt_text(self.name, self.tokenizer, q) for q in queries]

    def prompt_ids(self, queries: Sequence[str]) -> list[list[int]]:
        return P.prompt_ids(self.name, self.tokenizer, queries, self.prefix_ids)

    # ------------------------------------------------------------------ responses
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Plain ids of each text, no special tokens added (batched: one Rust call)."""
        return P.encode(self.tokenizer, texts)

    def encode_with_word_ends(self, texts: Sequence[str], lead: str) -> list[tuple[list[int], list[int]]]:
        """ids of lead+text and, for each whitespace-separated word of text, how many tokens
        cover the words up to and including it (word_ends[k-1] = tokens of the first k words).
        """
        if not texts:
            return []
        full = [lead + t for t in texts]
        try:
            enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
        except (NotImplementedError, ValueError, TypeError, KeyError):
            offsets = None
            enc = self.tokenizer(full, add_special_tokens=False)
        out = []
        for i, text in enumerate(full):
            ids = list(enc["input_ids"][i])
            ends = _word_char_ends(text)
            if offsets is not None:
                word_ends = _tokens_covering(ends, [o[0] for o in offsets[i]])
            else:  # slow tokenizer: tokenize each word prefix (exact but quadratic)
                word_ends = [min(len(ids), len(self.encode([text[:e]])[0])) for e in ends]
            out.append((ids, word_ends))
        return out


def _word_char_ends(text: str) -> list[int]:
    """Char index just past each whitespace-separated word."""
    ends, in_word = [], False
    for i, ch in enumerate(text):
        if ch.isspace():
            if in_word:
                ends.append(i)
            in_word = False
        else:
            in_word = True
    if in_word:
        ends.append(len(text))
    return ends


def _tokens_covering(char_ends: list[int], token_starts: list[int]) -> list[int]:
    """For each char position e: how many leading tokens cover text[:e] (tokens starting before e)."""
    out, t, n = [], 0, len(token_starts)
    for e in char_ends:
        while t < n and token_starts[t] < e:
            t += 1
        out.append(t)
    return out


def _chat_end_text(tokenizer) -> str:
    """What the chat template writes after an assistant message (e.g. '<|eot_id|>')."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    i = full.rfind(_PROBE)
    return full[i + len(_PROBE):] if i >= 0 else ""


def make_template(name: str, tokenizer, key: str = "data.template") -> Template:
    """Bind a template to a tokenizer; ConfigError (naming `key`) when the tokenizer cannot
    support it (derta.prompts.check_template) or has no end-of-turn token for training rows."""
    P.check_template(tokenizer, name, key)
    eos = tokenizer.eos_token_id
    prefix = P.special_prefix(name, tokenizer)
    lead = P.response_lead(name)
    if name in ("raw", "inst"):
        if eos is None:
            raise ConfigError(f"{key}={name}: the tokenizer has no eos token to end the response")
        return Template(name, tokenizer, lead, " ", prefix, (eos,))
    if name == "llama3":
        return Template(name, tokenizer, lead, " ", prefix, (P.single_id(tokenizer, "<|eot_id|>"),))
    end_text = _chat_end_text(tokenizer)
    end_ids = tuple(tokenizer(end_text, add_special_tokens=False)["input_ids"]) if end_text else ()
    if not end_ids:
        if eos is None:
            raise ConfigError(f"{key}=chat_template: cannot find the end-of-turn token")
        end_ids = (eos,)
    return Template(name, tokenizer, lead, " ", prefix, end_ids)
