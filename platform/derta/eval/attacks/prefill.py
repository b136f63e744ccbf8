"""Harmful prefill: the assistant turn starts with the first k tokens of a harmful response and
the model continues from there. The attack DeRTa targets most directly (RTO teaches a refusal at
every position of a harmful response), swept over k in eval.prefill_k.

With a tokenizer (the runner always passes the target model's) the prefill is exactly the first k
token ids of the harmful response, appended after the template's assistant header, so nothing is
re-tokenised at the seam. Without one, k counts whitespace words and the prefill is text.
"""

from __future__ import annotations

from typing import Any

from derta.config import ConfigError
from derta.eval.attacks import AttackPrompt, Question, chat_request, eval_cfg, read_rows

NAME = "prefill"


def prefill_ids(tokenizer: Any, harmful: str, k: int) -> list[int]:
    """The first k tokens of the harmful response (k clipped to its length)."""
    return list(tokenizer.encode(harmful, add_special_tokens=False))[: max(0, k)]


def build(questions: list[Question], cfg: Any, tokenizer: Any = None) -> list[AttackPrompt]:
    e = eval_cfg(cfg)
    usable = [q for q in questions if q.harmful]
    if questions and not usable:
        raise ConfigError(
            "eval.attacks=prefill needs harmful responses: set eval.questions.fields.harmful to a field "
            "holding one (builtin:demo has them)"
        )
    out = []
    for q in usable:
        for k in e.prefill_k:
            if k <= 0:
                out.append(AttackPrompt(NAME, q.id, q.question, chat_request(q.question, e), k=0, prefill=""))
                continue
            if tokenizer is not None:
                ids = prefill_ids(tokenizer, q.harmful, k)
                text = tokenizer.decode(ids)
                req = chat_request(q.question, e, prefill_ids=ids)
            else:
                text = " ".join(q.harmful.split()[:k])
                req = chat_request(q.question, e, prefill_text=text)
            out.append(AttackPrompt(NAME, q.id, q.question, req, k=k, prefill=text))
    return out


def from_prompt_file(uri: str, cfg: Any, tokenizer: Any = None) -> list[AttackPrompt]:
    """A JSONL of {"question": ..., "harmful": ...} (or "response"/"prefill" for the harmful text)."""
    qs = []
    for n, row in read_rows(uri):
        harmful = next((row.get(k) for k in ("harmful", "response", "prefill", "target") if isinstance(row, dict) and row.get(k)), None)
        q = row.get("question") if isinstance(row, dict) else None
        if not isinstance(q, str) or not isinstance(harmful, str):
            raise ConfigError(f"{uri}:{n}: prefill prompt files need 'question' and 'harmful' fields")
        qs.append(Question(f"file:{n}", q, harmful, uri))
    e = eval_cfg(cfg)
    return build(qs[: e.limit] if e.limit else qs, cfg, tokenizer)
