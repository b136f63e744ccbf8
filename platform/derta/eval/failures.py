"""Rows that produce no generation, counted instead of lost: prompts longer than the engine's
context (skipped before generation, for every engine) and rows whose inference failed (vLLM via
ray.data.llm with should_continue_on_error). Both stay in generations.jsonl with an `error` field
and no verdict, are left out of ASR and helpfulness, and are counted in metrics.json
("too_long", "failed_rows"). Failed rows never enter the resume file, so a resume retries them."""

from __future__ import annotations

from typing import Any, Callable

TOO_LONG = "prompt too long"


def context_limit(model: str, max_model_len: int | None) -> int | None:
    """eval.max_model_len, else the model's max_position_embeddings (None when unknown)."""
    if max_model_len:
        return int(max_model_len)
    from derta.eval.engines import split_model_ref
    from derta.preflight import _context_length

    try:
        from transformers import AutoConfig

        return _context_length(AutoConfig.from_pretrained(split_model_ref(model)[0]))
    except (OSError, ValueError):
        return None


def split_too_long(items: list[Any], tokenizer: Any, limit: int | None,
                   row_of: Callable[[Any], dict[str, Any]]) -> tuple[list[Any], list[list[int]], list[dict[str, Any]]]:
    """(items that fit, their prompt ids, error rows for those that do not): a prompt fits when its
    ids plus max_new_tokens stay within the engine's context (vLLM would refuse it mid-batch, HF
    would run past its position table)."""
    from derta.eval.engines import render_prompt_ids

    keep, ids, too_long = [], [], []
    for it in items:
        p = render_prompt_ids(tokenizer, it.request)
        need = len(p) + it.request.max_new_tokens
        if limit is not None and need > limit:
            too_long.append({**row_of(it), "response": "", "unsafe": None, "refusal_pos": None, "judge": None,
                             "error": f"{TOO_LONG}: {len(p)} prompt + {it.request.max_new_tokens} new tokens > {limit}"})
        else:
            keep.append(it)
            ids.append(p)
    return keep, ids, too_long


def failure_counts(rows: list[dict[str, Any]], limit: int | None) -> dict[str, Any]:
    """metrics.json "too_long" (prompts skipped: longer than the context) and "failed_rows" (rows
    whose inference failed: ray.data.llm's should_continue_on_error), per attack, with examples."""
    long_rows = [r for r in rows if str(r.get("error", "")).startswith(TOO_LONG)]
    bad = [r for r in rows if r.get("error") and r not in long_rows]

    def count(rs: list[dict[str, Any]]) -> dict[str, Any]:
        by: dict[str, int] = {}
        for r in rs:
            by[str(r.get("attack"))] = by.get(str(r.get("attack")), 0) + 1
        return {"n": len(rs), "by_attack": by}

    return {"too_long": {**count(long_rows), "context": limit},
            "failed_rows": {**count(bad), "examples": [str(r["error"])[:300] for r in bad[:3]]}}
