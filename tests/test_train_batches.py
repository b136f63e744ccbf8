"""train.global_batch counts samples, packed or not (data/tokenize.py pack_steps): pure
functions, no Ray (the Ray layout, pipeline.step_datasets, is covered in test_train_ray.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from derta.data.tokenize import pack_rows, pack_steps, step_groups, unpack_rows, worker_rows
from derta.train.loop import step_plan, steps_for


def make_samples(n: int, seed: int = 0) -> list[dict]:
    """n samples of random lengths; sample i has input_ids all i + 1 (so rows can be traced),
    half MLE (labels on the tail), half RTO (rto_mask on the tail)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(5, 60))
        ids = np.full(L, i + 1, dtype=np.int64)
        labels = np.full(L, -100, dtype=np.int64)
        rto = np.zeros(L, dtype=bool)
        if i % 2:
            rto[3:] = True
        else:
            labels[3:] = ids[3:]
        out.append({"input_ids": ids, "labels": labels, "rto_mask": rto})
    return out


def samples_in(rows: dict, lo: int, hi: int) -> list[int]:
    """Sample ids (input_ids value - 1) of rows lo..hi, in order, from their documents."""
    sub = {k: v[lo:hi] for k, v in rows.items()}
    return [int(s["input_ids"][0]) - 1 for s in unpack_rows(sub)]


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("n,B", [(1129, 128), (100, 32), (64, 32), (7, 128)])
def test_each_step_holds_global_batch_samples(packing, n, B):
    samples = make_samples(n)
    world, micro = 2, 2
    rows, per_step = pack_steps(samples, B, 128, 0, packing, world * micro)
    assert len(per_step) == math.ceil(n / B) == steps_for(n, B, 1, None)
    assert all(r % (world * micro) == 0 and r > 0 for r in per_step)
    start, seen = 0, []
    for s, r in enumerate(per_step):
        ids = samples_in(rows, start, start + r)
        want = list(range(s * B, min(n, (s + 1) * B)))
        assert sorted(ids) == want  # B samples per step, the last the rest; never split across steps
        seen += ids
        start += r
    assert sorted(seen) == list(range(n)) and start == len(rows["input_ids"])
    # Samples survive the round trip unchanged.
    back = {int(x["input_ids"][0]) - 1: x for x in unpack_rows(rows)}
    for i in (0, n // 2, n - 1):
        for k in ("input_ids", "labels", "rto_mask"):
            assert np.array_equal(back[i][k], samples[i][k])
    plan = step_plan(per_step, world, micro, B, n, 2, None, 0.0)
    assert plan.total_steps == 2 * math.ceil(n / B)
    if packing and n == 1129:  # packing: far fewer rows than samples, the same number of steps
        assert len(rows["input_ids"]) < n / 3


def test_padding_rows_carry_no_targets_and_workers_split_each_step_evenly():
    rows, per_step = pack_steps(make_samples(10), 4, 64, 0, True, 4)
    assert per_step == [4, 4, 4]  # a few rows each, padded to 4 = 2 workers x micro 2
    empty = [i for i in range(12) if (rows["labels"][i] == -100).all() and not rows["rto_mask"][i].any()]
    assert empty and all((rows["position_ids"][i] == np.arange(64)).all() for i in empty)
    split = worker_rows(per_step, 2)
    assert split == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]
    assert [list(g) for g in step_groups(10, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_unpack_drops_padding_documents_only():
    samples = make_samples(6, seed=3)
    rows = pack_rows(samples, 200, 0, packing=True)
    back = unpack_rows(rows)
    assert [int(s["input_ids"][0]) for s in back] == [int(s["input_ids"][0]) for s in samples]  # first-fit keeps order here


def test_public_rule_makes_the_end_token_an_rto_target():
    """keep_rule public: the end-of-turn ids follow an rto sample's harmful response as RTO
    targets (the public code labels "<|end_of_text|>" with Sorry too); too long -> unchanged."""
    from derta.data.tokenize import with_rto_end
    from derta.data.transitions import rto

    s = rto([5, 6, 7], [20, 21, 22, 23], "x").row()
    out = with_rto_end(s, (2,), max_len=16)
    assert list(out["input_ids"]) == [5, 6, 7, 20, 21, 22, 23, 2]
    assert list(out["rto_mask"]) == [False] * 3 + [True] * 5 and (out["labels"] == -100).all()
    assert with_rto_end(s, (2,), max_len=7) is s and with_rto_end(s, (), max_len=16) is s


def test_training_rows_add_the_end_token_to_rto_samples_only():
    """The Ray Data batch fn of training_dataset (rto_end given, as the trainer asks in public
    mode): rto samples get the end ids as RTO targets, other kinds are untouched."""
    from derta.data.pipeline import _pack_batch

    obj = lambda xs: np.array([np.array(x) for x in xs], dtype=object)  # noqa: E731
    batch = {"kind": np.array(["rto", "helpful"], dtype=object), "input_ids": obj([[1, 2, 3], [4, 5, 6, 7]]),
             "labels": obj([[-100] * 3, [-100, -100, 6, 7]]), "rto_mask": obj([[False, True, True], [False] * 4])}
    rows = _pack_batch(batch, 16, 0, True, rto_end=(9,))
    assert list(rows["input_ids"][0][:8]) == [1, 2, 3, 9, 4, 5, 6, 7]
    assert list(rows["rto_mask"][0][:8].astype(int)) == [0, 1, 1, 1, 0, 0, 0, 0]
    assert list(rows["labels"][0][:8]) == [-100] * 6 + [6, 7]
    plain = _pack_batch(batch, 16, 0, True)
    assert list(plain["input_ids"][0][:7]) == [1, 2, 3, 4, 5, 6, 7]
