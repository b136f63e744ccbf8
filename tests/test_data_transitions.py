"""Transition samples, truncation and packing: hand-checked cases + hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
from _fixtures import tiny_model_dir, tiny_tokenizer  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derta.config import DataConfig, PrefixConfig
from derta.data import transitions as T
from derta.data.templates import make_template
from derta.data.tokenize import SampleBuilder, first_fit, fit_prefix, fit_rto, pack_rows

ids = st.lists(st.integers(4, 900), min_size=1, max_size=30)


# --------------------------------------------------------------------------- pure kinds
def test_kinds_by_hand():
    p, h, s, e = [1, 2], [7, 8, 9], [5, 6], [3]
    pre = T.prefix(p, h[:2], s, e, "safety:3")
    assert pre.input_ids == [1, 2, 7, 8, 5, 6, 3]
    assert pre.labels == [-100, -100, -100, -100, 5, 6, 3]
    assert pre.rto_mask == [False] * 7 and pre.prefix_len == 2 and pre.kind == "prefix"
    r = T.rto(p, h, "safety:3")
    assert r.input_ids == [1, 2, 7, 8, 9] and r.labels == [-100] * 5
    assert r.rto_mask == [False, False, True, True, True] and r.prefix_len == 3
    assert T.pref(p, h, "x").kind == "pref" and T.pref(p, h, "x").rto_mask == r.rto_mask
    hp = T.helpful(p, s, e, "helpful:0")
    assert hp.labels == [-100, -100, 5, 6, 3] and hp.prefix_len == 0
    assert T.vanilla(p, s, e, "v").labels == hp.labels
    assert set(r.row()) == {"kind", "input_ids", "labels", "rto_mask", "prefix_len", "source_id"}
    with pytest.raises(ValueError):
        T.rto(p, [], "x")


@given(prompt=ids, harmful=ids, safe=ids, end=st.lists(st.integers(0, 3), min_size=1, max_size=2), data=st.data())
def test_prefix_and_rto_properties(prompt, harmful, safe, end, data):
    k = data.draw(st.integers(0, len(harmful)))
    s = T.prefix(prompt, harmful[:k], safe, end, "x")
    n_ctx = len(prompt) + k
    assert len(s.input_ids) == len(s.labels) == len(s.rto_mask)
    assert all(x == -100 for x in s.labels[:n_ctx])  # never the prompt or the harmful prefix
    assert s.labels[n_ctx:] == safe + end  # exactly the safe response + end of turn
    assert 0 <= s.prefix_len <= len(harmful)
    r = T.rto(prompt, harmful, "x")
    assert [t for t, m in enumerate(r.rto_mask) if m] == list(range(len(prompt), len(prompt) + len(harmful)))
    assert all(x == -100 for x in r.labels)


# --------------------------------------------------------------------------- truncation
def test_fit_rules():
    assert fit_prefix(10, 5, 6, 1, 100, "trim_prefix") == 5
    assert fit_prefix(10, 5, 6, 1, 20, "trim_prefix") == 3
    assert fit_prefix(10, 5, 6, 1, 20, "skip") is None
    assert fit_prefix(10, 5, 12, 1, 20, "trim_prefix") is None  # safe part alone does not fit
    assert fit_prefix(10, 0, 9, 1, 20, "trim_prefix") == 0
    assert fit_rto(10, 30, 100, "trim_prefix") == 30
    assert fit_rto(10, 30, 20, "trim_prefix") == 10
    assert fit_rto(10, 30, 20, "skip") is None
    assert fit_rto(20, 30, 20, "trim_prefix") is None  # no room for a single rto position


def _rec(sid, kinds, q="How do I bake bread?", harmful="Sure, here is how. Step 1: take the jar. Step 2: go.",
         safe="Sorry, I can't help.", response="Sure, here is how."):
    return {"source_id": sid, "query": q, "safe": safe, "harmful": harmful, "response": response, "kinds": kinds}


def test_builder_truncation_counts(tiny_tokenizer):
    t = make_template("chat_template", tiny_tokenizer)
    # prompt 23 tokens; safe 7 tokens first in the turn, 8 after a prefix (+1 eot); harmful 19
    pc = PrefixConfig(dist="fixed_fraction", fraction=1.0, unit="token")
    b = SampleBuilder(t, DataConfig(template="chat_template", max_len=40, prefix=pc))
    recs = [_rec("safety:0", ["prefix", "rto"]), _rec("helpful:0", ["helpful"])]
    samples, skips = b.build(recs)
    pre, rto, helpful = samples
    assert len(pre) == 40 and pre.trimmed and pre.prefix_len == 40 - 23 - 9  # 8 of 19 kept
    assert len(rto) == 40 and rto.trimmed and sum(rto.rto_mask) == 17
    assert not helpful.trimmed and not skips
    b = SampleBuilder(t, DataConfig(template="chat_template", max_len=40, prefix=pc, truncation="skip"))
    samples, skips = b.build(recs)
    assert [s.kind for s in samples] == ["helpful"]
    assert skips == {"too_long:prefix": 1, "too_long:rto": 1}
    b = SampleBuilder(t, DataConfig(template="chat_template", max_len=28, prefix=pc))
    samples, skips = b.build(recs)  # safe part cannot fit; rto keeps 5 positions
    assert [s.kind for s in samples] == ["rto"] and sum(samples[0].rto_mask) == 5
    assert skips == {"too_long:prefix": 1, "too_long:helpful": 1}


def test_trim_to_zero_prefix_restarts_the_turn(tiny_tokenizer):
    t = make_template("chat_template", tiny_tokenizer)
    pc = PrefixConfig(dist="fixed_fraction", fraction=1.0, unit="token")
    (s,), _ = SampleBuilder(t, DataConfig(max_len=31, prefix=pc)).build([_rec("safety:0", ["prefix"])])
    (v,), _ = SampleBuilder(t, DataConfig(max_len=31)).build([_rec("safety:0", ["vanilla"])])
    assert s.prefix_len == 0 and s.trimmed and s.input_ids == v.input_ids  # "Sorry", not " S orry"


words = st.lists(st.sampled_from(["Sure", "step", "the", "jar", "Sorry,", "I", "can't", "bake", "1:", "zorblax", "help."]), min_size=1, max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(q=words, harmful=words, safe=words, seed=st.integers(0, 5), dist=st.sampled_from(["public", "uniform", "beta", "geometric"]),
       unit=st.sampled_from(["token", "word"]), template=st.sampled_from(["chat_template", "inst", "raw"]), max_len=st.integers(30, 120))
def test_builder_properties(tiny_tokenizer, q, harmful, safe, seed, dist, unit, template, max_len):
    t = make_template(template, tiny_tokenizer)
    data = DataConfig(template=template, max_len=max_len, seed=seed, prefix=PrefixConfig(dist=dist, unit=unit))
    rec = _rec("safety:1", ["prefix", "rto", "pref", "vanilla"], q=" ".join(q), harmful=" ".join(harmful), safe=" ".join(safe))
    samples, skips = SampleBuilder(t, data).build([rec])
    n_prompt = len(t.prompt_ids([rec["query"]])[0])
    harm_ids = t.encode([t.lead + rec["harmful"]])[0]
    assert len(samples) + sum(skips.values()) == 4
    for s in samples:
        assert len(s.input_ids) == len(s.labels) == len(s.rto_mask) <= max_len
        assert all(x == -100 for x in s.labels[: n_prompt + (s.prefix_len if s.kind == "prefix" else 0)])
        if s.kind == "prefix":
            assert 0 <= s.prefix_len <= len(harm_ids)
            assert s.input_ids[n_prompt : n_prompt + s.prefix_len] == harm_ids[: s.prefix_len]
            assert s.labels[-1] == s.input_ids[-1] == t.end_ids[-1]  # end of turn is trained
            assert not any(s.rto_mask)
        if s.kind in ("rto", "pref"):
            assert all(x == -100 for x in s.labels)
            assert [i for i, m in enumerate(s.rto_mask) if m] == list(range(n_prompt, len(s)))
            assert s.input_ids[n_prompt:] == harm_ids[: len(s) - n_prompt] and s.prefix_len == len(s) - n_prompt > 0


# --------------------------------------------------------------------------- packing
def _segments(row: dict, r: int) -> list[tuple[int, int]]:
    pos = row["position_ids"][r]
    starts = [i for i in range(len(pos)) if pos[i] == 0]
    return [(a, b) for a, b in zip(starts, starts[1:] + [len(pos)])]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(2, 40), min_size=1, max_size=30), L=st.integers(40, 90), packing=st.booleans())
def test_packing_preserves_samples_and_boundaries(lengths, L, packing):
    rng = np.random.default_rng(len(lengths) * 1000 + L)
    samples = []
    for i, n in enumerate(lengths):
        inp = rng.integers(10, 500, n).tolist()
        k = int(rng.integers(1, n))
        samples.append({"input_ids": inp, "labels": [-100] * k + inp[k:], "rto_mask": [False] * k + [bool(x % 2) for x in inp[k:]]})
    rows = pack_rows(samples, L, pad_id=3, packing=packing)
    assert all(rows[c].shape[1] == L for c in rows)
    groups = first_fit(lengths, L) if packing else [[i] for i in range(len(samples))]
    assert sorted(i for g in groups for i in g) == list(range(len(samples)))  # each sample exactly once
    assert len(rows["input_ids"]) == len(groups)
    for r, group in enumerate(groups):
        segs = _segments(rows, r)
        for (a, b), i in zip(segs, group):  # samples in order, each a document of its own
            s = samples[i]
            assert b - a == len(s["input_ids"])
            assert rows["input_ids"][r, a:b].tolist() == s["input_ids"]
            assert rows["labels"][r, a:b].tolist() == s["labels"]
            assert rows["rto_mask"][r, a:b].tolist() == s["rto_mask"]
        used = sum(len(samples[i]["input_ids"]) for i in group)
        assert len(segs) == len(group) + (used < L)
        assert (rows["input_ids"][r, used:] == 3).all() and (rows["labels"][r, used:] == -100).all()
        assert not rows["rto_mask"][r, used:].any()
        assert rows["position_ids"][r, used:].tolist() == list(range(L - used))


def test_first_fit_by_hand():
    assert first_fit([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    with pytest.raises(ValueError):
        first_fit([11], 10)
