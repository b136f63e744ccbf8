"""DeRTa losses from ONE forward pass: MLE, RTO (refusal-token CE at every harmful position),
the RTO keep-rate ("Sorry dropout") and the per-position preference variant (derta_pref).

The paper's objective (Yuan et al. 2024, eq. 1-2):

    L(θ) = − E log Pθ(r | q, r̂<k)  −  E Σ_{t=1..|r̂|} log Pθ(sorry | q, r̂<t)

Alignment (docs/ARCHITECTURE.md, sample rows): labels[t] / rto_mask[t] are targets FOR position t, predicted from
the hidden state at t-1. So every target lives on the shifted grid t = 1..L-1.

Normalisation (`train.loss.normalize`) -- what is optimised:
  * token_mean (default; the public code, whose numbers the paper reports): ONE mean over every
    target token of the global batch, MLE labels and kept RTO "Sorry" targets together,
        loss = (w_mle · Σ_mle −log p(label) + w_rto · Σ_rto −log p(sorry)) / (N_mle + N_rto)
    with w_mle = w_rto = 1 exactly the public code's single CrossEntropyLoss (mean over every
    label != -100 of the micro-batch; derta takes the mean over the whole global batch, which
    equals it for one micro-batch on one worker). The weights multiply each token's term.
  * per_term: each kind normalised by its own count,
        loss = w_mle · Σ_mle/N_mle + w_rto · Σ_rto/N_rto
    so the two terms weigh the same whatever the token mix. With rto_keep 0.05 this makes each
    kept refusal position weigh ~1/N_rto instead of ~1/(N_mle+N_rto): hundreds of times more
    than in the public code.
  derta_pref (per-position preference, not in the public code) uses the same denominators: under
  token_mean each kept position's −log σ(β·Δ) is one term of the shared token mean.
  N_* are counts over the whole GLOBAL batch (all micro-batches of one optimizer step, all
  workers; see `Denominators`); a term with no tokens contributes 0.
  Logged terms (whatever the normalisation): loss = the objective above; loss_mle / loss_rto /
  loss_pref = the per-kind token means (Σ_kind / N_kind), n_mle / n_rto = the token counts.

RTO keep rule (`train.loss.keep_rule`, with `rto_keep`; "Sorry dropout"):
  * public (default; the public code, run_clm_llms_derta_llama_drop_5_percent.py): per sample
    with n sequence positions (prompt included), draw max(1, ceil(n · rto_keep)) positions
    uniformly (the code: max(1, (n+19)//20) for 5 %), and keep those that are RTO targets; the
    number kept is random (hypergeometric, ~5 % of the RTO positions, often 0 for short
    responses). The public code draws per PADDED ROW (n includes the batch padding); derta
    draws per sample (a packed document, or the row when there are no position_ids), so n is
    the sample's own length. The public code also labels the end-of-text token of an RTO row
    with "Sorry"; derta's data side adds the template's end ids as RTO targets to rto samples
    in this mode (data.pipeline.training_dataset).
  * exact: per sample keep exactly max(1, round(rto_keep · m)) of its m RTO positions.
  rto_keep 1.0 keeps every RTO position under either rule (the LoRA recipe).

Memory and time: the vocabulary projection + log-softmax run only on positions that carry a
target, `chunk_size` positions at a time. In training the head is fused with its gradient
(`_FusedHeadLoss`): each chunk's logits become log-probs, the loss and, in place, d loss /
d logits, which are multiplied out into the gradients of the hidden rows and the head weight
right away; about one [chunk_size, vocab] float32 block is alive at a time and the head costs
the three matmuls of plain cross-entropy. Full-vocabulary fp32
logits for the whole sequence are never built (`naive_loss` does build them; it is the
reference the tests compare against).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
Transition = Literal["rto", "pref", "none"]


# --------------------------------------------------------------------------- targets
def document_ids(position_ids: Tensor) -> Tensor:
    """[B, L] document index inside each packed row: a new document starts where position_ids
    does not continue by +1 (the same rule transformers uses to build the packed mask)."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).long().cumsum(-1)


KeepRule = Literal["public", "exact"]
Normalize = Literal["token_mean", "per_term"]


def public_keep_count(n: int, keep: float) -> int:
    """How many of a sample's n positions the public code draws: max(1, (n+19)//20) for keep
    0.05, i.e. max(1, ceil(n · keep)) (integer arithmetic when 1/keep is an integer)."""
    inv = 1.0 / keep
    if abs(inv - round(inv)) < 1e-9:
        k = int(round(inv))
        return max(1, (n + k - 1) // k)
    return max(1, math.ceil(n * keep - 1e-9))


def keep_rto_positions(rto_mask: Tensor, keep: float, seed: int, position_ids: Tensor | None = None,
                       rule: KeepRule = "exact") -> Tensor:
    """The "Sorry dropout" (see the module docstring for the two rules), per sample: one
    document of a packed row (from position_ids), or the whole row. Choices are uniform without
    replacement with a generator seeded by `seed`. keep = 1 returns the mask unchanged.
    Deterministic for a given (mask, keep, seed, rule)."""
    rto_mask = rto_mask.bool()
    if keep >= 1.0 or not bool(rto_mask.any()):
        return rto_mask
    gen = torch.Generator(device="cpu").manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    scores = torch.rand(rto_mask.shape, generator=gen).to(rto_mask.device)
    docs = document_ids(position_ids) if position_ids is not None else torch.zeros_like(rto_mask, dtype=torch.long)
    out = torch.zeros_like(rto_mask)
    for b in range(rto_mask.shape[0]):
        row = rto_mask[b]
        for d in torch.unique(docs[b][row]).tolist():
            in_doc = docs[b] == d
            if rule == "public":  # draw among ALL the sample's positions, keep the RTO ones
                idx = torch.nonzero(in_doc, as_tuple=True)[0]
                n_keep = public_keep_count(idx.numel(), keep)
            else:
                idx = torch.nonzero(row & in_doc, as_tuple=True)[0]
                n_keep = max(1, int(round(keep * idx.numel())))
            chosen = idx[torch.argsort(scores[b, idx])[:n_keep]]
            out[b, chosen] = row[chosen]
    return out


@dataclass
class Targets:
    """Every position that carries a target, flattened over the shifted [B, L-1] grid."""

    flat_idx: Tensor  # [N] index into hidden[:, :-1].reshape(-1, H)
    label: Tensor  # [N] MLE target id (IGNORE where none)
    harm: Tensor  # [N] the dispreferred (harmful) token input_ids[t]
    is_mle: Tensor  # [N] bool
    is_rto: Tensor  # [N] bool (kept RTO / pref positions)

    @property
    def n_mle(self) -> int:
        return int(self.is_mle.sum())

    @property
    def n_rto(self) -> int:
        return int(self.is_rto.sum())


def build_targets(batch: dict[str, Tensor], *, rto_keep: float = 1.0, seed: int = 0, use_rto: bool = True,
                  keep_rule: KeepRule = "public") -> Targets:
    """Select the positions with a target. `seed` drives the RTO keep-rate only."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    rto = batch.get("rto_mask")
    rto = torch.zeros_like(labels, dtype=torch.bool) if rto is None or not use_rto else rto.bool()
    rto = keep_rto_positions(rto, rto_keep, seed, batch.get("position_ids"), keep_rule)
    lab, rt, harm = labels[:, 1:], rto[:, 1:], input_ids[:, 1:]
    is_mle, is_rto = lab != IGNORE, rt
    sel = (is_mle | is_rto).reshape(-1)
    flat = torch.nonzero(sel, as_tuple=True)[0]
    return Targets(
        flat_idx=flat,
        label=lab.reshape(-1)[flat],
        harm=harm.reshape(-1)[flat],
        is_mle=is_mle.reshape(-1)[flat],
        is_rto=is_rto.reshape(-1)[flat],
    )


# --------------------------------------------------------------------------- log-probs
def _logit_transform(config) -> tuple[float | None, float | None]:
    """(scale, softcap) some architectures apply to lm_head output (Cohere, Gemma 2)."""
    scale = getattr(config, "logit_scale", None)
    cap = getattr(config, "final_logit_softcapping", None)
    return scale, cap


def _chunk_logprobs(h: Tensor, weight: Tensor, bias: Tensor | None, cols: Tensor, scale: float | None, cap: float | None) -> Tensor:
    """log_softmax(h @ W^T)[:, cols] for one chunk, in float32; cols [C, K]."""
    logits = F.linear(h, weight, bias).float()
    if scale is not None:
        logits = logits * scale
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    return logits.gather(1, cols) - lse


class _FusedChunkLogprob(torch.autograd.Function):
    """log_softmax(h @ Wᵀ)[:, cols] for one chunk with a hand-written backward: only the
    per-row log-sum-exp is saved; backward rebuilds the logits once and turns them into the
    gradient in place (softmax, scaled, minus the one-hot targets), so a chunk costs ONE
    [C, V] float32 buffer in forward and in backward (autograd through log_softmax keeps ~5)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, cols: Tensor) -> Tensor:
        logits = F.linear(h, weight).float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        out = logits.gather(1, cols) - lse
        ctx.save_for_backward(h, weight, cols, lse)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        h, weight, cols, lse = ctx.saved_tensors
        grad = F.linear(h, weight).float()
        grad.sub_(lse).exp_()  # softmax
        grad.mul_(-g.sum(dim=1, keepdim=True))
        grad.scatter_add_(1, cols, g.to(grad.dtype))  # d/dlogits of Σ_k g_k (logit[col_k] − lse)
        grad = grad.to(h.dtype)
        grad_h = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ h if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None


def position_logprobs(
    hidden: Tensor,
    head: nn.Module,
    cols: Tensor,
    chunk_size: int,
    *,
    config=None,
    recompute: bool = True,
) -> Tensor:
    """log p(cols[n, k] | position n) for selected hidden rows [N, H]; [N, K] float32.

    Chunks of `chunk_size` rows; with `recompute`, each chunk's [C, V] logits are rebuilt in
    backward instead of being stored (the fused function above; activation checkpointing of
    the generic chunk for heads with a bias or logit scaling).
    """
    scale, cap = _logit_transform(config) if config is not None else (None, None)
    weight, bias = head.weight, getattr(head, "bias", None)
    outs = []
    # At least one (possibly empty) chunk: the result stays connected to the head weight, so
    # every rank produces a (zero) gradient for it and FSDP's reduce-scatter stays in step.
    for start in range(0, max(1, hidden.shape[0]), chunk_size):
        h, c = hidden[start : start + chunk_size], cols[start : start + chunk_size]
        needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        if needs_grad and recompute and bias is None and scale is None and cap is None:
            outs.append(_FusedChunkLogprob.apply(h, weight, c))
        elif needs_grad and recompute:  # architectures with a head bias / logit scaling
            outs.append(checkpoint(_chunk_logprobs, h, weight, bias, c, scale, cap, use_reentrant=False))
        else:
            outs.append(_chunk_logprobs(h, weight, bias, c, scale, cap))
    return torch.cat(outs)


def target_columns(t: Targets, refusal_id: int) -> Tensor:
    """[N, 3] vocabulary columns per position: (MLE label, refusal token, harmful token)."""
    label = torch.where(t.is_mle, t.label, torch.full_like(t.label, refusal_id))
    return torch.stack([label, torch.full_like(label, refusal_id), t.harm], dim=1)


# --------------------------------------------------------------------------- combining
@dataclass(frozen=True)
class Denominators:
    """Token counts of the whole global batch, so micro-batches and workers add up exactly."""

    n_mle: float
    n_rto: float


def denominators(t: Targets, denom: Denominators | None, normalize: Normalize = "per_term") -> tuple[float, float]:
    """(d_mle, d_rto) that divide the MLE and the RTO/pref sums of the objective: the global
    batch's counts when given, else this micro-batch's; per_term divides each kind by its own
    count, token_mean both by their total. One rule for the fused and the generic loss."""
    n_mle, n_rto = (float(denom.n_mle), float(denom.n_rto)) if denom is not None else (float(t.n_mle), float(t.n_rto))
    if normalize == "token_mean":
        return n_mle + n_rto, n_mle + n_rto
    if normalize != "per_term":
        raise ValueError(f"unknown normalize {normalize!r} (token_mean | per_term)")
    return n_mle, n_rto


@dataclass(frozen=True)
class LossSpec:
    """Everything the fused head needs to know about the loss (see `combine` for the math)."""

    transition: Transition
    w_mle: float
    w_rto: float
    beta: float
    d_mle: float  # divide the MLE / the RTO-pref sums: `denominators` (normalize applied, global counts)
    d_rto: float


def _coefficients(lp: Tensor, is_mle: Tensor, is_rto: Tensor, ref: Tensor | None, spec: LossSpec) -> tuple[Tensor, Tensor]:
    """(loss of these positions, dLoss/dlogp [C, 3]) for log-probs lp [C, 3] (label, sorry, harm)."""
    coef = torch.zeros_like(lp)
    loss = lp.new_zeros(())
    if spec.d_mle:
        coef[:, 0] = -(spec.w_mle / spec.d_mle) * is_mle
    if spec.transition == "rto" and spec.d_rto:
        coef[:, 1] = -(spec.w_rto / spec.d_rto) * is_rto
    loss = loss + (coef[:, :2] * lp[:, :2]).sum()
    if spec.transition == "pref" and spec.d_rto:
        k = (spec.w_rto / spec.d_rto) * is_rto
        margin = (lp[:, 1] - lp[:, 2]) - (ref[:, 0] - ref[:, 1]).to(lp.dtype)
        loss = loss - (F.logsigmoid(spec.beta * margin) * k).sum()
        c = -k * spec.beta * torch.sigmoid(-spec.beta * margin)  # d(−log σ(βm))/dm · k
        coef[:, 1], coef[:, 2] = c, -c
    return loss, coef


class _FusedHeadLoss(torch.autograd.Function):
    """The whole head side of the loss in one pass, gradient included: per chunk, logits ->
    log-probs -> loss -> d loss/d logits (softmax scaled, minus the one-hot targets, in place)
    -> grad of the hidden rows and of the head weight. Backward only scales the stored
    gradients by the upstream scalar, so the head costs three matmuls (as plain cross-entropy
    does) and one [chunk, vocab] float32 buffer at a time. Returns (loss, detached log-probs)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, cols: Tensor, is_mle: Tensor, is_rto: Tensor, ref: Tensor | None,
                spec: LossSpec, chunk_size: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        lps, loss = [], torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.no_grad():
            for start in range(0, h.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                hc, cc = h[sl], cols[sl]
                # One [C, V] float32 buffer: logits -> exp(logits - max) -> softmax -> d loss/d logits.
                buf = F.linear(hc, weight).float()
                picked = buf.gather(1, cc)
                mx = buf.amax(dim=-1, keepdim=True)
                total = buf.sub_(mx).exp_().sum(dim=-1, keepdim=True)
                lp = picked - (mx + total.log())
                part, coef = _coefficients(lp, is_mle[sl], is_rto[sl], None if ref is None else ref[sl], spec)
                loss += part
                lps.append(lp)
                if need_h or need_w:
                    g = buf.div_(total)  # softmax
                    g.mul_(-coef.sum(dim=1, keepdim=True)).scatter_add_(1, cc, coef)
                    g = g.to(h.dtype)
                    if need_h:
                        grad_h[sl] = g @ weight
                    if need_w:
                        grad_w.add_(g.t() @ hc)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        lp_all = torch.cat(lps) if lps else h.new_zeros((0, cols.shape[1]), dtype=torch.float32)
        ctx.mark_non_differentiable(lp_all)
        return loss, lp_all

    @staticmethod
    def backward(ctx, g_loss: Tensor, _g_lp: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * g_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * g_loss.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None


def fused_supported(lm: nn.Module) -> bool:
    """The fused head handles a plain linear head (Llama, Mistral, Qwen, ...); heads with a
    bias or logit scaling/softcapping use the generic chunked path."""
    _, head = decoder_and_head(lm)
    scale, cap = _logit_transform(getattr(lm, "config", None))
    return getattr(head, "bias", None) is None and scale is None and cap is None


def fused_loss(lm: nn.Module, batch: dict[str, Tensor], t: Targets, refusal_id: int, chunk_size: int, spec: LossSpec,
               ref_logps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(differentiable loss, detached [N, 3] log-probs) from one body forward + the fused head."""
    if spec.transition == "pref" and ref_logps is None:
        raise ValueError("derta_pref needs reference log-probs (ref_logps)")
    sel = target_hidden(lm, batch, t)
    _, head = decoder_and_head(lm)
    return _FusedHeadLoss.apply(sel, head.weight, target_columns(t, refusal_id), t.is_mle.float(), t.is_rto.float(),
                                ref_logps, spec, chunk_size)


@dataclass
class LossOutput:
    loss: Tensor  # differentiable objective of this micro-batch (normalize: token_mean | per_term)
    loss_mle: Tensor  # detached, this micro-batch's share of the per-kind token means
    loss_rto: Tensor
    loss_pref: Tensor
    n_mle: int  # tokens in this micro-batch
    n_rto: int


def combine(
    logps: Tensor,
    t: Targets,
    *,
    transition: Transition,
    w_mle: float,
    w_rto: float,
    beta: float = 0.1,
    ref_logps: Tensor | None = None,
    denom: Denominators | None = None,
    normalize: Normalize = "token_mean",
) -> LossOutput:
    """Turn per-position log-probs [N, 3] (label, sorry, harm) into the loss terms: `loss` is
    the objective under `normalize`; loss_mle / loss_rto / loss_pref are the per-kind token
    means (their sums over the micro-batches of a step are the step's means).

    derta_pref at a kept position t with Δθ = log pθ(sorry) − log pθ(harm_t) and Δref the same
    under the reference model: −log σ(β · (Δθ − Δref)).
    """
    n_mle, n_rto = t.n_mle, t.n_rto
    d_mle, d_rto = denominators(t, denom, normalize)
    k_mle, k_rto = denominators(t, denom, "per_term")
    zero = logps.sum() * 0.0 + 0.0  # (+0.0: no "-0.0" in logs) keeps the graph connected even when a term is empty
    s_mle = -(logps[:, 0] * t.is_mle).sum() if n_mle else zero
    s_rto, s_pref = zero, zero
    if transition == "rto" and n_rto:
        s_rto = -(logps[:, 1] * t.is_rto).sum()
    elif transition == "pref" and n_rto:
        if ref_logps is None:
            raise ValueError("derta_pref needs reference log-probs (ref_logps)")
        margin = (logps[:, 1] - logps[:, 2]) - (ref_logps[:, 0] - ref_logps[:, 1]).to(logps.dtype)
        s_pref = -(F.logsigmoid(beta * margin) * t.is_rto).sum()

    def div(x: Tensor, d: float) -> Tensor:
        return x / d if d else zero

    total = w_mle * div(s_mle, d_mle) + w_rto * (div(s_rto, d_rto) + div(s_pref, d_rto))
    return LossOutput(total, div(s_mle, k_mle).detach(), div(s_rto, k_rto).detach(), div(s_pref, k_rto).detach(),
                      n_mle, n_rto)


# --------------------------------------------------------------------------- model access
def decoder_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body (hidden states) and the vocabulary head of an HF causal LM, also
    through a peft wrapper."""
    return lm.get_decoder(), lm.get_output_embeddings()


def hidden_states(lm: nn.Module, input_ids: Tensor, position_ids: Tensor | None) -> Tensor:
    """Final hidden states [B, L, H]. No attention_mask and use_cache=False: transformers then
    derives document-aware (block-diagonal causal) attention from packed position_ids; with a
    cache it would silently attend across documents."""
    decoder, _ = decoder_and_head(lm)
    return decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state


def target_hidden(lm: nn.Module, batch: dict[str, Tensor], t: Targets) -> Tensor:
    """[N, H] hidden rows that predict the targets (one body forward); the fused and the generic
    head must see exactly the same rows, so both take them from here."""
    h = hidden_states(lm, batch["input_ids"], batch.get("position_ids"))
    return h[:, :-1].reshape(-1, h.shape[-1]).index_select(0, t.flat_idx)


def _model_config(lm: nn.Module):
    return getattr(lm, "config", None)


def chunked_logprobs(lm: nn.Module, batch: dict[str, Tensor], t: Targets, refusal_id: int, chunk_size: int) -> Tensor:
    """One forward pass of the body, then the head on the selected positions only: [N, 3]."""
    sel = target_hidden(lm, batch, t)
    _, head = decoder_and_head(lm)
    return position_logprobs(sel, head, target_columns(t, refusal_id), chunk_size, config=_model_config(lm))


def reference_logprobs(ref_lm: nn.Module, batch: dict[str, Tensor], t: Targets, refusal_id: int, chunk_size: int) -> Tensor:
    """[N, 2] (log p_ref(sorry), log p_ref(harm)) under no_grad. For a peft model pass the same
    model: its adapters are disabled for this pass, so the reference costs no extra weights."""
    with torch.no_grad():
        if hasattr(ref_lm, "disable_adapter") and hasattr(ref_lm, "peft_config"):
            with ref_lm.disable_adapter():
                lp = chunked_logprobs(ref_lm, batch, t, refusal_id, chunk_size)
        else:
            lp = chunked_logprobs(ref_lm, batch, t, refusal_id, chunk_size)
    return lp[:, 1:].detach()


def derta_loss(
    lm: nn.Module,
    batch: dict[str, Tensor],
    *,
    refusal_id: int,
    transition: Transition = "rto",
    w_mle: float = 1.0,
    w_rto: float = 1.0,
    rto_keep: float = 1.0,
    beta: float = 0.1,
    chunk_size: int = 1024,
    seed: int = 0,
    ref_lm: nn.Module | None = None,
    denom: Denominators | None = None,
    targets: Targets | None = None,
    fused: bool = True,
    normalize: Normalize = "token_mean",
    keep_rule: KeepRule = "public",
) -> LossOutput:
    """The DeRTa loss of one micro-batch from a single forward pass (chunked head; fused
    head-and-gradient pass unless fused=False or the head needs the generic path)."""
    t = targets or build_targets(batch, rto_keep=rto_keep, seed=seed, use_rto=transition != "none", keep_rule=keep_rule)
    ref = None
    if transition == "pref":
        ref = reference_logprobs(ref_lm if ref_lm is not None else lm, batch, t, refusal_id, chunk_size)
    kw = dict(transition=transition, w_mle=w_mle, w_rto=w_rto, beta=beta, ref_logps=ref, denom=denom, normalize=normalize)
    if fused and fused_supported(lm):
        spec = loss_spec(t, transition=transition, w_mle=w_mle, w_rto=w_rto, beta=beta, denom=denom, normalize=normalize)
        loss, logps = fused_loss(lm, batch, t, refusal_id, chunk_size, spec, ref)
        with torch.no_grad():
            out = combine(logps, t, **kw)
        out.loss = loss
        return out
    return combine(chunked_logprobs(lm, batch, t, refusal_id, chunk_size), t, **kw)


def loss_spec(t: Targets, *, transition: Transition, w_mle: float, w_rto: float, beta: float,
              denom: Denominators | None = None, normalize: Normalize = "token_mean") -> LossSpec:
    return LossSpec(transition, w_mle, w_rto, beta, *denominators(t, denom, normalize))


def naive_loss(
    lm: nn.Module,
    batch: dict[str, Tensor],
    *,
    refusal_id: int,
    transition: Transition = "rto",
    w_mle: float = 1.0,
    w_rto: float = 1.0,
    beta: float = 0.1,
    targets: Targets,
    ref_lm: nn.Module | None = None,
    denom: Denominators | None = None,
    normalize: Normalize = "token_mean",
) -> LossOutput:
    """Reference implementation: full [B, L, V] float32 logits, then gather. Test-only."""
    def full_logps(model: nn.Module) -> Tensor:
        out = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False)
        lp = torch.log_softmax(out.logits.float()[:, :-1], dim=-1).reshape(-1, out.logits.shape[-1])
        return lp.index_select(0, targets.flat_idx).gather(1, target_columns(targets, refusal_id))

    logps = full_logps(lm)
    ref = None
    if transition == "pref" and targets.n_rto:
        with torch.no_grad():
            model = ref_lm if ref_lm is not None else lm
            if ref_lm is None and hasattr(lm, "disable_adapter"):
                with lm.disable_adapter():
                    ref = full_logps(model)[:, 1:]
            else:
                ref = full_logps(model)[:, 1:]
    return combine(logps, targets, transition=transition, w_mle=w_mle, w_rto=w_rto, beta=beta, ref_logps=ref, denom=denom,
                   normalize=normalize)


# --------------------------------------------------------------------------- FSDP root
class DertaObjective(nn.Module):
    """Holds the causal LM so that the whole loss (body + chunked head) runs inside ONE module
    forward. Under FSDP2 this module is the root: its pre-forward hook un-shards the
    embedding / norm / lm_head, so the head weight can be used chunk by chunk, and its
    post-backward reduce-scatters their gradients. Without FSDP it is a thin wrapper.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict[str, Tensor], targets: Targets, refusal_id: int, chunk_size: int, reference: bool = False,
                spec: LossSpec | None = None, ref_logps: Tensor | None = None):
        """log-probs [N, 3] (or the reference's [N, 2] with reference=True); with `spec`, the
        (loss, detached log-probs) of the fused head when the model allows it, else the
        loss built from the generic chunked log-probs."""
        if reference:
            return reference_logprobs(self.lm, batch, targets, refusal_id, chunk_size)
        if spec is None:
            return chunked_logprobs(self.lm, batch, targets, refusal_id, chunk_size)
        if fused_supported(self.lm):
            return fused_loss(self.lm, batch, targets, refusal_id, chunk_size, spec, ref_logps)
        logps = chunked_logprobs(self.lm, batch, targets, refusal_id, chunk_size)
        out = combine(logps, targets, transition=spec.transition, w_mle=spec.w_mle, w_rto=spec.w_rto, beta=spec.beta,
                      ref_logps=ref_logps, denom=Denominators(spec.d_mle, spec.d_rto), normalize="per_term")
        return out.loss, logps.detach()
