"""Sharding for the training workers: FSDP2 (`fully_shard`) per decoder layer then the root,
bf16 mixed precision on GPU, activation checkpointing, and a DDP fallback.

FSDP2 is called directly in the worker loop (not through an accelerator library) so the same
code runs on 2 CPU workers over gloo in the tests and on GPU nodes over NCCL. LoRA adapters
are applied BEFORE sharding: FSDP2 shards frozen base weights and trainable adapters side by
side in the same parameter groups (it supports mixed requires_grad per group).
"""

from __future__ import annotations

import logging
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


def wrap(root: nn.Module, lm: nn.Module, fcfg: FsdpConfig, *, use_gpu: bool, device: torch.device,
         param_dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, Mode]:
    """Shard `root` for data-parallel training; returns (module, mode).

    FSDP2 when train.fsdp.enabled; DDP when disabled or when fully_shard fails on this
    combination (logged); unwrapped with a single process.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if fcfg.enabled and distributed:
        try:
            return shard_fsdp2(root, lm, fcfg, use_gpu, param_dtype), "fsdp2"
        except Exception as e:  # pragma: no cover - depends on torch build / backend
            log.warning("FSDP2 fully_shard failed (%s: %s); falling back to DDP", type(e).__name__, e)
            print(f"[derta.train] FSDP2 unavailable here ({type(e).__name__}: {e}); using DDP instead", flush=True)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(root, device_ids=ids), "ddp"
    return root, "none"


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm (DTensor-aware under FSDP2) and return it as a float."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
