"""Prefix-length distributions: reproducible per row, right support and mean; and the mix plan."""

from __future__ import annotations

import statistics

import pytest

from derta.config import MixConfig, PrefixConfig
from derta.data import mix as M
from derta.data.prefix import draw_units, histogram, prefix_tokens, row_rng, row_uniform

N = 4000


def _draws(cfg: PrefixConfig, n: int, seed: int = 0) -> list[int]:
    return [prefix_tokens(cfg, seed, f"safety:{i}", n) for i in range(N)]


def test_reproducible_per_row_and_seed():
    cfg = PrefixConfig(dist="uniform", unit="token")
    a = [prefix_tokens(cfg, 0, f"safety:{i}", 50) for i in range(200)]
    b = [prefix_tokens(cfg, 0, f"safety:{i}", 50) for i in reversed(range(200))][::-1]
    assert a == b  # order / partitioning does not matter
    c = [prefix_tokens(cfg, 1, f"safety:{i}", 50) for i in range(200)]
    assert a != c  # the seed does
    assert row_rng(3, "x").random() == row_rng(3, "x").random()
    assert 0 <= row_uniform(0, "a", "mix") < 1 and row_uniform(0, "a", "mix") != row_uniform(0, "a", "holdout")


def test_public():
    n = 40
    ks = _draws(PrefixConfig(dist="public", unit="token", p_zero=1 / 3), n)
    nonzero = [k for k in ks if k]
    assert set(ks) <= {0} | set(range(1, n - 1))  # 0 or [1, n-2]
    assert abs(ks.count(0) / N - 1 / 3) < 0.03
    assert abs(statistics.mean(nonzero) - (n - 1) / 2) < 1.0
    assert min(nonzero) == 1 and max(nonzero) == n - 2
    assert _draws(PrefixConfig(dist="public", unit="token", p_zero=0.0), 3)[:50] == [1] * 50  # [1, max(1, n-2)]


def test_uniform_beta_fixed_geometric():
    n = 30
    u = _draws(PrefixConfig(dist="uniform", unit="token"), n)
    assert set(u) == set(range(n + 1)) and abs(statistics.mean(u) - n / 2) < 0.6
    b = _draws(PrefixConfig(dist="beta", unit="token", beta_a=2.0, beta_b=5.0), n)
    assert min(b) >= 0 and max(b) <= n and abs(statistics.mean(b) - n * 2 / 7) < 0.5
    assert set(_draws(PrefixConfig(dist="fixed_fraction", fraction=0.25, unit="token"), n)) == {8}
    assert set(_draws(PrefixConfig(dist="fixed_fraction", fraction=1.0, unit="token"), n)) == {n}
    g = _draws(PrefixConfig(dist="geometric", geometric_p=0.2, unit="token"), 1000)
    assert min(g) == 0 and abs(statistics.mean(g) - 0.8 / 0.2) < 0.3
    assert max(_draws(PrefixConfig(dist="geometric", geometric_p=0.05, unit="token"), 5)) == 5  # capped at n


@pytest.mark.parametrize("dist", ["public", "uniform", "beta", "fixed_fraction", "geometric"])
def test_bounds_any_length(dist):
    cfg = PrefixConfig(dist=dist, unit="token")
    for n in range(0, 6):
        for i in range(50):
            assert 0 <= prefix_tokens(cfg, 0, f"s:{i}", n) <= n


def test_word_unit_converts_to_tokens():
    word_ends = [2, 3, 4, 6, 7, 9, 10, 11, 13]
    cfg = PrefixConfig(dist="fixed_fraction", fraction=1 / 3, unit="word")
    assert prefix_tokens(cfg, 0, "x", 13, word_ends) == 4  # 3 words = 4 tokens
    cfg = PrefixConfig(dist="public", unit="word")
    vals = {prefix_tokens(cfg, 0, f"x{i}", 13, word_ends) for i in range(500)}
    assert vals <= {0} | set(word_ends[:7])  # k in [1, 9-2] words
    with pytest.raises(ValueError):
        prefix_tokens(cfg, 0, "x", 13)


def test_draw_units_zero_length():
    assert draw_units(PrefixConfig(dist="uniform"), 0, row_rng(0, "x")) == 0


def test_histogram():
    h = histogram([0, 0, 1, 4, 5, 700])
    assert h["0"] == 2 and h["1-4"] == 2 and h["5-9"] == 1 and h["640+"] == 1 and sum(h.values()) == 6


# --------------------------------------------------------------------------- mix
def test_presets_and_auto():
    # the public recipe (default): every triple makes both kinds; disjoint halves for equal budgets
    assert M.resolve_mix(MixConfig(), "derta") == ("derta", {"rto": 1.0, "pref": 0, "prefix": 1.0, "vanilla": 0, "helpful": 1.0})
    assert M.resolve_mix(MixConfig(triples="disjoint"), "derta") == (
        "derta", {"rto": 0.5, "pref": 0, "prefix": 0.5, "vanilla": 0, "helpful": 1.0})
    assert M.resolve_mix(MixConfig(preset="recaug", helpful=100), "derta")[1]["prefix"] == 1.0
    assert M.resolve_mix(MixConfig(preset="recaug", helpful=100), "derta")[1]["helpful"] == 100
    assert M.resolve_mix(MixConfig(triples="disjoint"), "derta_pref")[1]["pref"] == 0.5
    assert M.resolve_mix(MixConfig(), "sft")[1] == {"rto": 0, "pref": 0, "prefix": 0, "vanilla": 0, "helpful": 1.0}
    custom = MixConfig(preset="custom", prefix=3000, rto=3000)
    assert M.resolve_mix(custom, "sft")[1]["rto"] == 3000


def test_plan_exact_and_disjoint():
    for n in (1, 7, 10, 213):
        plan = M.plan_kinds({"rto": 0.5, "prefix": 0.5}, M.SAFETY_ORDER, n)
        got = [plan.kinds_at(r) for r in range(n)]
        assert all(len(k) == 1 for k in got)  # every triple used once, never twice
        assert got.count(["rto"]) == (n + 1) // 2 and got.count(["prefix"]) == n // 2


def test_plan_counts_overlap_and_clamp():
    plan = M.plan_kinds({"rto": 1.0, "prefix": 1.0}, M.SAFETY_ORDER, 10)
    assert all(plan.kinds_at(r) == ["rto", "prefix"] for r in range(10))  # public recipe overlap
    plan = M.plan_kinds({"rto": 3, "prefix": 4}, M.SAFETY_ORDER, 10)
    assert plan.counts() == {"rto": 3, "prefix": 4}
    assert [len(plan.kinds_at(r)) for r in range(10)] == [1] * 7 + [0] * 3
    plan = M.plan_kinds({"rto": 8, "prefix": 8}, M.SAFETY_ORDER, 10)  # wraps: overlap only where needed
    assert sum(len(plan.kinds_at(r)) for r in range(10)) == 16
    plan = M.plan_kinds({"vanilla": 50}, M.SAFETY_ORDER, 10)
    assert plan.counts() == {"vanilla": 10} and "only 10 rows" in plan.warnings[0]
