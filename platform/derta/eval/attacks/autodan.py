"""AutoDAN (hierarchical genetic search over jailbreak prompts, paper Table 2) has its place here
but is not implemented yet: selecting it fails fast with a ConfigError instead of silently
reporting nothing. Pre-built AutoDAN prompts can still be evaluated with
eval.prompt_files.direct (they are plain user turns).

A full version would: start from a population of role-play templates, score each by the target's
loss on "Sure, here is", evolve with sentence/paragraph-level crossover and LLM mutation, and stop
on a judged jailbreak; the Engine interface (engines.py) and judges.py supply all it needs.
"""

from __future__ import annotations

from typing import Any

from derta.config import ConfigError

NAME = "autodan"
IMPLEMENTED = False  # the preflight refuses it at config load
MESSAGE = (
    "eval.attacks: autodan is not implemented yet; remove it from eval.attacks "
    "(pre-built AutoDAN prompts can be run with eval.prompt_files.direct)"
)


def build(questions: list, cfg: Any, renderer: Any = None) -> list:
    raise ConfigError(MESSAGE)


def from_prompt_file(uri: str, cfg: Any, renderer: Any = None) -> list:
    raise ConfigError(MESSAGE)
