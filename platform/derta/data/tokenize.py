"""Records -> token-id samples (with truncation), and samples -> fixed-length training rows.

Truncation (data.truncation) never drops the trained span silently:
  trim_prefix  prefix rows: shorten the harmful prefix until the row fits; rto/pref rows: cut
               the harmful response's tail (fewer rto positions, never zero); helpful/vanilla
               rows, and prefix rows whose prompt + safe response alone exceed max_len: skipped
  skip         any row longer than max_len is skipped
Every trim and skip is counted (manifest: trimmed / skipped["too_long:<kind>"]).

Packing (pack_rows): greedy first-fit of samples into rows of max_len tokens; position_ids
restart at 0 at each sample, and the padding tail is its own document (pad ids, labels -100,
rto_mask false, positions 0..n). A sample's first token is always a prompt token (label -100,
rto_mask false), so no loss term ever crosses a document boundary.

Batches in samples (pack_steps): train.global_batch counts SAMPLES, packed or not. The sample
stream is cut into groups of global_batch samples (one optimizer step each, the last one the
rest) and each group is packed into rows on its own; a step's rows are padded with empty rows
to a multiple of workers · micro_batch. Packing changes how samples lie in rows, never how
many samples make a step.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np

from derta.config import DataConfig
from derta.data import transitions as T
from derta.data.prefix import prefix_tokens
from derta.data.templates import Template

TRAIN_COLUMNS = ("input_ids", "labels", "rto_mask", "position_ids")


# --------------------------------------------------------------------------- fitting
def fit_prefix(n_prompt: int, k: int, n_target: int, n_end: int, max_len: int, policy: str) -> int | None:
    """The harmful-prefix length that fits (k or less), or None when the row must be skipped."""
    room = max_len - n_prompt - n_target - n_end
    if room >= k:
        return k
    if policy == "skip" or room < 0:
        return None
    return room


def fit_rto(n_prompt: int, n_harmful: int, max_len: int, policy: str) -> int | None:
    """How many harmful tokens an rto/pref row keeps (>= 1), or None to skip it."""
    room = max_len - n_prompt
    if room >= n_harmful:
        return n_harmful
    if policy == "skip" or room < 1:
        return None
    return room


# --------------------------------------------------------------------------- building
class SampleBuilder:
    """Turns normalized records into samples for one template (tokenizer bound once).

    A record: {"source_id", "query", "kinds": [...], and per kind its texts:
    "response" (helpful), "safe" (vanilla / prefix), "harmful" (prefix / rto / pref),
    "prefix_all": True when "harmful" *is* the prefix (pre-built rows: keep all of it)}.
    """

    def __init__(self, template: Template, data: DataConfig):
        self.t = template
        self.data = data

    def build(self, records: Sequence[dict]) -> tuple[list[T.Sample], Counter]:
        t, data = self.t, self.data
        skips: Counter = Counter()
        jobs = [(r, kind) for r in records for kind in r["kinds"]]
        if not jobs:
            return [], skips
        prompts = dict(zip(
            [id(r) for r in records], t.prompt_ids([r["query"] for r in records])
        ))
        # harmful texts (with word boundaries for unit=word), once per record
        need_harm = [r for r in records if any(k in ("prefix", "rto", "pref") for k in r["kinds"]) and r.get("harmful")]
        harm = dict(zip([id(r) for r in need_harm], t.encode_with_word_ends([r["harmful"] for r in need_harm], t.lead)))
        # prefix lengths decide the lead of the safe response ("" first, " " after a prefix)
        ks: dict[int, int] = {}
        for r in records:
            if "prefix" in r["kinds"]:
                ids, word_ends = harm.get(id(r), ([], []))
                if r.get("prefix_all"):
                    ks[id(r)] = len(ids)
                else:
                    ks[id(r)] = prefix_tokens(data.prefix, data.seed, r["source_id"], len(ids), word_ends)
        texts: list[str] = []
        keys: list[tuple[int, str]] = []
        for r, kind in jobs:
            if kind == "helpful":
                texts.append(t.lead + r["response"])
            elif kind == "vanilla" or (kind == "prefix" and ks[id(r)] == 0):
                texts.append(t.lead + r["safe"])
            elif kind == "prefix":
                texts.append(t.sep + r["safe"])
            else:
                continue
            keys.append((id(r), kind))
        targets = dict(zip(keys, t.encode(texts)))

        end = list(t.end_ids)
        out: list[T.Sample] = []
        L, policy = data.max_len, data.truncation
        for r, kind in jobs:
            sid, prompt = r["source_id"], prompts[id(r)]
            if kind in ("helpful", "vanilla"):
                target = targets[(id(r), kind)]
                if len(prompt) + len(target) + len(end) > L:
                    skips[f"too_long:{kind}"] += 1
                    continue
                fn = T.helpful if kind == "helpful" else T.vanilla
                out.append(fn(prompt, target, end, sid))
            elif kind == "prefix":
                ids = harm.get(id(r), ([], []))[0]
                k = ks[id(r)]
                target = targets[(id(r), kind)]
                k2 = fit_prefix(len(prompt), k, len(target), len(end), L, policy)
                if k > 0 and not k2 and policy != "skip" and t.lead != t.sep:
                    # the whole prefix goes: the safe response now starts the turn (no sep)
                    target = t.encode([t.lead + r["safe"]])[0]
                    k2 = fit_prefix(len(prompt), 0, len(target), len(end), L, policy)
                if k2 is None:
                    skips[f"too_long:{kind}"] += 1
                    continue
                s = T.prefix(prompt, ids[:k2], target, end, sid)
                s.trimmed = k2 != k
                out.append(s)
            elif kind in T.RTO_KINDS:
                ids = harm.get(id(r), ([], []))[0]
                if not ids:
                    skips[f"empty_harmful:{kind}"] += 1
                    continue
                n = fit_rto(len(prompt), len(ids), L, policy)
                if n is None:
                    skips[f"too_long:{kind}"] += 1
                    continue
                s = T.rto(prompt, ids[:n], sid, kind=kind)
                s.trimmed = n != len(ids)
                out.append(s)
            else:
                raise ValueError(f"unknown sample kind {kind!r}")
        return out, skips


# --------------------------------------------------------------------------- training rows
def _empty_rows(n: int, L: int, pad_id: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.full((n, L), pad_id, dtype=np.int64),
        "labels": np.full((n, L), T.IGNORE, dtype=np.int64),
        "rto_mask": np.zeros((n, L), dtype=bool),
        "position_ids": np.zeros((n, L), dtype=np.int64),
    }


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit bin packing: sample indices per row, in input order within a row."""
    remaining = np.empty(0, dtype=np.int64)
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens > max_len {capacity}")
        fits = np.nonzero(remaining >= n)[0]
        if fits.size:
            b = int(fits[0])
            remaining[b] -= n
            bins[b].append(i)
        else:
            remaining = np.append(remaining, capacity - n)
            bins.append([i])
    return bins


def pack_rows(samples: Sequence[dict], max_len: int, pad_id: int, packing: bool = True) -> dict[str, np.ndarray]:
    """Samples ({input_ids, labels, rto_mask}) -> fixed-length rows (see module doc)."""
    lengths = [len(s["input_ids"]) for s in samples]
    groups = first_fit(lengths, max_len) if packing else [[i] for i in range(len(samples))]
    rows = _empty_rows(len(groups), max_len, pad_id)
    for r, group in enumerate(groups):
        pos = 0
        for i in group:
            s, n = samples[i], lengths[i]
            if n > max_len:
                raise ValueError(f"sample has {n} tokens > max_len {max_len}")
            rows["input_ids"][r, pos : pos + n] = s["input_ids"]
            rows["labels"][r, pos : pos + n] = s["labels"]
            rows["rto_mask"][r, pos : pos + n] = s["rto_mask"]
            rows["position_ids"][r, pos : pos + n] = np.arange(n)
            pos += n
        rows["position_ids"][r, pos:] = np.arange(max_len - pos)
    return rows


def with_rto_end(sample: dict, end_ids: Sequence[int], max_len: int) -> dict:
    """An rto sample with the end-of-turn ids appended as RTO targets (labels -100, rto_mask
    true), as the public code labels its RTO rows (the response + "<|end_of_text|>", every
    labelled position -> "Sorry"): the last target is then log P(sorry | q, the whole r̂).
    A sample that would pass max_len stays as it is (the public code's truncation drops the
    end token too)."""
    n, k = len(sample["input_ids"]), len(end_ids)
    if not k or n + k > max_len:
        return sample
    return {
        "input_ids": np.concatenate([np.asarray(sample["input_ids"], dtype=np.int64), np.asarray(end_ids, dtype=np.int64)]),
        "labels": np.concatenate([np.asarray(sample["labels"], dtype=np.int64), np.full(k, T.IGNORE, dtype=np.int64)]),
        "rto_mask": np.concatenate([np.asarray(sample["rto_mask"], dtype=bool), np.ones(k, dtype=bool)]),
    }


def unpack_rows(rows: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Training rows -> their samples, in row order: each document of a row (position_ids
    restart at 0) that carries a target (a label or an rto_mask position); padding documents
    are dropped. The inverse of pack_rows up to the padding."""
    out = []
    for r in range(len(rows["input_ids"])):
        pos = np.asarray(rows["position_ids"][r])
        starts = [0] + (np.flatnonzero(np.diff(pos) != 1) + 1).tolist() + [len(pos)]
        for a, b in zip(starts[:-1], starts[1:]):
            labels, rto = np.asarray(rows["labels"][r][a:b]), np.asarray(rows["rto_mask"][r][a:b], dtype=bool)
            if (labels != T.IGNORE).any() or rto.any():
                out.append({"input_ids": np.asarray(rows["input_ids"][r][a:b]), "labels": labels, "rto_mask": rto})
    return out


def step_groups(n_samples: int, global_batch: int) -> list[range]:
    """Consecutive groups of global_batch samples, one per optimizer step; the last holds the
    rest (HF Trainer with drop_last False: ceil(n / global_batch) steps per epoch)."""
    return [range(a, min(a + global_batch, n_samples)) for a in range(0, n_samples, global_batch)]


def pack_steps(samples: Sequence[dict], global_batch: int, max_len: int, pad_id: int, packing: bool,
               multiple: int) -> tuple[dict[str, np.ndarray], list[int]]:
    """Samples (in training order) -> (rows, rows per step). Each step's samples are packed into
    rows on their own (a row never mixes two steps), and the step's row count is padded with
    empty rows (labels -100, no rto_mask) to a multiple of `multiple` (workers · micro_batch),
    so every worker runs the same number of micro-batches in every step."""
    parts, per_step = [], []
    for g in step_groups(len(samples), global_batch):
        rows = pack_rows([samples[i] for i in g], max_len, pad_id, packing)
        n = len(rows["input_ids"])
        extra = -n % multiple
        if extra:
            empty = _empty_rows(extra, max_len, pad_id)
            empty["position_ids"][:] = np.arange(max_len)
            rows = {k: np.concatenate([rows[k], empty[k]]) for k in TRAIN_COLUMNS}
        parts.append(rows)
        per_step.append(n + extra)
    if not parts:
        return _empty_rows(0, max_len, pad_id), []
    return {k: np.concatenate([p[k] for p in parts]) for k in TRAIN_COLUMNS}, per_step


def worker_rows(per_step: Sequence[int], world: int) -> list[list[int]]:
    """Row indices of each worker, step by step: row j of a step goes to worker j % world, so a
    worker's shard holds rows_in_step / world rows of every step, in step order."""
    out: list[list[int]] = [[] for _ in range(world)]
    start = 0
    for n in per_step:
        for j in range(n):
            out[j % world].append(start + j)
        start += n
    return out


def iter_samples(batch: dict[str, Any]) -> Iterable[dict]:
    """Columns of a Ray Data batch -> per-sample dicts (lists or numpy arrays inside)."""
    n = len(batch["input_ids"])
    for i in range(n):
        yield {"input_ids": batch["input_ids"][i], "labels": batch["labels"][i], "rto_mask": batch["rto_mask"][i]}
