"""The transition samples: each kind is built here and nowhere else (pure functions over ids).

Conventions (docs/ARCHITECTURE.md, sample rows): labels[t] is the MLE target for position t (HF shift inside the
model: logits[t-1] vs labels[t]), -100 where there is no MLE loss. rto_mask[t] means "the
prediction made from input_ids[:t] should be the refusal token"; it is true exactly on the
harmful-response positions of rto/pref rows, so position t = first harmful token carries the
paper's term log P(sorry | q), and t = last harmful token log P(sorry | q, r^_<|r^|).

  helpful  q -> response                       labels on response + end of turn
  vanilla  q -> safe                           labels on safe + end of turn
  prefix   q + harmful[:k] -> safe             labels on safe + end of turn only
  rto      q + harmful (no end of turn)        labels all -100; rto_mask on every harmful token
  pref     same shape as rto                   the dispreferred token at t is input_ids[t]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

IGNORE = -100
KINDS = ("helpful", "vanilla", "prefix", "rto", "pref")
MLE_KINDS = ("helpful", "vanilla", "prefix")
RTO_KINDS = ("rto", "pref")


@dataclass
class Sample:
    kind: str
    input_ids: list[int]
    labels: list[int]
    rto_mask: list[bool]
    prefix_len: int
    source_id: str
    # not part of the stored row: how the sample was shaped (for the manifest)
    trimmed: bool = field(default=False, compare=False)

    def __len__(self) -> int:
        return len(self.input_ids)

    def row(self) -> dict:
        d = asdict(self)
        d.pop("trimmed")
        return d


def _mle(kind: str, prompt: Sequence[int], prefix: Sequence[int], target: Sequence[int], end: Sequence[int], source_id: str) -> Sample:
    trained = list(target) + list(end)
    n_ctx = len(prompt) + len(prefix)
    return Sample(
        kind=kind,
        input_ids=list(prompt) + list(prefix) + trained,
        labels=[IGNORE] * n_ctx + trained,
        rto_mask=[False] * (n_ctx + len(trained)),
        prefix_len=len(prefix),
        source_id=source_id,
    )


def helpful(prompt: Sequence[int], response: Sequence[int], end: Sequence[int], source_id: str) -> Sample:
    return _mle("helpful", prompt, (), response, end, source_id)


def vanilla(prompt: Sequence[int], safe: Sequence[int], end: Sequence[int], source_id: str) -> Sample:
    return _mle("vanilla", prompt, (), safe, end, source_id)


def prefix(
    prompt: Sequence[int], harmful_prefix: Sequence[int], safe: Sequence[int], end: Sequence[int], source_id: str
) -> Sample:
    """MLE with a harmful prefix: the model has already emitted harmful_prefix (the first k
    harmful tokens) and learns to switch to the safe response; k = 0 is vanilla-shaped."""
    return _mle("prefix", prompt, harmful_prefix, safe, end, source_id)


def rto(prompt: Sequence[int], harmful: Sequence[int], source_id: str, kind: str = "rto") -> Sample:
    """Reinforced Transition Optimization: refusal target at every harmful position."""
    if kind not in RTO_KINDS:
        raise ValueError(f"rto-shaped kind must be one of {RTO_KINDS}, got {kind!r}")
    if not harmful:
        raise ValueError("an rto sample needs at least one harmful token")
    n = len(prompt) + len(harmful)
    return Sample(
        kind=kind,
        input_ids=list(prompt) + list(harmful),
        labels=[IGNORE] * n,
        rto_mask=[False] * len(prompt) + [True] * len(harmful),
        prefix_len=len(harmful),
        source_id=source_id,
    )


def pref(prompt: Sequence[int], harmful: Sequence[int], source_id: str) -> Sample:
    """Per-position preference (refuse > continue): the rto shape; input_ids[t] at rto_mask
    positions are the dispreferred tokens."""
    return rto(prompt, harmful, source_id, kind="pref")
