"""`derta judge --input FILE [--output PATH]`: judge existing responses without generating any.

Accepted input (one item per line, or one JSON array of items):
* {"question": ..., "response": ...} objects (also "instruction"/"prompt"/"goal" for the question and
  "output"/"completion"/"generation" for the response: the paper's released result objects);
* a JSON string per line holding prompt + response together, as in the paper's released results:
  "[INST] q [\\INST] answer", a Llama-3 transcript, a CompletingAttack sentence followed by its
  continuation ("... Step 1:<continuation>"), or a PAIR summary ("Goal: ... Example Jailbreak
  RESPONSE: ..." / "No jailbreaks achieved.").
Attack-wrapped questions (CodeAttack stacks, SelfCipher demonstrations) are unwrapped to the plain
question for the relevance check. Items with a "reference" (or "harmful") field, a known harmful
answer, are judged by the reference judge (derta.eval.reference_judge). Bad lines raise ConfigError naming file:line.
"""

from __future__ import annotations

import json
import re
from typing import Any

from derta import storage
from derta.config import ConfigError
from derta.eval.judges import JudgeInput, RefusalJudge, make_judge
from derta.eval.metrics import refusal_position_stats
from derta.eval.reference_judge import ReferenceJudge

Q_KEYS = ("question", "instruction", "prompt", "goal", "input", "query")
R_KEYS = ("response", "output", "completion", "generation", "answer")
REF_KEYS = ("reference", "harmful", "harmful_response")  # a known harmful answer (reference judge)

_INST_END = re.compile(r"\[(?:/|\\)INST\]")
_LLAMA3_ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>"


def split_combined(text: str) -> tuple[str, str]:
    """A released-results string -> (prompt, response)."""
    if "FINAL SUMMARY STATISTICS" in text:
        goal = re.search(r"^Goal:\s*(.*)$", text, flags=re.M)
        q = goal.group(1).strip() if goal else ""
        m = re.search(r"Example Jailbreak RESPONSE:\s*(.*)", text, flags=re.S)
        return q, (m.group(1).strip() if m else "")
    m = _INST_END.search(text)
    if m:
        return re.sub(r"^\s*\[INST\]", "", text[: m.start()]).strip(), text[m.end():].strip()
    if _LLAMA3_ASSISTANT in text:
        head, _, tail = text.rpartition(_LLAMA3_ASSISTANT)
        return head, tail.replace("<|eot_id|>", "").strip()
    m = re.search(r"Step 1:", text)
    if m and m.start() < 1000:
        return text[: m.end()].strip(), text[m.end():]
    return "", text


def plain_question(prompt: str) -> str:
    """Unwrap known attack templates to the question inside (else the prompt itself)."""
    from derta.eval.attacks import codeattack, selfcipher

    return codeattack.decode(prompt) or selfcipher.goal(prompt) or prompt


def read_items(uri: str) -> list[tuple[int, dict[str, Any], str, str]]:
    """(line, original fields, question/prompt, response) for every item of the file."""
    if not storage.exists(uri):
        raise ConfigError(f"{uri}: file not found")
    if not storage.exists_file(uri):
        raise ConfigError(f"{uri}: is a directory; give one JSONL or JSON file (--input)")
    data = storage.read_bytes(uri)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{uri}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None
    stripped = text.lstrip()
    entries: list[tuple[int, Any]] = []
    if stripped.startswith("[") and not stripped.startswith("[INST"):
        try:
            entries = list(enumerate(json.loads(stripped), 1))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{uri}:{e.lineno}: invalid JSON: {e.msg}") from None
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{uri}:{n}: invalid JSON ({e.msg}); expected a {{question, response}} object or a JSON string") from None
    out = []
    for n, obj in entries:
        if isinstance(obj, str):
            prompt, response = split_combined(obj)
            out.append((n, {"text": obj}, prompt, response))
        elif isinstance(obj, dict):
            q = next((obj[k] for k in Q_KEYS if isinstance(obj.get(k), str)), None)
            r = next((obj[k] for k in R_KEYS if isinstance(obj.get(k), str)), None)
            for keys, found, what in ((R_KEYS, r, "response"), (Q_KEYS, q, "question")):
                if found is not None:
                    continue
                wrong = next((k for k in keys if k in obj and obj[k] is not None), None)
                if wrong is not None:
                    raise ConfigError(f"{uri}:{n}: field '{wrong}' must be a string, got {type(obj[wrong]).__name__}")
                raise ConfigError(f"{uri}:{n}: no {what} field (one of {', '.join(keys)})")
            out.append((n, obj, q, r))
        else:
            raise ConfigError(f"{uri}:{n}: expected a JSON object or string, got {type(obj).__name__}")
    if not out:
        raise ConfigError(f"{uri}: no items to judge")
    return out


def judge_file(input_path: str, output_path: str | None = None, judge: str = "refusal", cfg: Any = None) -> dict[str, Any]:
    """Judge every item; with output_path write one JSONL row per input (its fields + unsafe,
    unsafe_lenient, refusal_pos, judge). Returns the summary (ASR etc.)."""
    items = read_items(input_path)
    refs = [next((f[k] for k in REF_KEYS if isinstance(f.get(k), str) and f[k].strip()), "") for _, f, _, _ in items]
    if judge == "refusal":
        j = ReferenceJudge() if any(refs) else RefusalJudge()
    else:
        if cfg is None:
            raise ConfigError(f"derta judge --judge {judge}: needs --config with the eval.judge_* settings")
        j = make_judge(cfg.eval.model_copy(update={"judge": judge}))
    inputs = [JudgeInput(plain_question(q), r, prompt=q, reference=ref) for (_, _, q, r), ref in zip(items, refs)]
    results = j.judge_batch(inputs)
    rows = []
    for (_, fields, _, _), res in zip(items, results):
        rows.append({**fields, "unsafe": res.unsafe, "unsafe_lenient": res.unsafe_lenient,
                     "refusal_pos": res.refusal_pos, "judge": res.judge})
    n = len(rows)
    pos = refusal_position_stats([{"attack": "file", "refusal_pos": r["refusal_pos"]} for r in rows])
    summary = {
        "input": input_path, "output": output_path, "judge": getattr(j, "name", judge), "n": n,
        "unsafe": sum(r["unsafe"] for r in rows),
        "asr": round(100.0 * sum(r["unsafe"] for r in rows) / n, 2),
        "asr_lenient": round(100.0 * sum(r["unsafe_lenient"] for r in rows) / n, 2),
        "refusal_rate": pos["refusal_rate"], "within_first_5": pos["within_first_5"],
    }
    if output_path:
        storage.write_text(output_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    return (f"judged {s['n']} responses with the {s['judge']} judge: ASR {s['asr']:.2f}% "
            f"(lenient {s['asr_lenient']:.2f}%), refusals {s['refusal_rate']}%, "
            f"of which {s['within_first_5']}% start within the first 5 words"
            + (f"; wrote {s['output']}" if s.get("output") else ""))


def run_judge(input_path: str, output_path: str | None = None, judge: str = "refusal", cfg: Any = None) -> dict[str, Any]:
    """The CLI entry: judge, print the summary line, return the summary (ConfigError -> exit 2)."""
    summary = judge_file(input_path, output_path, judge, cfg)
    print(format_summary(summary))
    return summary
