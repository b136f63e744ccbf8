"""Training rows for the training-stage tests, built by hand in the sample-row format of docs/ARCHITECTURE.md
(input_ids, labels, rto_mask, position_ids; fixed length), so these tests do not depend on
the data stage."""

from __future__ import annotations

import random


def _prompt_ids(tokenizer, query: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def sample(tokenizer, kind: str, query: str, response: str) -> dict:
    """One transition sample: helpful/vanilla (MLE on the response) or rto (refusal target at
    every response position, no MLE)."""
    p = list(_prompt_ids(tokenizer, query))
    if isinstance(p[0], list):
        p = p[0]
    r = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = p + r
    if kind == "rto":
        labels = [-100] * len(ids)
        rto = [False] * len(p) + [True] * (len(r) - 1) + [False]
    else:
        labels = [-100] * len(p) + r
        rto = [False] * len(ids)
    return {"input_ids": ids, "labels": labels, "rto_mask": rto}


def demo_samples(tokenizer, n_helpful: int = 16, n_rto: int = 16, n_vanilla: int = 0, seed: int = 0) -> list[dict]:
    from derta.demo import helpful_pairs, safety_triples

    help_ = helpful_pairs("train", seed)
    safe = safety_triples("train", seed)
    out = [sample(tokenizer, "helpful", h.query, h.response) for h in help_[:n_helpful]]
    out += [sample(tokenizer, "rto", s.query, s.harmful) for s in safe[:n_rto]]
    out += [sample(tokenizer, "vanilla", s.query, s.safe) for s in safe[n_rto:n_rto + n_vanilla]]
    random.Random(seed).shuffle(out)
    return out


def to_rows(samples: list[dict], max_len: int, pad_id: int, packing: bool = False) -> list[dict]:
    """Fixed-length rows: packed (greedy, in order) or one sample per row; truncated to fit."""
    rows, cur = [], {"input_ids": [], "labels": [], "rto_mask": [], "position_ids": []}

    def flush():
        n = len(cur["input_ids"])
        if n == 0:
            return
        pad = max_len - n
        rows.append({
            "input_ids": cur["input_ids"] + [pad_id] * pad,
            "labels": cur["labels"] + [-100] * pad,
            "rto_mask": cur["rto_mask"] + [False] * pad,
            "position_ids": cur["position_ids"] + list(range(pad)),
        })
        for v in cur.values():
            v.clear()

    for s in samples:
        n = min(len(s["input_ids"]), max_len)
        if not packing or len(cur["input_ids"]) + n > max_len:
            flush()
        cur["input_ids"] += s["input_ids"][:n]
        cur["labels"] += s["labels"][:n]
        cur["rto_mask"] += s["rto_mask"][:n]
        cur["position_ids"] += list(range(n))
    flush()
    return rows
