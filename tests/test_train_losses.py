"""The DeRTa losses as pure functions (no Ray): the paper's equation, chunked == naive, the
RTO keep-rate, the per-position preference loss, exact gradient accumulation, packed
attention, the step plan and LR schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _fixtures import tiny_model_dir, tiny_tokenizer  # noqa: F401
from _train_rows import demo_samples, to_rows

from derta.train.losses import (
    Denominators,
    build_targets,
    derta_loss,
    document_ids,
    hidden_states,
    keep_rto_positions,
    naive_loss,
)

SORRY = 7  # any id works for the math; the tiny tokenizer's real one is used where it matters


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def ref_lm(lm):
    """A reference model that differs from the policy (so preference margins are non-zero)."""
    ref = copy.deepcopy(lm)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def random_batch(vocab: int, B: int = 3, L: int = 41, packed: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random rows in the sample-row format of docs/ARCHITECTURE.md: some MLE spans, some RTO spans, packed docs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    labels = torch.full((B, L), -100)
    rto = torch.zeros(B, L, dtype=torch.bool)
    pos = torch.arange(L).repeat(B, 1)
    labels[0, 6:30] = ids[0, 6:30]
    rto[1, 9:L - 2] = True
    labels[2, 3:12] = ids[2, 3:12]
    rto[2, 25:L] = True
    if packed:  # row 1 and 2 hold two documents each
        pos[1, 20:] = torch.arange(L - 20)
        pos[2, 18:] = torch.arange(L - 18)
    return {"input_ids": ids, "labels": labels, "rto_mask": rto, "position_ids": pos}


# --------------------------------------------------------------------------- the paper's equation
@pytest.mark.parametrize("normalize", ["token_mean", "per_term"])
def test_mle_and_rto_equal_the_papers_equation(lm, normalize):
    """L = -E log P(r | q, r̂<k) - E Σ_t log P(sorry | q, r̂<t), with E the per-token mean
    (see losses.py): computed here plainly, one position at a time."""
    batch = random_batch(lm.config.vocab_size, packed=False)
    out = derta_loss(lm, batch, refusal_id=SORRY, transition="rto", w_mle=0.7, w_rto=1.3, chunk_size=5,
                     normalize=normalize)

    mle_sum, n_mle, rto_sum, n_rto = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for b in range(batch["input_ids"].shape[0]):
            logits = lm(input_ids=batch["input_ids"][b : b + 1]).logits[0].double()
            for t in range(1, batch["input_ids"].shape[1]):
                logp = torch.log_softmax(logits[t - 1], dim=-1)  # P(· | tokens < t)
                if batch["labels"][b, t] != -100:
                    mle_sum -= float(logp[batch["labels"][b, t]])
                    n_mle += 1
                if batch["rto_mask"][b, t]:
                    rto_sum -= float(logp[SORRY])
                    n_rto += 1
    assert (out.n_mle, out.n_rto) == (n_mle, n_rto)
    assert float(out.loss_mle) == pytest.approx(mle_sum / n_mle, abs=1e-5)
    assert float(out.loss_rto) == pytest.approx(rto_sum / n_rto, abs=1e-5)
    if normalize == "per_term":
        assert float(out.loss) == pytest.approx(0.7 * mle_sum / n_mle + 1.3 * rto_sum / n_rto, abs=1e-5)
    else:  # one mean over every target token, the weights on each token's term
        assert float(out.loss) == pytest.approx((0.7 * mle_sum + 1.3 * rto_sum) / (n_mle + n_rto), abs=1e-5)


# --------------------------------------------------------------------------- chunked == naive
@pytest.mark.parametrize("transition", ["rto", "pref", "none"])
@pytest.mark.parametrize("chunk_size", [1, 7, 13, 4096])
def test_chunked_equals_naive(lm, ref_lm, transition, chunk_size):
    batch = random_batch(lm.config.vocab_size, L=41)  # 40 shifted positions: 7 and 13 don't divide
    t = build_targets(batch, rto_keep=0.6, seed=3, use_rto=transition != "none")
    kw = dict(refusal_id=SORRY, transition=transition, w_mle=1.0, w_rto=0.5, beta=0.3, ref_lm=ref_lm, targets=t)
    a = derta_loss(lm, batch, chunk_size=chunk_size, **kw)
    b = naive_loss(lm, batch, **kw)
    for x, y in [(a.loss, b.loss), (a.loss_mle, b.loss_mle), (a.loss_rto, b.loss_rto), (a.loss_pref, b.loss_pref)]:
        assert float(x) == pytest.approx(float(y), abs=1e-5)
    assert (a.n_mle, a.n_rto) == (b.n_mle, b.n_rto)


@pytest.mark.parametrize("transition", ["rto", "pref", "none"])
@pytest.mark.parametrize("fused", [True, False])
def test_chunked_gradients_equal_naive(lm, ref_lm, transition, fused):
    """The fused head (gradient computed in forward) and the generic checkpointed chunks both
    give the naive gradient, for every loss form."""
    m = copy.deepcopy(lm)
    batch = random_batch(m.config.vocab_size)
    t = build_targets(batch, rto_keep=0.7, seed=1, use_rto=transition != "none")
    kw = dict(refusal_id=SORRY, transition=transition, w_mle=0.8, w_rto=1.5, beta=0.7, ref_lm=ref_lm, targets=t)
    a = derta_loss(m, batch, chunk_size=6, fused=fused, **kw)
    a.loss.backward()
    g_chunked = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    b = naive_loss(m, batch, **kw)
    b.loss.backward()
    assert float(a.loss) == pytest.approx(float(b.loss), abs=1e-5)
    for n, p in m.named_parameters():
        assert torch.allclose(g_chunked[n], p.grad, atol=1e-5), n


def test_micro_batches_with_global_denominators_add_up_to_the_whole_batch(lm):
    """Gradient accumulation is exact: each micro-batch is normalised by the global counts."""
    m = copy.deepcopy(lm)
    batch = random_batch(m.config.vocab_size, B=4, seed=5)
    whole = derta_loss(m, batch, refusal_id=SORRY, w_rto=2.0)
    whole.loss.backward()
    g_whole = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    halves = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2)]
    ts = [build_targets(h) for h in halves]
    denom = Denominators(sum(t.n_mle for t in ts), sum(t.n_rto for t in ts))
    total = 0.0
    for h, t in zip(halves, ts):
        out = derta_loss(m, h, refusal_id=SORRY, w_rto=2.0, targets=t, denom=denom)
        out.loss.backward()
        total += float(out.loss)
    assert total == pytest.approx(float(whole.loss), abs=1e-5)
    for n, p in m.named_parameters():
        assert torch.allclose(g_whole[n], p.grad, atol=1e-6), n


# --------------------------------------------------------------------------- RTO keep-rate
def test_rto_keep_fraction_per_sample_and_reproducible():
    L = 260
    mask = torch.zeros(2, L, dtype=torch.bool)
    pos = torch.arange(L).repeat(2, 1)
    # row 0: one document with 200 RTO positions; row 1: three documents with 10, 3 and 1.
    mask[0, 30:230] = True
    pos[1, 100:] = torch.arange(L - 100)
    pos[1, 200:] = torch.arange(L - 200)
    mask[1, 50:60] = True
    mask[1, 150:153] = True
    mask[1, 210] = True
    kept = keep_rto_positions(mask, 0.05, seed=11, position_ids=pos)
    assert not (kept & ~mask).any()  # a subset
    assert int(kept[0].sum()) == 10  # 5% of 200
    docs = document_ids(pos)
    per_doc = [int((kept[1] & (docs[1] == d)).sum()) for d in range(3)]
    assert per_doc == [1, 1, 1]  # at least one per sample that has any
    kept50 = keep_rto_positions(mask, 0.5, seed=11, position_ids=pos)
    assert [int((kept50[1] & (docs[1] == d)).sum()) for d in range(3)] == [5, 2, 1]  # round(1.5) = 2
    # Reproducible for a seed, different for another; keep=1 is the identity.
    assert torch.equal(kept, keep_rto_positions(mask, 0.05, seed=11, position_ids=pos))
    assert not torch.equal(kept, keep_rto_positions(mask, 0.05, seed=12, position_ids=pos))
    assert torch.equal(keep_rto_positions(mask, 1.0, seed=11, position_ids=pos), mask)


def test_rto_keep_changes_the_rto_count_only():
    batch = random_batch(100, B=3)
    full, kept = build_targets(batch, rto_keep=1.0), build_targets(batch, rto_keep=0.25, seed=2)
    assert kept.n_mle == full.n_mle and 0 < kept.n_rto < full.n_rto


# --------------------------------------------------------------------------- derta_pref
@pytest.mark.parametrize("normalize", ["token_mean", "per_term"])
def test_pref_loss_equals_hand_computation(lm, ref_lm, normalize):
    batch = random_batch(lm.config.vocab_size, packed=False, seed=7)
    beta = 0.25
    out = derta_loss(lm, batch, refusal_id=SORRY, transition="pref", w_mle=0.0, w_rto=1.0, beta=beta, ref_lm=ref_lm,
                     normalize=normalize)
    total, n = 0.0, 0
    with torch.no_grad():
        for b in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][b : b + 1]
            lp = torch.log_softmax(lm(input_ids=ids).logits[0].double(), -1)
            rp = torch.log_softmax(ref_lm(input_ids=ids).logits[0].double(), -1)
            for t in range(1, ids.shape[1]):
                if not batch["rto_mask"][b, t]:
                    continue
                harm = int(ids[0, t])  # the dispreferred token: continuing the harmful response
                margin = (float(lp[t - 1, SORRY]) - float(lp[t - 1, harm])) - (float(rp[t - 1, SORRY]) - float(rp[t - 1, harm]))
                total += -math.log(1.0 / (1.0 + math.exp(-beta * margin)))
                n += 1
    assert out.n_rto == n
    assert float(out.loss_pref) == pytest.approx(total / n, abs=1e-5)
    # token_mean: the MLE tokens (weight 0 here) still count in the one shared denominator
    d = n if normalize == "per_term" else n + out.n_mle
    assert float(out.loss) == pytest.approx(total / d, abs=1e-5)
    # Policy == reference: every margin is 0 and the loss is log 2.
    same = derta_loss(lm, batch, refusal_id=SORRY, transition="pref", w_mle=0.0, beta=beta, ref_lm=lm)
    assert float(same.loss_pref) == pytest.approx(math.log(2.0), abs=1e-6)


def test_pref_with_lora_uses_the_base_model_as_reference(lm):
    """With peft the reference is the same model with adapters disabled: at LoRA init (B = 0)
    policy == reference, so the preference loss is exactly log 2."""
    from derta.config import LoraConfig
    from derta.models import apply_lora

    peft_model = apply_lora(copy.deepcopy(lm), LoraConfig(r=4, alpha=8, dropout=0.0))
    batch = random_batch(lm.config.vocab_size, seed=9)
    out = derta_loss(peft_model, batch, refusal_id=SORRY, transition="pref", w_mle=0.0)
    assert float(out.loss_pref) == pytest.approx(math.log(2.0), abs=1e-6)
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


# --------------------------------------------------------------------------- packing
def test_packed_rows_attend_within_documents_only(lm):
    """transformers 5 (sdpa, CPU) builds a block-diagonal causal mask from position_ids when
    attention_mask is None and there is no cache: a packed row's hidden states equal those of
    its documents run alone."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 500, (1, 9), generator=g), torch.randint(0, 500, (1, 6), generator=g)
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        packed = hidden_states(lm, ids, pos)
        alone_a, alone_b = hidden_states(lm, a, None), hidden_states(lm, b, None)
    assert torch.allclose(packed[:, :9], alone_a, atol=1e-5)
    assert torch.allclose(packed[:, 9:], alone_b, atol=1e-5)


# --------------------------------------------------------------------------- training math
def test_loss_falls_on_the_tiny_model(lm, tiny_tokenizer):
    from derta.models import refusal_token_id

    m = copy.deepcopy(lm).train()
    sorry = refusal_token_id(tiny_tokenizer)
    rows = to_rows(demo_samples(tiny_tokenizer, 4, 4), 128, tiny_tokenizer.pad_token_id, packing=True)
    batch = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = derta_loss(m, batch, refusal_id=sorry, chunk_size=64)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append((float(out.loss_mle), float(out.loss_rto)))
    assert losses[-1][0] < 0.8 * losses[0][0]
    assert losses[-1][1] < 0.5 * losses[0][1]


def test_step_plan_and_schedule():
    from derta.config import ConfigError
    from derta.train.loop import lr_factor, step_plan, steps_for

    # The paper's recipe: ceil(samples / global_batch) steps per epoch (HF Trainer, drop_last False).
    assert steps_for(1129, 128, 2, None) == 18 and steps_for(1129, 128, 1.5, None) == 14
    assert steps_for(128, 128, 1, None) == 1 and steps_for(129, 128, 1, None) == 2 and steps_for(5, 128, 3, 7) == 7
    # 1000 samples, 4 workers x micro 4: rows per step come from pack_steps (multiples of 16).
    per_step = [32, 32, 48, 32, 32, 32, 32, 16]
    p = step_plan(per_step, world=4, micro_batch=4, global_batch=128, samples=1000, epochs=2, max_steps=None,
                  warmup_ratio=0.03)
    assert p.micro_per_step == (2, 2, 3, 2, 2, 2, 2, 1) and p.accum == 3 and p.global_batch == 128
    assert p.batches_per_epoch == 16 and p.steps_per_epoch == 8 and p.total_steps == 16 and p.warmup_steps == 0
    assert [p.accum_at(s) for s in (0, 2, 7, 8, 10)] == [2, 3, 1, 2, 3]  # the same layout every epoch
    assert step_plan([4], 2, 2, 128, 10, 1.5, None, 0.0).total_steps == 2
    assert step_plan([4, 4], 2, 2, 8, 9, 1, 7, 0.0).total_steps == 7
    assert [round(lr_factor(s, 2, 10), 4) for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, 0.0381]
    with pytest.raises(ValueError):
        step_plan([6], world=2, micro_batch=2, global_batch=8, samples=3, epochs=1, max_steps=None, warmup_ratio=0)
    with pytest.raises(ValueError):  # 9 samples in batches of 8 are 2 steps, not 1
        step_plan([4], world=2, micro_batch=2, global_batch=8, samples=9, epochs=1, max_steps=None, warmup_ratio=0)
    with pytest.raises(ConfigError):
        step_plan([], 2, 2, 8, 0, 1, None, 0)


def test_plan_stages_joint_and_sequential():
    from derta.config import validate_config
    from derta.train.trainer import plan_stages

    joint = plan_stages(validate_config({"train": {"method": "derta"}}))
    assert [(s["name"], s["transition"], s["kinds"]) for s in joint] == [("joint", "rto", None)]
    seq = plan_stages(validate_config({"train": {"method": "derta_pref", "schedule": "sequential"}}))
    assert [(s["transition"], s["kinds"]) for s in seq] == [("none", ["helpful", "vanilla", "prefix"]), ("pref", ["rto", "pref"])]
    sft = plan_stages(validate_config({"train": {"method": "vanilla", "schedule": "sequential"}}))
    assert len(sft) == 1 and sft[0]["transition"] == "none"
