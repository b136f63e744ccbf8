"""Direct: the plain harmful question as the user turn (the no-attack baseline)."""

from __future__ import annotations

from typing import Any

from derta.eval.attacks import AttackPrompt, Question, chat_request, file_prompts

NAME = "direct"


def build(questions: list[Question], cfg: Any, renderer: Any = None) -> list[AttackPrompt]:
    return [AttackPrompt(NAME, q.id, q.question, chat_request(q.question, cfg, renderer)) for q in questions]


def from_prompt_file(uri: str, cfg: Any, renderer: Any = None) -> list[AttackPrompt]:
    return file_prompts(NAME, uri, cfg, renderer)
