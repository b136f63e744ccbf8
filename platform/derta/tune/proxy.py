"""The cheap proxy objective Tune optimises: safety and helpfulness from forward passes only.

Generating and judging responses (the real evaluation) costs minutes per model; a search needs
a number every few optimizer steps, from inside the training loop. Three held-out quantities,
all in nats and all from the same chunked log-prob path the loss uses (no full-vocabulary
logits, no generation):

  transition_mean  mean over every harmful-response position t of every held-out safety
                   triple of log P(refusal token | q, r̂<t): the paper's RTO term, on data
                   the model never trained on (t = first harmful token is "refuse at once";
                   later t are "refuse after a harmful prefix", what a prefill attack needs).
  transition_min   mean over the held-out triples of min_t log P(refusal | q, r̂<t): the
                   weakest position of each response. A prefill attacker picks the prefix
                   length where refusal is least likely, so this tracks attack success where
                   the mean can hide a hole at a few positions.
  helpful_nll      mean per-token negative log-likelihood of held-out helpful responses:
                   the helpfulness cost of a configuration.

    proxy_score = transition_mean + transition_min - helpful_nll        (higher is better)

Why this form: all three terms are log-likelihoods per token, so equal weights mean that a
factor e in the refusal probability (at a typical or at the weakest position) trades against a
factor e in per-token helpful likelihood (perplexity). It is minus a held-out DeRTa loss
(RTO term + MLE term on helpful data) plus the worst-position term that makes it
attack-aware; safety counts twice, helpfulness once, matching "safest model for the least
loss of helpfulness". It is at most 0 and Tune maximises it (tune.mode: max).

Distributed use (`ProxyHook`, called by train/loop.py on every rank): the held-out batches are
split across ranks, every rank runs the same number of forward passes (FSDP2 needs all ranks
in every forward; a rank short of batches re-runs one with weight 0) and the sums are
all-reduced, so each rank ends with the same numbers and rank 0 reports them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

PROXY_KEYS = ("proxy_score", "transition_mean", "transition_min", "helpful_nll")


def proxy_score(transition_mean: float, transition_min: float, helpful_nll: float) -> float:
    """The scalar Tune maximises (see the module docstring for why this combination)."""
    return transition_mean + transition_min - helpful_nll


# --------------------------------------------------------------------------- held-out set
@dataclass
class ProxySet:
    """Tokenized held-out samples (sample-row format of docs/ARCHITECTURE.md): rto-shaped safety rows
    (rto_mask on every harmful token) and helpful rows (labels on the response)."""

    safety: list[dict[str, list]] = field(default_factory=list)
    helpful: list[dict[str, list]] = field(default_factory=list)
    pad_id: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProxySet":
        return cls(safety=list(d.get("safety") or []), helpful=list(d.get("helpful") or []), pad_id=int(d.get("pad_id", 0)))


def build_proxy_set(template, data_cfg, safety_rows: Sequence[dict], helpful_rows: Sequence[dict], pad_id: int,
                    limit: int | None = None) -> ProxySet:
    """Held-out texts -> token samples with the training template and truncation rules.

    safety_rows: {query, harmful[, source_id]}; helpful_rows: {query, response[, source_id]}.
    `limit` caps each list (the first rows: callers pass a deterministic order).
    """
    from derta.data.tokenize import SampleBuilder

    builder = SampleBuilder(template, data_cfg)
    s_rows = [r for r in safety_rows if r.get("query") and r.get("harmful")][:limit]
    h_rows = [r for r in helpful_rows if r.get("query") and r.get("response")][:limit]
    records = [{"source_id": r.get("source_id") or f"heldout-safety:{i}", "query": r["query"], "harmful": r["harmful"],
                "kinds": ["rto"]} for i, r in enumerate(s_rows)]
    records += [{"source_id": r.get("source_id") or f"heldout-helpful:{i}", "query": r["query"], "response": r["response"],
                 "kinds": ["helpful"]} for i, r in enumerate(h_rows)]
    samples, _ = builder.build(records)
    keep = ("input_ids", "labels", "rto_mask")
    return ProxySet(
        safety=[{k: list(getattr(s, k)) for k in keep} for s in samples if s.kind == "rto"],
        helpful=[{k: list(getattr(s, k)) for k in keep} for s in samples if s.kind == "helpful"],
        pad_id=int(pad_id),
    )


def make_batches(samples: Sequence[dict], batch_size: int, pad_id: int) -> list[dict[str, Tensor]]:
    """One sample per row (so a row index is a sample index), right-padded to the longest
    sample of its batch with the training rows' padding rules (tokenize.pack_rows)."""
    from derta.data.tokenize import pack_rows

    out = []
    for s in range(0, len(samples), max(1, batch_size)):
        chunk = samples[s : s + batch_size]
        width = max(len(x["input_ids"]) for x in chunk)
        rows = pack_rows(chunk, width, pad_id, packing=False)
        out.append({k: torch.as_tensor(v, dtype=torch.bool if k == "rto_mask" else torch.long) for k, v in rows.items()})
    return out


# --------------------------------------------------------------------------- per-batch sums (pure torch)
def _logprobs(model: Any, batch: dict[str, Tensor], targets, refusal_id: int, chunk_size: int) -> Tensor:
    """[N, 3] (log p(label), log p(refusal), log p(harmful token)) at the target positions.

    `model` is a Hugging Face causal LM, or the training loop's (possibly FSDP/DDP-wrapped)
    DertaObjective, whose forward runs the same computation inside one module call."""
    from derta.train.losses import chunked_logprobs

    if hasattr(model, "get_decoder"):
        return chunked_logprobs(model, batch, targets, refusal_id, chunk_size)
    return model(batch, targets, refusal_id, chunk_size)


@torch.no_grad()
def transition_sums(model: Any, batch: dict[str, Tensor], refusal_id: int, chunk_size: int = 1024) -> Tensor:
    """float64 [4]: (Σ log P(refusal) over rto_mask positions, #positions,
    Σ over samples of min_t log P(refusal), #samples with a position)."""
    from derta.train.losses import build_targets

    t = build_targets(batch, rto_keep=1.0, use_rto=True)
    lp = _logprobs(model, batch, t, refusal_id, chunk_size)[:, 1].double()
    keep = t.is_rto
    lp, idx = lp[keep], t.flat_idx[keep]
    b, width = batch["input_ids"].shape
    row = torch.div(idx, width - 1, rounding_mode="floor")
    mins = torch.full((b,), math.inf, dtype=torch.float64, device=lp.device).scatter_reduce(0, row, lp, reduce="amin")
    has = torch.isfinite(mins)
    return torch.stack([lp.sum(), torch.tensor(float(lp.numel()), dtype=torch.float64, device=lp.device),
                        mins[has].sum(), has.sum().double()]).cpu()


@torch.no_grad()
def helpful_sums(model: Any, batch: dict[str, Tensor], refusal_id: int = 0, chunk_size: int = 1024) -> Tensor:
    """float64 [2]: (Σ −log p(label) over labelled tokens, #labelled tokens)."""
    from derta.train.losses import build_targets

    t = build_targets(batch, use_rto=False)
    lp = _logprobs(model, batch, t, refusal_id, chunk_size)[:, 0].double()
    nll = -lp[t.is_mle]
    return torch.stack([nll.sum(), torch.tensor(float(nll.numel()), dtype=torch.float64, device=nll.device)]).cpu()


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def transition_score(model: Any, batches: Sequence[dict[str, Tensor]], refusal_id: int, chunk_size: int = 1024) -> tuple[float, float]:
    """(mean log P(refusal | q, r̂<t) over all harmful positions, mean over samples of its min over t)."""
    s = sum((transition_sums(model, b, refusal_id, chunk_size) for b in batches), torch.zeros(4, dtype=torch.float64))
    return _ratio(float(s[0]), float(s[1])), _ratio(float(s[2]), float(s[3]))


def helpful_nll(model: Any, batches: Sequence[dict[str, Tensor]], chunk_size: int = 1024) -> float:
    """Mean per-token NLL of the held-out helpful responses."""
    s = sum((helpful_sums(model, b, 0, chunk_size) for b in batches), torch.zeros(2, dtype=torch.float64))
    return _ratio(float(s[0]), float(s[1]))


def metrics_from_sums(t: Sequence[float], h: Sequence[float]) -> dict[str, float]:
    """The reported numbers from the (all-reduced) sums. Without helpful data helpful_nll is 0."""
    mean, worst = _ratio(float(t[0]), float(t[1])), _ratio(float(t[2]), float(t[3]))
    nll = _ratio(float(h[0]), float(h[1])) if h[1] else 0.0
    return {"proxy_score": proxy_score(mean, worst, nll), "transition_mean": mean, "transition_min": worst,
            "helpful_nll": nll, "proxy_positions": float(t[1]), "proxy_helpful_tokens": float(h[1])}


def _shard(n: int, rank: int, world: int) -> list[tuple[int, float]]:
    """(batch index, weight) for this rank: its round-robin share, padded with weight-0 repeats
    of batch 0 so that every rank runs ceil(n / world) forward passes."""
    mine = [(i, 1.0) for i in range(rank, n, world)]
    per_rank = -(-n // world) if n else 0
    return mine + [(0, 0.0)] * (per_rank - len(mine))


def evaluate(model: Any, safety: Sequence[dict[str, Tensor]], helpful: Sequence[dict[str, Tensor]], refusal_id: int,
             chunk_size: int = 1024, *, rank: int = 0, world: int = 1, device: torch.device | None = None,
             all_reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """The proxy metrics of `model` on the held-out batches (collective when world > 1: every
    rank must call it with the same batches). The model is put in eval mode meanwhile."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        sums = torch.zeros(6, dtype=torch.float64)
        for group, fn, sl in ((safety, transition_sums, slice(0, 4)), (helpful, helpful_sums, slice(4, 6))):
            for i, w in _shard(len(group), rank, world):
                b = {k: v.to(device) if device is not None else v for k, v in group[i].items()}
                sums[sl] += w * fn(model, b, refusal_id, chunk_size)
        if all_reduce is not None:
            sums = all_reduce(sums.to(device) if device is not None else sums).cpu()
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return metrics_from_sums(sums[:4].tolist(), sums[4:].tolist())


# --------------------------------------------------------------------------- training-loop hook
class ProxyHook:
    """What train/loop.py calls during a Tune trial: the proxy every `every` optimizer steps
    and at the `milestones` steps (ASHA's rungs), and at every checkpoint report and the end,
    so every result Tune sees carries the metric.

    spec (train_loop_config["proxy"]): {"every": int (0: none), "milestones": [int],
    "batch_size": int, **ProxySet.to_dict()}.
    """

    def __init__(self, spec: dict[str, Any], device: torch.device | None = None):
        ps = ProxySet.from_dict(spec)
        bs = int(spec.get("batch_size") or 8)
        self.every = int(spec.get("every") or 0)
        self.milestones = {int(m) for m in spec.get("milestones") or ()}
        self.device = device
        self.safety = make_batches(ps.safety, bs, ps.pad_id) if ps.safety else []
        self.helpful = make_batches(ps.helpful, bs, ps.pad_id) if ps.helpful else []
        self.last: dict[str, float] = {}
        self._step = -1
        if spec.get("janitor"):
            from derta.tune.tuner import register_worker_group

            register_worker_group(spec)

    def due(self, step: int) -> bool:
        return bool(self.every and step % self.every == 0) or step in self.milestones

    def __call__(self, model: Any, refusal_id: int, chunk_size: int, step: int) -> dict[str, float]:
        """Collective: every rank calls it at the same steps. Cached per step."""
        if step == self._step and self.last:
            return self.last
        import torch.distributed as dist

        rank, world, reduce = 0, 1, None
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()

            def reduce(t: Tensor) -> Tensor:
                dist.all_reduce(t)
                return t

        self.last = evaluate(model, self.safety, self.helpful, refusal_id, chunk_size, rank=rank, world=world,
                             device=self.device, all_reduce=reduce)
        self._step = step
        return self.last
