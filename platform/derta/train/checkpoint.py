"""Checkpoints for resume (torch.distributed.checkpoint, sharded) and the final export (one
Hugging Face directory at paths.model).

Resume checkpoints: every rank writes its own DCP shard into a private local directory and
hands it to `ray.train.report(checkpoint=...)`; Ray merges the ranks' directories into one
checkpoint under RunConfig.storage_path = paths.checkpoints (local, or s3:// through pyarrow)
and records it in its run snapshot, so `ray.train.get_checkpoint()` returns the newest one on
a worker-group retry (FailureConfig) and on a fresh `train()` with the same run directory.
A checkpoint holds model (for LoRA: adapters only) + optimizer shards, and `train_state.json`
(stage, step, data position, LR-scheduler state) from rank 0.

Export: the full state dict is gathered to rank 0 on CPU, loaded into a meta-device copy of
the architecture (no second copy of the weights), and written with save_pretrained + the
tokenizer; with LoRA the merged weights go to model/ and the adapter to model/adapter/.
Writes are atomic: a temp directory renamed into place (local) or uploaded after the old
prefix is cleared (s3).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from derta import storage

log = logging.getLogger(__name__)
STATE_FILE = "train_state.json"
ADAPTER_DIR = "adapter"
# Resume trust: rank 0 records each checkpoint it writes (a digest of the DCP metadata, which
# torch unpickles on load, and of train_state.json) with the run's config fingerprint in a
# ledger; resume loads only a checkpoint whose digest and fingerprint are recorded there.
LEDGER_ENV = "DERTA_CKPT_LEDGER"
FINGERPRINT_ENV = "DERTA_CKPT_FINGERPRINT"
DIGESTED = (".metadata", STATE_FILE)


@dataclass
class TrainState:
    """Where training stands; enough to continue with the same data order."""

    stage: int = 0  # index into the schedule's stages
    step: int = 0  # optimizer steps done in this stage
    epoch: int = 0  # current epoch of this stage's data
    offset: int = 0  # micro-batches of `epoch` already consumed (per worker)
    total_steps: int = 0
    global_step: int = 0  # optimizer steps over all stages (the MLflow x axis)
    scheduler: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _options(lora: bool, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # With LoRA only the adapters change: frozen base weights are reloaded from the base model.
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora, **kw)


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, directory: str, *, lora: bool) -> str:
    """Collective: every rank writes its shard into `directory` (its own local dir is fine);
    rank 0 also writes the DCP metadata and train_state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    os.makedirs(directory, exist_ok=True)
    msd, osd = get_state_dict(model, optimizer, options=_options(lora))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=directory)
    if _rank() == 0:
        storage.write_text(os.path.join(directory, STATE_FILE), state.to_json())
        if os.environ.get(LEDGER_ENV):
            record_checkpoint(directory, os.environ[LEDGER_ENV], os.environ.get(FINGERPRINT_ENV, ""))
    return directory


def checkpoint_digest(directory: str) -> str:
    """sha256 over the files resume trusts first (local dir or s3 prefix)."""
    h = hashlib.sha256()
    for name in DIGESTED:
        h.update(name.encode() + b"\0" + storage.read_bytes(storage.join(directory, name)) + b"\0")
    return h.hexdigest()


def record_checkpoint(directory: str, ledger: str, fingerprint: str) -> None:
    """Add this checkpoint to the run's ledger (rank 0 only; read-modify-write of one JSON file)."""
    try:
        entries = storage.read_json(ledger)
    except FileNotFoundError:
        entries = []
    entries.append({"digest": checkpoint_digest(directory), "fingerprint": fingerprint})
    storage.write_json(ledger, entries[-64:])


def trusted_here(directory: str) -> bool:
    """In a worker: is this checkpoint recorded in the ledger the driver named (True when none)?"""
    ledger = os.environ.get(LEDGER_ENV)
    if not ledger:
        return True
    try:
        entries = storage.read_json(ledger)
    except FileNotFoundError:
        entries = []
    ok = _trusted(directory, entries, os.environ.get(FINGERPRINT_ENV, ""))
    if not ok:
        log.warning("checkpoint %s is not recorded by this run with this config: not resumed from", directory)
    return ok


def _trusted(directory: str, ledger: list[dict], fingerprint: str) -> bool:
    try:
        digest = checkpoint_digest(directory)
    except (FileNotFoundError, OSError):
        return False
    return any(e.get("digest") == digest and e.get("fingerprint") == fingerprint for e in ledger)


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer | None, directory: str, *, lora: bool) -> TrainState:
    """Collective: restore model (+ optimizer when given) shards in place; returns the state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = TrainState.from_json(storage.read_text(os.path.join(directory, STATE_FILE)))
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        msd = get_model_state_dict(model, options=_options(lora))
        dcp.load({"model": msd}, checkpoint_id=directory)
        set_model_state_dict(model, msd, options=_options(lora))
        return state
    msd, osd = get_state_dict(model, optimizer, options=_options(lora))
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=_options(lora))
    return state


def read_state(directory: str) -> TrainState:
    return TrainState.from_json(storage.read_text(storage.join(directory, STATE_FILE)))


def find_latest(root: str, ledger: str | None = None, fingerprint: str = "") -> str | None:
    """The newest complete checkpoint directory under root (local or s3), by (stage, step);
    None when there is none. Complete = has train_state.json and DCP .metadata. With a ledger,
    only checkpoints it records for this config fingerprint count (others are skipped with a
    warning: anyone who can write the prefix could otherwise run code through the pickle)."""
    try:
        files = storage.list_files(root)
    except FileNotFoundError:
        return None
    recorded: list[dict] | None = None
    if ledger is not None:
        try:
            recorded = storage.read_json(ledger)
        except FileNotFoundError:
            recorded = []
    dirs = {f.rsplit("/", 1)[0] if storage.is_s3(f) else os.path.dirname(f) for f in files if f.endswith(STATE_FILE)}
    have_meta = {f.rsplit("/", 1)[0] if storage.is_s3(f) else os.path.dirname(f) for f in files if f.endswith(".metadata")}
    best, best_key = None, None
    for d in sorted(dirs & have_meta):
        if recorded is not None and not _trusted(d, recorded, fingerprint):
            log.warning("checkpoint %s is not recorded by this run with this config: not resumed from", d)
            continue
        try:
            s = read_state(d)
        except Exception:
            continue
        key = (s.stage, s.step)
        if best_key is None or key > best_key:
            best, best_key = d, key
    return best


# --------------------------------------------------------------------------- export
def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the full (unsharded) model state dict on rank 0's CPU ({} elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from torch.distributed.tensor import DTensor

    if not _dist():
        full = model.state_dict()
    else:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        # Unsharded (single process / DDP): these are the live parameters; the export merges
        # LoRA in place, so it must work on copies.
        full = {k: v.detach().to("cpu", copy=True) for k, v in full.items()}
    return full


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def write_hf_dir(full_sd: dict[str, torch.Tensor], out_dir: str, *, base_path: str, tokenizer, lora_cfg=None,
                 dtype: torch.dtype = torch.float32, base_ref: str | None = None) -> None:
    """Write an HF directory from a full state dict (keys of the bare causal LM, or of the peft
    model with LoRA). The architecture is built on the meta device and the tensors assigned,
    so rank 0 never holds two copies of the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(base_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if lora_cfg is not None:
        from derta.models import apply_lora

        model = apply_lora(model, lora_cfg)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full_sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not getattr(config, "tie_word_embeddings", False)]
    if missing or unexpected:
        raise RuntimeError(f"export: state dict does not match the architecture (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    os.makedirs(out_dir, exist_ok=True)
    if lora_cfg is not None:
        ref = base_ref if base_ref and not base_ref.startswith("builtin:") else base_path
        model.peft_config["default"].base_model_name_or_path = ref
        model.save_pretrained(os.path.join(out_dir, ADAPTER_DIR))
        model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    try:
        model_gen = GenerationConfig.from_pretrained(base_path)
        model_gen.save_pretrained(out_dir)
    except OSError:
        pass
    tokenizer.save_pretrained(out_dir)


def _readable(directory: str) -> None:
    """mkdtemp makes 0700 and some writers 0600: outputs should be readable like any file."""
    os.chmod(directory, 0o755)
    for d, subdirs, files in os.walk(directory):
        for s in subdirs:
            os.chmod(os.path.join(d, s), 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)


def _rel_files(directory: str) -> list[str]:
    return [os.path.relpath(os.path.join(d, f), directory) for d, _, files in os.walk(directory) for f in files]


def publish_dir(local_dir: str, uri: str) -> None:
    """Move a finished local directory to uri atomically (local rename) or upload it (s3)."""
    _readable(local_dir)
    if storage.is_s3(uri):
        # Upload first, then remove what the new directory no longer has: a failed upload
        # leaves the previous model in place (S3 has no directory rename).
        before = set(storage.list_files(uri))
        storage.upload_dir(local_dir, uri)
        after = {storage.join(uri, rel.replace(os.sep, "/")) for rel in _rel_files(local_dir)}
        for stale in sorted(before - after):
            storage.delete(stale)
        shutil.rmtree(local_dir, ignore_errors=True)
        return
    uri = os.path.abspath(uri)
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    old = None
    if os.path.exists(uri):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(uri)}.old.", dir=os.path.dirname(uri))
        os.rmdir(old)
        os.replace(uri, old)
    if os.path.dirname(os.path.abspath(local_dir)) == os.path.dirname(uri):
        os.replace(local_dir, uri)
    else:
        staged = tempfile.mkdtemp(prefix=f".{os.path.basename(uri)}.", dir=os.path.dirname(uri))
        os.rmdir(staged)
        shutil.copytree(local_dir, staged)
        os.replace(staged, uri)
        shutil.rmtree(local_dir, ignore_errors=True)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def export_model(model: nn.Module, uri: str, *, base_path: str, tokenizer, lora_cfg=None, dtype: torch.dtype = torch.float32,
                 base_ref: str | None = None, prefix: str = "lm.") -> str | None:
    """Collective: gather, then rank 0 writes the HF directory to uri. Returns uri on rank 0."""
    full = gather_full_state_dict(model)
    if _rank() != 0:
        return None
    full = _strip(full, prefix)
    if storage.is_s3(uri):
        parent = tempfile.mkdtemp(prefix="derta-export-")
    else:
        parent = os.path.dirname(os.path.abspath(uri))
        os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".model.tmp.", dir=parent)
    try:
        write_hf_dir(full, tmp, base_path=base_path, tokenizer=tokenizer, lora_cfg=lora_cfg, dtype=dtype, base_ref=base_ref)
        publish_dir(tmp, uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if storage.is_s3(uri):
            shutil.rmtree(parent, ignore_errors=True)
    return uri
