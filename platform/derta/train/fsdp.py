"""Sharding for the training workers: FSDP2 (`fully_shard`) per decoder layer then the root,
bf16 mixed precision on GPU, activation checkpointing, and a DDP fallback.

FSDP2 is called directly in the worker loop (not through an accelerator library) so the same
code runs on 2 CPU workers over gloo in the tests and on GPU nodes over NCCL. LoRA adapters
are applied BEFORE sharding: FSDP2 shards frozen base weights and trainable adapters side by
side in the same parameter groups (it supports mixed requires_grad per group).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from derta.config import FsdpConfig

log = logging.getLogger(__name__)

Mode = Literal["fsdp2", "ddp", "none"]


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The transformer blocks of an HF causal LM (also through peft): one FSDP unit each.

    Uses the model's own `_no_split_modules` class names (what HF uses for device maps), and
    falls back to `get_decoder().layers`.
    """
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in names] if names else []
    if not layers:
        layers = list(getattr(lm.get_decoder(), "layers", []))
    if not layers:
        raise ValueError(f"cannot find decoder layers in {type(lm).__name__} to shard")
    return layers


def enable_activation_checkpointing(lm: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant: works with FSDP2 and frozen
    LoRA bases without `enable_input_require_grads`)."""
    target = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(target, "config"):
        target.config.use_cache = False


def mixed_precision_policy(use_gpu: bool, enabled: bool, param_dtype: torch.dtype = torch.bfloat16):
    """bf16 compute with float32 gradient reduction on GPU; None (full float32) on CPU."""
    if not (use_gpu and enabled):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def shard_fsdp2(root: nn.Module, lm: nn.Module, fcfg: FsdpConfig, use_gpu: bool, param_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """fully_shard every decoder layer of `lm`, then `root` (which owns embeddings, norm and
    lm_head, and runs the loss in its forward)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"reshard_after_forward": fcfg.reshard_after_forward}
    mp = mixed_precision_policy(use_gpu, fcfg.mixed_precision, param_dtype)
    if mp is not None:
        kwargs["mp_policy"] = mp
    for layer in decoder_layers(lm):
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    return root


# --------------------------------------------------------------------------- rank-0 init
# Loading a 70B model on every rank of a node would need 8 copies in CPU memory. Instead rank 0
# loads the real weights, the other ranks build the architecture on the meta device (no
# memory), everyone shards, and rank 0 broadcasts the full state dict into the shards.


def meta_model(like_path: str, dtype: torch.dtype, trust_remote_code: bool = False, attn_implementation: str | None = None):
    """The architecture of an HF causal LM on the meta device (no weights allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(like_path, trust_remote_code=trust_remote_code)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)


@dataclass
class RankZeroInit:
    """Rank 0's weights (full state dict + every buffer, non-persistent ones included, such as
    rotary frequencies) waiting to be broadcast into the sharded module; empty elsewhere."""

    state_dict: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]


def detach_to_meta(module: nn.Module) -> RankZeroInit:
    """Take module's tensors out (rank 0) and leave it on the meta device, like the others."""
    sd = {k: v.detach() for k, v in module.state_dict().items()}
    bufs = {n: b.detach().clone() for n, b in module.named_buffers()}
    module.to("meta")
    return RankZeroInit(sd, bufs)


def _broadcast_buffers(root: nn.Module, init: RankZeroInit) -> None:
    rank = dist.get_rank()
    for name, buf in root.named_buffers():
        if rank == 0:
            key = name if name in init.buffers else name.removeprefix("module.")
            buf.copy_(init.buffers[key].to(buf.device, buf.dtype))
        dist.broadcast(buf, src=0)


def _materialize_fsdp2(root: nn.Module, init: RankZeroInit, device: torch.device) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    root.to_empty(device=device)
    sd = dict(init.state_dict) if dist.get_rank() == 0 else {}  # DSD replaces entries in place
    set_model_state_dict(root, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    _broadcast_buffers(root, init)


def materialize_local(root: nn.Module, init: RankZeroInit, device: torch.device) -> None:
    """Before DDP: real tensors everywhere, rank 0's values (DDP then broadcasts rank 0's
    parameters and buffers at construction)."""
    root.to_empty(device=device)
    if dist.get_rank() == 0:
        root.load_state_dict(init.state_dict, strict=True)
        for name, buf in root.named_buffers():
            buf.copy_(init.buffers[name].to(buf.device, buf.dtype))


def wrap(root: nn.Module, lm: nn.Module, fcfg: FsdpConfig, *, use_gpu: bool, device: torch.device,
         param_dtype: torch.dtype = torch.bfloat16, init: RankZeroInit | None = None) -> tuple[nn.Module, Mode]:
    """Shard `root` for data-parallel training; returns (module, mode).

    FSDP2 when train.fsdp.enabled (also with one worker); DDP when disabled or when
    fully_shard fails on this combination (logged); unwrapped without a process group or
    with one worker and FSDP disabled. With `init`, root is on the meta
    device and its weights come from rank 0 (see RankZeroInit).
    """
    initialized = dist.is_available() and dist.is_initialized()
    distributed = initialized and dist.get_world_size() > 1
    # FSDP2 also on a single worker: that is where bf16 mixed precision comes from on one GPU.
    if fcfg.enabled and initialized:
        try:
            sharded = shard_fsdp2(root, lm, fcfg, use_gpu, param_dtype)
        except Exception as e:  # pragma: no cover - depends on torch build / backend
            log.warning("FSDP2 fully_shard failed (%s: %s); falling back to DDP", type(e).__name__, e)
            print(f"[derta.train] FSDP2 unavailable here ({type(e).__name__}: {e}); using DDP instead", flush=True)
        else:
            if init is not None:
                _materialize_fsdp2(sharded, init, device)
            return sharded, "fsdp2"
    if init is not None:
        materialize_local(root, init, device)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(root.to(device), device_ids=ids), "ddp"
    return root.to(device), "none"


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm (DTensor-aware under FSDP2) and return it as a float."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
