"""Attacks: each module turns plain harmful questions into attack prompts (`build`) and reads
pre-built prompt files in the paper's format (`from_prompt_file`, one {"question": ...} per line).

Every attack exposes the same three names:
    NAME                                         the attack's name in eval.attacks
    build(questions, cfg, renderer)              -> list[AttackPrompt]
    from_prompt_file(path, cfg, renderer)        -> list[AttackPrompt]
`cfg` is the EvalConfig (an ExperimentConfig is accepted too); `renderer` is the evaluated model's
derta.prompts.Renderer (the run's training template unless eval.template says otherwise), so
every user turn is rendered exactly as training rendered prompts. The plain question is kept on
every prompt, because judges check relevance against it, not against the attack wrapper.
PAIR is iterative (attacker + target + judge): its module adds `run(...)`, see pair.py.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any

from derta.config import ConfigError, EvalConfig, SourceConfig
from derta.eval.engines import GenRequest


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    harmful: str | None = None  # a harmful response (needed by prefill)
    source: str = ""


@dataclass
class AttackPrompt:
    attack: str
    qid: str
    question: str  # the plain harmful question (judges check relevance against it)
    request: GenRequest
    k: int | None = None  # prefill length in tokens (prefill attack only)
    prefill: str | None = None  # the prefilled text, for the record
    reference: str | None = None  # a known harmful answer (the prefill's source): the reference judge
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Stable id of this prompt (resume skips keys already generated)."""
        return f"{self.attack}|{self.qid}|{'' if self.k is None else self.k}"


def eval_cfg(cfg: Any) -> EvalConfig:
    return cfg.eval if hasattr(cfg, "eval") else cfg


def chat_request(text: str, cfg: Any, renderer: Any, **kw: Any) -> GenRequest:
    """`text` as the user turn, rendered with the model's template (derta.prompts.Renderer)."""
    if renderer is None:
        raise ValueError("attack prompts need the model's renderer (derta.prompts.Renderer) to render the user turn")
    e = eval_cfg(cfg)
    return GenRequest(
        prompt_ids=renderer.prompt_ids(text), user=text, max_new_tokens=e.max_new_tokens, temperature=e.temperature,
        seed=e.seed, **kw,
    )


def raw_request(text: str, cfg: Any) -> GenRequest:
    e = eval_cfg(cfg)
    return GenRequest(prompt=text, max_new_tokens=e.max_new_tokens, temperature=e.temperature, seed=e.seed)


# --------------------------------------------------------------------------- reading files
def read_rows(uri: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs from JSONL, a JSON list, CSV or Parquet (local or s3://).
    Bad lines raise ConfigError naming file:line."""
    from derta import storage

    if not storage.exists(uri):
        raise ConfigError(f"{uri}: file not found")
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        return [(i + 1, r) for i, r in enumerate(table.to_pylist())]
    text = storage.read_text(uri)
    if uri.endswith(".csv"):
        return [(i + 2, dict(r)) for i, r in enumerate(csv.DictReader(io.StringIO(text)))]
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{uri}:{e.lineno}: invalid JSON: {e.msg}") from None
        return [(i + 1, r) for i, r in enumerate(rows)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{uri}:{n}: invalid JSON: {e.msg}") from None
    return out


QUESTION_KEYS = ("question", "query", "prompt", "instruction", "goal", "behavior")


def read_prompt_file(uri: str) -> list[tuple[int, str]]:
    """The paper's prompt files: one {"question": PROMPT} per line -> (line, prompt)."""
    out = []
    for n, row in read_rows(uri):
        if isinstance(row, str):
            out.append((n, row))
            continue
        if not isinstance(row, dict):
            raise ConfigError(f"{uri}:{n}: expected an object with a 'question' field")
        text = next((row[k] for k in QUESTION_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
        if text is None:
            raise ConfigError(f"{uri}:{n}: no 'question' field (one of {', '.join(QUESTION_KEYS)})")
        out.append((n, text))
    if not out:
        raise ConfigError(f"{uri}: no prompts")
    return out


def load_questions(source: SourceConfig | None, limit: int | None = None) -> list[Question]:
    """eval.questions -> Questions. builtin:demo is the held-out synthetic safety triples."""
    if source is None:
        return []
    if source.uri == "builtin:demo":
        from derta.demo import safety_triples

        qs = [Question(f"demo:{i}", t.query, t.harmful, "builtin:demo") for i, t in enumerate(safety_triples("heldout"))]
    else:
        qs = []
        qkey, hkey = source.fields.query, source.fields.harmful
        for n, row in read_rows(source.uri):
            if not isinstance(row, dict):
                raise ConfigError(f"{source.uri}:{n}: expected an object")
            q = row.get(qkey)
            if q is None:
                q = next((row[k] for k in QUESTION_KEYS if isinstance(row.get(k), str)), None)
            if not isinstance(q, str) or not q.strip():
                raise ConfigError(f"{source.uri}:{n}: field '{qkey}' (eval.questions.fields.query) missing or empty")
            h = row.get(hkey)
            qs.append(Question(f"q:{n}", q.strip(), h if isinstance(h, str) and h.strip() else None, source.uri))
        if source.limit:
            qs = qs[: source.limit]
    return qs[:limit] if limit else qs


def file_prompts(attack: str, uri: str, cfg: Any, renderer: Any = None, *, raw: bool = False, goal=None) -> list[AttackPrompt]:
    """AttackPrompts from a prompt file; `goal(prompt)` recovers the plain question if it can."""
    e = eval_cfg(cfg)
    rows = read_prompt_file(uri)
    if e.limit:
        rows = rows[: e.limit]
    out = []
    for n, text in rows:
        req = raw_request(text, cfg) if raw else chat_request(text, cfg, renderer)
        q = (goal(text) if goal else None) or text
        out.append(AttackPrompt(attack, f"file:{n}", q, req, meta={"file": uri}))
    return out


# --------------------------------------------------------------------------- registry
ATTACK_NAMES = ("prefill", "completion", "codeattack", "jailbreakchat", "selfcipher", "direct", "pair", "autodan")


def get_attack(name: str):
    """The attack's module (raises ConfigError for unknown names)."""
    import importlib

    if name not in ATTACK_NAMES:
        raise ConfigError(f"eval.attacks: unknown attack {name!r} (known: {', '.join(ATTACK_NAMES)})")
    return importlib.import_module(f"derta.eval.attacks.{name}")
