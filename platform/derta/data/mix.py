"""How many samples of each kind, and which rows make them (data.mix). Pure.

Presets set the safety kinds, as fractions of the (non-held-out) safety triples; mix.helpful
(count or ratio of helpful pairs) applies to every preset:
  sft         helpful only
  vanilla     every triple -> vanilla (q -> safe)
  recaug      every triple -> harmful-prefix sample
  rto         every triple -> rto sample
  derta       half the triples -> rto, the other half -> harmful-prefix samples
  derta_pref  like derta with pref rows instead of rto rows
  auto        the preset named by train.method;  custom: the numbers in data.mix as given
data.mix.triples picks how the safety kinds share the triples:
  disjoint (default)  the kinds split them: derta gives half to rto, half to prefix, so every
                      preset trains on the same number of safety samples (N) and they compare
                      at equal data
  shared              every kind draws from all the triples, from the same rows: the public
                      recipe (data/train/generate_training_data.py of the paper's code), where
                      each of 3K triples makes one rto AND one harmful-prefix sample (3K + 3K);
                      a preset's fractions become 1.0 each
Which rows: each row gets u = hash(data.seed, source_id) in [0, 1); rows are ranked by u.
Disjoint kinds take consecutive rank ranges [start, start + count) (wrapping around when the
counts add up to more than N, so kinds overlap only when they must); shared kinds all start at
rank 0 (a count of 3000 of each takes the same 3000 rows). Counts are exact, the choice is
deterministic for a seed and independent of partitioning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from derta.config import MixConfig

SAFETY_ORDER = ("rto", "pref", "prefix", "vanilla")
PRESETS: dict[str, dict[str, float]] = {
    "sft": {},
    "vanilla": {"vanilla": 1.0},
    "recaug": {"prefix": 1.0},
    "rto": {"rto": 1.0},
    "derta": {"rto": 0.5, "prefix": 0.5},
    "derta_pref": {"pref": 0.5, "prefix": 0.5},
}


def resolve_mix(mix: MixConfig, method: str) -> tuple[str, dict[str, int | float]]:
    """(preset name, amount per kind); the preset wins over the numbers except helpful."""
    preset = method if mix.preset == "auto" else mix.preset
    if preset == "custom":
        amounts = {k: getattr(mix, k) for k in SAFETY_ORDER}
    else:
        amounts = dict.fromkeys(SAFETY_ORDER, 0)
        amounts.update({k: 1.0 if mix.triples == "shared" else v for k, v in PRESETS[preset].items()})
    amounts["helpful"] = mix.helpful
    return preset, amounts


def to_count(amount: int | float, n: int) -> tuple[int, str | None]:
    """A count (int) or ratio (float) of n rows -> (count, warning if clamped)."""
    if isinstance(amount, float):
        return int(np.floor(amount * n + 0.5)), None
    if amount > n:
        return n, f"asked for {amount} but only {n} rows are available"
    return int(amount), None


@dataclass
class KindPlan:
    """Rank ranges for the kinds drawn from one set of rows."""

    n: int
    ranges: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, start, count)
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: c for k, _, c in self.ranges}

    def kinds_at(self, rank: int) -> list[str]:
        out = []
        for kind, start, count in self.ranges:
            if count and (rank - start) % self.n < count:
                out.append(kind)
        return out


def plan_kinds(amounts: dict[str, int | float], kinds: tuple[str, ...], n: int, shared: bool = False) -> KindPlan:
    """Lay the kinds' counts out consecutively over the n ranks (shared: each from rank 0)."""
    plan = KindPlan(n=n)
    counts = []
    for kind in kinds:
        c, warn = to_count(amounts.get(kind, 0), n)
        if warn:
            plan.warnings.append(f"data.mix.{kind}: {warn}")
        counts.append([kind, c])
    ratios = [amounts.get(k, 0) for k in kinds if isinstance(amounts.get(k, 0), float)]
    total = sum(c for _, c in counts)
    if not shared and ratios and all(isinstance(amounts.get(k, 0), float) for k, c in counts if c) and sum(ratios) <= 1 + 1e-9 and total > n:
        for item in reversed(counts):  # rounding pushed disjoint ratios past n: give it back
            cut = min(item[1], total - n)
            item[1] -= cut
            total -= cut
    start = 0
    for kind, c in counts:
        if c:
            plan.ranges.append((kind, start % max(n, 1), c))
            start += 0 if shared else c
    return plan


def ranks(sorted_u: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Rank of each u among the eligible rows' sorted u values."""
    return np.searchsorted(sorted_u, u, side="left")
