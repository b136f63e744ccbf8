"""Harmful prefill: the assistant turn starts with the first k tokens of a harmful response and
the model continues from there. The attack DeRTa targets most directly (RTO teaches a refusal at
every position of a harmful response), swept over k in eval.prefill_k.

The prefill is exactly the first k token ids of the harmful response as the data build holds
them for harmful-prefix training rows (derta.prompts.prefill_ids: encoded with the template's
lead, " " for inst), appended after the rendered prompt, so the attack prompt for (q, harmful, k)
is the token prefix of the training row built from the same (q, harmful, k): nothing is
re-tokenised at the seam.
"""

from __future__ import annotations

from typing import Any

from derta.config import ConfigError
from derta.eval.attacks import AttackPrompt, Question, chat_request, eval_cfg, read_rows

NAME = "prefill"


def build(questions: list[Question], cfg: Any, renderer: Any = None) -> list[AttackPrompt]:
    if renderer is None:
        raise ValueError("prefill prompts need the model's renderer (derta.prompts.Renderer)")
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
                out.append(AttackPrompt(NAME, q.id, q.question, chat_request(q.question, e, renderer), k=0, prefill="",
                                       reference=q.harmful))
                continue
            ids = renderer.prefill_ids(q.harmful, k)
            req = chat_request(q.question, e, renderer, prefill_ids=ids)
            out.append(AttackPrompt(NAME, q.id, q.question, req, k=k, prefill=renderer.tokenizer.decode(ids),
                                   reference=q.harmful))
    return out


def from_prompt_file(uri: str, cfg: Any, renderer: Any = None) -> list[AttackPrompt]:
    """A JSONL of {"question": ..., "harmful": ...} (or "response"/"prefill" for the harmful text)."""
    qs = []
    for n, row in read_rows(uri):
        harmful = next((row.get(k) for k in ("harmful", "response", "prefill", "target") if isinstance(row, dict) and row.get(k)), None)
        q = row.get("question") if isinstance(row, dict) else None
        if not isinstance(q, str) or not isinstance(harmful, str):
            raise ConfigError(f"{uri}:{n}: prefill prompt files need 'question' and 'harmful' fields")
        qs.append(Question(f"file:{n}", q, harmful, uri))
    e = eval_cfg(cfg)
    return build(qs[: e.limit] if e.limit else qs, cfg, renderer)
