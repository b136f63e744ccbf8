"""Harmful-prefix length distributions (data.prefix): how many tokens of the harmful response
precede the safe response in a harmful-prefix (MLE) sample.

Every draw uses its own RNG seeded from (data.seed, source_id), so a row gets the same k no
matter how Ray Data partitions the input, which worker builds it, or what else is in the mix.

dist (k in `unit`s, n = |harmful| in units):
  public          k = 0 with probability p_zero, else k ~ U{1 .. max(1, n-2)} (the paper's code)
  uniform         k ~ U{0 .. n}
  beta            k = round(f * n), f ~ Beta(beta_a, beta_b)
  fixed_fraction  k = round(fraction * n)
  geometric       k ~ Geometric(geometric_p) - 1 on {0, 1, ...} (mean (1-p)/p), capped at n
`p_zero` applies to `public` only (the others have their own mass at 0).
unit=word draws k words and returns the token count of the first k words.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from derta.config import PrefixConfig


def row_rng(seed: int, source_id: str, salt: str = "prefix") -> random.Random:
    """A reproducible RNG for one row (independent of partitioning and process)."""
    digest = hashlib.sha256(f"{salt}\x00{seed}\x00{source_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def row_uniform(seed: int | str, source_id: str, salt: str) -> float:
    """A uniform [0, 1) number for one row (53 bits of a sha256)."""
    digest = hashlib.sha256(f"{salt}\x00{seed}\x00{source_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def draw_units(cfg: PrefixConfig, n: int, rng: random.Random) -> int:
    """k in units (0 <= k <= n) for a response n units long."""
    if n <= 0:
        return 0
    if cfg.dist == "public":
        if rng.random() < cfg.p_zero:
            return 0
        return rng.randint(1, max(1, n - 2))
    if cfg.dist == "uniform":
        return rng.randint(0, n)
    if cfg.dist == "beta":
        return min(n, max(0, round(rng.betavariate(cfg.beta_a, cfg.beta_b) * n)))
    if cfg.dist == "fixed_fraction":
        return min(n, max(0, round(cfg.fraction * n)))
    if cfg.dist == "geometric":
        k, p = 0, cfg.geometric_p
        while k < n and rng.random() >= p:
            k += 1
        return k
    raise ValueError(f"unknown prefix dist {cfg.dist!r}")


def prefix_tokens(
    cfg: PrefixConfig, seed: int, source_id: str, n_tokens: int, word_ends: Sequence[int] | None = None
) -> int:
    """The harmful-prefix length in tokens for one row.

    word_ends[k-1] = tokens covering the first k words (needed when cfg.unit == "word").
    """
    rng = row_rng(seed, source_id)
    if cfg.unit == "token":
        return draw_units(cfg, n_tokens, rng)
    if word_ends is None:
        raise ValueError("unit=word needs word_ends")
    k = draw_units(cfg, len(word_ends), rng)
    return min(n_tokens, word_ends[k - 1]) if k > 0 else 0


def histogram(lengths: Sequence[int], edges: Sequence[int] = (0, 1, 5, 10, 20, 40, 80, 160, 320, 640)) -> dict[str, int]:
    """Counts of prefix lengths per bucket: "0", "1-4", ..., "640+" (for the manifest)."""
    labels = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        labels.append(str(lo) if hi == lo + 1 else (f"{lo}-{hi - 1}" if hi is not None else f"{lo}+"))
    counts = dict.fromkeys(labels, 0)
    for x in lengths:
        idx = 0
        for i, lo in enumerate(edges):
            if x >= lo:
                idx = i
        counts[labels[idx]] += 1
    return counts
