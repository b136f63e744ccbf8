"""derta's default loss (normalize token_mean, keep_rule public) against a straight
re-implementation of the public DeRTa code's loss (run_clm_llms_derta_llama_drop_5_percent.py,
the Llama forward): RTO rows get the refusal id at every labelled position, a random subset of
the row's positions is kept, and ONE CrossEntropyLoss mean runs over the shifted labels."""

from __future__ import annotations

import copy

import pytest
import torch
from _fixtures import tiny_model_dir  # noqa: F401

from derta.train.losses import build_targets, derta_loss, keep_rto_positions, naive_loss, public_keep_count

SORRY = 11


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def mixed_batch(vocab: int, seed: int, B: int = 5, L: int = 37) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """Unpacked, right-padded rows as the public code's collator makes them: MLE rows (labels on
    the response) and RTO rows (rto_mask on the response, EOS included), random lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    labels = torch.full((B, L), -100)
    rto = torch.zeros(B, L, dtype=torch.bool)
    safe = [bool(b % 2) for b in range(B)]
    for b in range(B):
        n_prompt = int(torch.randint(2, 9, (1,), generator=g))
        n = int(torch.randint(n_prompt + 2, L + 1, (1,), generator=g))  # the rest is padding
        ids[b, n:] = 0
        if safe[b]:
            rto[b, n_prompt:n] = True
        else:
            labels[b, n_prompt:n] = ids[b, n_prompt:n]
    return {"input_ids": ids, "labels": labels, "rto_mask": rto}, safe


def public_code_loss(lm, batch: dict[str, torch.Tensor], kept: torch.Tensor) -> torch.Tensor:
    """The public code's loss: labels are the response ids on every row; on an RTO row every
    labelled position becomes the Sorry id and only the `kept` positions survive (-100 else);
    then one token-mean CrossEntropyLoss over the shifted labels."""
    from torch.nn import CrossEntropyLoss

    labels = torch.where(batch["rto_mask"], batch["input_ids"], batch["labels"])  # "text" labels of every row
    safe_labels = labels.clone()
    for b in range(labels.shape[0]):
        if batch["rto_mask"][b].any():  # "safe": "true"
            sl = safe_labels[b]
            sl[labels[b] != -100] = SORRY
            sl[~kept[b]] = -100
    logits = lm(input_ids=batch["input_ids"], use_cache=False).logits.float()
    V = logits.shape[-1]
    return CrossEntropyLoss()(logits[:, :-1].reshape(-1, V), safe_labels[:, 1:].reshape(-1))


def kept_grid(batch: dict[str, torch.Tensor], t) -> torch.Tensor:
    """The kept RTO positions of Targets `t` back on the [B, L] grid (targets live at t >= 1)."""
    B, L = batch["input_ids"].shape
    grid = torch.zeros(B * (L - 1), dtype=torch.bool)
    grid[t.flat_idx[t.is_rto]] = True
    return torch.cat([torch.zeros(B, 1, dtype=torch.bool), grid.view(B, L - 1)], dim=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("keep", [1.0, 0.05])
def test_default_loss_equals_the_public_codes_loss(lm, seed, keep):
    m = copy.deepcopy(lm)
    batch, safe = mixed_batch(m.config.vocab_size, seed)
    assert any(safe) and not all(safe)
    t = build_targets(batch, rto_keep=keep, seed=seed, keep_rule="public")
    kept = kept_grid(batch, t)
    if keep == 1.0:
        assert torch.equal(kept, batch["rto_mask"])
    else:
        assert 0 <= t.n_rto < int(batch["rto_mask"].sum())
    with torch.no_grad():
        want = float(public_code_loss(m, batch, kept))
    kw = dict(refusal_id=SORRY, transition="rto", targets=t)  # defaults: token_mean, w = 1
    fused = derta_loss(m, batch, chunk_size=7, **kw)
    generic = derta_loss(m, batch, chunk_size=7, fused=False, **kw)
    naive = naive_loss(m, batch, **kw)
    for out in (fused, generic, naive):
        assert float(out.loss.detach()) == pytest.approx(want, abs=1e-6)
    # Same gradient as the public code's loss.
    fused.loss.backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    public_code_loss(m, batch, kept).backward()
    for n, p in m.named_parameters():
        assert torch.allclose(g[n], p.grad, atol=1e-6), n


def test_public_keep_count_is_the_codes_draw():
    for n in range(1, 400):
        assert public_keep_count(n, 0.05) == max(1, (n + 19) // 20)  # the code's expression
    assert public_keep_count(100, 0.1) == 10 and public_keep_count(101, 0.1) == 11
    assert public_keep_count(10, 0.3) == 3 and public_keep_count(11, 0.3) == 4  # ceil(n · keep)


def test_public_keep_rule_statistics():
    """Per sample, max(1, ceil(n/20)) of its n positions (prompt and EOS included) are drawn and
    the RTO ones among them kept: every position equally likely, so the kept count is
    hypergeometric with mean draws · m / n; a packed document counts its own n."""
    L = 120
    pos = torch.arange(L).repeat(1, 1)
    pos[0, 70:] = torch.arange(L - 70)  # two documents: 70 and 50 positions
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[0, 10:70] = True  # doc 0: 60 RTO positions (the last one the EOS) of n = 70 -> 4 draws
    mask[0, 95:120] = True  # doc 1: 25 RTO positions of n = 50 -> 3 draws
    # Every position an RTO target: exactly the drawn count is kept.
    full = keep_rto_positions(torch.ones(1, L, dtype=torch.bool), 0.05, 3, pos, rule="public")
    assert int(full[0, :70].sum()) == 4 and int(full[0, 70:].sum()) == 3
    trials = 4000
    counts = torch.zeros(2)
    hits = torch.zeros(L)
    zero_doc1 = 0
    for s in range(trials):
        kept = keep_rto_positions(mask, 0.05, s, pos, rule="public")
        assert not (kept & ~mask).any()
        c0, c1 = int(kept[0, :70].sum()), int(kept[0, 70:].sum())
        assert c0 <= 4 and c1 <= 3
        counts += torch.tensor([c0, c1], dtype=torch.float)
        zero_doc1 += c1 == 0
        hits += kept[0].float()
    mean = counts / trials
    assert float(mean[0]) == pytest.approx(4 * 60 / 70, abs=0.06)
    assert float(mean[1]) == pytest.approx(3 * 25 / 50, abs=0.06)
    # P(no RTO position kept in doc 1) = C(25,3)/C(50,3) (hypergeometric): often zero, unlike `exact`.
    assert zero_doc1 / trials == pytest.approx((25 * 24 * 23) / (50 * 49 * 48), abs=0.03)
    # The EOS position (last of doc 0) is kept as often as any other: 4/70.
    assert float(hits[69]) / trials == pytest.approx(4 / 70, abs=0.015)
    exact = keep_rto_positions(mask, 0.05, 0, pos, rule="exact")
    assert int(exact[0, :70].sum()) == 3 and int(exact[0, 70:].sum()) == 1  # round(3.0), max(1, round(1.25))
