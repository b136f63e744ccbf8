"""FSDP2 on 2 CPU processes over gloo, without Ray: rank-0 weight broadcast into meta-device
shards, and exact distributed loss normalisation (the sharded gradient of two half-batches
equals the single-process gradient of the whole batch, through the fused head)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from _fixtures import tiny_model_dir  # noqa: F401

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    B, L = 4, 33
    ids = torch.randint(0, vocab, (B, L), generator=g)
    labels = torch.full((B, L), -100)
    rto = torch.zeros(B, L, dtype=torch.bool)
    labels[0, 5:30], labels[3, 2:9] = ids[0, 5:30], ids[3, 2:9]
    rto[1, 10:32], rto[2, 4:12] = True, True  # uneven counts per rank
    pos = torch.arange(L).repeat(B, 1)
    pos[2, 16:] = torch.arange(L - 16)
    return {"input_ids": ids, "labels": labels, "rto_mask": rto, "position_ids": pos}


def _worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    from derta.config import FsdpConfig
    from derta.train import fsdp
    from derta.train.losses import Denominators, DertaObjective, LossSpec, build_targets, denominators

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        if rank == 0:
            lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        else:
            lm = fsdp.meta_model(model_dir, torch.float32)
        objective = DertaObjective(lm.train())
        init = fsdp.detach_to_meta(objective) if rank == 0 else fsdp.RankZeroInit({}, {})
        model, mode = fsdp.wrap(objective, lm, FsdpConfig(), use_gpu=False, device=torch.device("cpu"), init=init)
        assert mode == "fsdp2"

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        buffers = {n: b.clone() for n, b in model.named_buffers()}

        batch = _batch(lm.config.vocab_size)
        half = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
        t = build_targets(half)
        counts = torch.tensor([t.n_mle, t.n_rto], dtype=torch.float64)
        dist.all_reduce(counts)
        # What the training loop does: the fused head inside the FSDP root's forward.
        # (normalize token_mean, the default: one denominator, the global count of all targets)
        denom = Denominators(float(counts[0]), float(counts[1]))
        spec = LossSpec("rto", 1.0, 0.5, 0.1, *denominators(t, denom, "token_mean"))
        loss, _ = model(half, t, 7, 5, spec=spec)
        (loss * 2).backward()  # FSDP averages gradients over the 2 ranks
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"full": full, "buffers": buffers, "grads": grads, "loss": float(loss)}, os.path.join(out_dir, "rank0.pt"))
        else:
            torch.save({"buffers": buffers}, os.path.join(out_dir, "rank1.pt"))
    finally:
        dist.destroy_process_group()


def test_rank0_broadcast_and_sharded_gradient_match_single_process(tiny_model_dir, tmp_path):
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    from derta.train.losses import DertaObjective, derta_loss

    mp.start_processes(_worker, args=(_free_port(), tiny_model_dir, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    ref = DertaObjective(lm)
    # Rank 1 started on the meta device: after the broadcast every weight and buffer
    # (non-persistent rotary frequencies included) equals the checkpoint's on both ranks.
    for k, v in ref.state_dict().items():
        assert torch.equal(r0["full"][k], v), k
    for n, b in ref.named_buffers():
        assert torch.equal(r0["buffers"][n], b) and torch.equal(r1["buffers"][n], b), n

    out = derta_loss(lm, _batch(lm.config.vocab_size), refusal_id=7, w_mle=1.0, w_rto=0.5, chunk_size=5)
    out.loss.backward()
    assert r0["loss"] == pytest.approx(float(out.loss), abs=1e-5)
    for n, p in ref.named_parameters():
        assert torch.allclose(r0["grads"][n], p.grad, atol=1e-6), n
