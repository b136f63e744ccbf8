"""Prompt templates: how (query, response) becomes token ids.

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

from derta.config import ConfigError

TEMPLATES = ("raw", "inst", "chat_template", "llama3")

INST_PROMPT = "[INST] {q} [\\INST]"
LLAMA3_PROMPT = "<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
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
        if self.name == "raw":
            return [q + "\n" for q in queries]
        if self.name == "inst":
            return [INST_PROMPT.format(q=q) for q in queries]
        if self.name == "llama3":
            return [LLAMA3_PROMPT.format(q=q) for q in queries]
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in queries
        ]

    def prompt_ids(self, queries: Sequence[str]) -> list[list[int]]:
        texts = self.prompt_texts(queries)
        enc = self.encode(texts)
        return [list(self.prefix_ids) + ids for ids in enc]

    # ------------------------------------------------------------------ responses
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Plain ids of each text, no special tokens added (batched: one Rust call)."""
        if not texts:
            return []
        return [list(x) for x in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

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


def _special_prefix(tokenizer) -> tuple[int, ...]:
    """The ids the tokenizer adds in front of text by itself (BOS for Llama-3, often none)."""
    with_sp = list(tokenizer("a")["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for i in range(len(with_sp) - len(without) + 1):
        if with_sp[i : i + len(without)] == without:
            return tuple(with_sp[:i])
    return ()


def _single_id(tokenizer, token: str) -> int | None:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _chat_end_text(tokenizer) -> str:
    """What the chat template writes after an assistant message (e.g. '<|eot_id|>')."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    i = full.rfind(_PROBE)
    return full[i + len(_PROBE):] if i >= 0 else ""


def make_template(name: str, tokenizer) -> Template:
    """Bind a template to a tokenizer; ConfigError when the tokenizer cannot support it."""
    if name not in TEMPLATES:
        raise ConfigError(f"data.template: unknown template {name!r} (one of {', '.join(TEMPLATES)})")
    eos = tokenizer.eos_token_id
    if name in ("raw", "inst"):
        if eos is None:
            raise ConfigError(f"data.template={name}: the tokenizer has no eos token to end the response")
        return Template(name, tokenizer, " " if name == "inst" else "", " ", _special_prefix(tokenizer), (eos,))
    if name == "llama3":
        missing = [t for t in LLAMA3_SPECIALS if _single_id(tokenizer, t) is None]
        if missing:
            raise ConfigError(
                f"data.template=llama3: the tokenizer lacks the Llama-3 special tokens {missing}; "
                "use data.template=chat_template (the tokenizer's own) or inst"
            )
        bos = _single_id(tokenizer, "<|begin_of_text|>")
        return Template(name, tokenizer, "", " ", (bos,), (_single_id(tokenizer, "<|eot_id|>"),))
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.template=chat_template: the tokenizer has no chat template; use inst or llama3")
    end_text = _chat_end_text(tokenizer)
    end_ids = tuple(tokenizer(end_text, add_special_tokens=False)["input_ids"]) if end_text else ()
    if not end_ids:
        if eos is None:
            raise ConfigError("data.template=chat_template: cannot find the end-of-turn token")
        end_ids = (eos,)
    return Template(name, tokenizer, "", " ", (), end_ids)
