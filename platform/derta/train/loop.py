"""The per-worker training loop Ray Train runs on every worker (`train_loop_per_worker`).

One loop for every method and schedule: a *stage* is (dataset, loss form, weights); the joint
schedule is one stage, the sequential schedule two (MLE, then RTO/pref). An optimizer step is
train.global_batch samples; per step a worker takes that step's micro-batches (the same number
on every worker; StepPlan.micro_per_step) from its own dataset, the token counts of the whole
global batch are all-reduced first, so the loss of every micro-batch is normalised by the
global counts and the accumulated gradient is exactly that of one big batch.

Determinism (what makes resume exact): the shard order is fixed (no shuffle at iteration time,
preserve_order in the trainer's DataConfig), the RTO keep-rate and dropout RNG are re-seeded
from (seed, stage, step, rank) at every step, and the data position (epoch, micro-batches
consumed) is saved in every checkpoint and skipped on resume.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from derta import telemetry
from derta.config import ExperimentConfig
from derta.train import checkpoint as ckpt
from derta.train import fsdp
from derta.train.losses import Denominators, DertaObjective, LossSpec, build_targets, combine, denominators

COLUMNS = ("input_ids", "labels", "rto_mask", "position_ids")
DTYPES = {"input_ids": torch.long, "labels": torch.long, "rto_mask": torch.bool, "position_ids": torch.long}

# Dense bf16 peak FLOP/s per GPU, for MFU (first matching substring of the device name).
PEAK_FLOPS = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12), ("L4", 121e12), ("V100", 125e12)]


def say(*parts: Any) -> None:
    """Print a progress line once. Ray Train V2 patches print() into a logger and, when
    something (MLflow, rich) has wrapped sys.stdout, also tees to the original print, so a
    plain print shows every line twice; printing to the real stdout takes one path only."""
    print(*parts, file=sys.__stdout__ or sys.stdout, flush=True)


# --------------------------------------------------------------------------- plans (pure)
@dataclass(frozen=True)
class StepPlan:
    """How the rows of one stage turn into optimizer steps on this world size. A step is
    global_batch SAMPLES (the last of an epoch: the rest), packed into rows on their own
    (data.tokenize.pack_steps); its micro-batch count per worker can differ between steps but
    is the same on every worker."""

    micro_per_step: tuple[int, ...]  # micro-batches per worker, for each step of an epoch
    batches_per_epoch: int  # micro-batches per worker per epoch
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    global_batch: int  # samples per optimizer step

    @property
    def accum(self) -> int:
        """The largest number of micro-batches one worker runs in a step."""
        return max(self.micro_per_step)

    def accum_at(self, step: int) -> int:
        return self.micro_per_step[step % self.steps_per_epoch]


def steps_for(samples: int, global_batch: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of a stage, as the paper's recipe counts them (HF Trainer, drop_last
    False): ceil(samples / global_batch) per epoch, times epochs (rounded up); max_steps wins."""
    if max_steps:
        return max_steps
    return max(1, math.ceil(epochs * math.ceil(samples / global_batch)))


def step_plan(rows_per_step: list[int] | tuple[int, ...], world: int, micro_batch: int, global_batch: int, samples: int,
              epochs: float, max_steps: int | None, warmup_ratio: float) -> StepPlan:
    """rows_per_step: the rows of each step of an epoch, all workers (each a multiple of
    world · micro_batch, as pack_steps lays them out)."""
    from derta.config import ConfigError

    if not rows_per_step or samples <= 0:
        raise ConfigError("train: a training stage has no samples")
    unit = world * micro_batch
    if any(r <= 0 or r % unit for r in rows_per_step):
        raise ValueError(f"rows per step {list(rows_per_step)} are not positive multiples of workers x micro_batch = {unit}")
    micro = tuple(r // unit for r in rows_per_step)
    if len(micro) != math.ceil(samples / global_batch):
        raise ValueError(f"{len(micro)} steps per epoch for {samples} samples in batches of {global_batch}")
    total = steps_for(samples, global_batch, epochs, max_steps)
    warmup = int(round(warmup_ratio * total))
    return StepPlan(micro, sum(micro), len(micro), total, warmup, global_batch)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_seed(seed: int, stage: int, step: int, rank: int, micro: int = 0) -> int:
    return (seed * 1_000_003 + stage * 7_919 + step * 104_729 + rank * 1_299_709 + micro * 15_485_863) % (2**31 - 1)


def worker_key(dataset: str, rank: int) -> str:
    """The Ray dataset a worker reads: the trainer lays every worker's rows out itself (each
    step's rows split evenly), so datasets are not split by Ray."""
    return f"{dataset}@{rank}"


def micro_batches(shard, plan: StepPlan, micro_batch: int, epoch: int, offset: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, offset after this batch, batch) forever, starting at (epoch, offset); each epoch
    yields the same `plan.batches_per_epoch` batches in the same order."""
    while True:
        it = shard.iter_torch_batches(batch_size=micro_batch, drop_last=True, dtypes=DTYPES)
        i = 0
        for batch in it:
            if i >= plan.batches_per_epoch:
                break
            if i >= offset:
                yield epoch, i + 1, {k: batch[k] for k in COLUMNS if k in batch}
            i += 1
        epoch, offset = epoch + 1, 0


# --------------------------------------------------------------------------- helpers
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS if k in name), None)


def _tied_embeddings(path: str, trust_remote_code: bool) -> bool:
    """Tied input/output embeddings do not survive a meta-device round trip; such (small)
    models are loaded on every rank instead."""
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "tie_word_embeddings", False))


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Tracking:
    """Rank-0 MLflow logging into the driver's run; a no-op without a handle."""

    def __init__(self, handle: dict | None, rank: int):
        self.tracker = None
        self._ctx = None
        if handle and rank == 0 and handle.get("run_id"):
            try:
                from derta.tracking import Tracker

                self.tracker = Tracker(handle["tracking_uri"], handle.get("experiment", "derta"))
                self._ctx = self.tracker.attach(handle["run_id"])
                self._ctx.__enter__()
            except Exception as e:  # tracking must never kill a training run
                say(f"[derta.train] MLflow tracking disabled on this worker: {e}")
                self.tracker = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.tracker is not None:
            try:
                self.tracker.log_metrics(metrics, step=step)
            except Exception as e:
                say(f"[derta.train] MLflow log_metrics failed: {e}")

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None


def _maybe_kill(fault: dict | None, rank: int, global_step: int) -> None:
    """Fault injection for the resume test: SIGKILL this worker once, at a given step."""
    if not fault or rank != fault.get("rank", 1) or global_step != fault.get("step"):
        return
    marker = fault["marker"]
    if os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(str(global_step))
    say(f"[derta.train] fault injection: killing rank {rank} at step {global_step}")
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- building blocks
@dataclass
class Models:
    model: torch.nn.Module  # the (sharded) DertaObjective being trained
    mode: str  # fsdp2 | ddp | none
    ref: torch.nn.Module | None  # frozen reference for derta_pref with full fine-tuning
    n_params: int  # of the base model, for MFU
    base_path: str  # local HF directory of the base model


def build_models(cfg: ExperimentConfig, stages: list[dict], rank: int, world: int, device: torch.device) -> Models:
    """Load (rank 0) or lay out on meta (others), add LoRA and activation checkpointing, wrap
    in DertaObjective, shard; plus the frozen reference when a stage needs one."""
    from derta.models import apply_lora, load_model, resolve_model_path, torch_dtype

    tc = cfg.train
    compute_dtype = torch_dtype(cfg.model.dtype, tc.use_gpu)
    lora = cfg.model.lora is not None
    # Full fine-tuning with FSDP mixed precision keeps float32 master weights (compute is
    # bf16); with LoRA the frozen base stays in the compute dtype and only adapters are fp32.
    mp = tc.use_gpu and tc.fsdp.enabled and tc.fsdp.mixed_precision
    master = cfg.model.model_copy(update={"dtype": "float32"}) if mp and not lora else cfg.model
    base_path = resolve_model_path(cfg.model.name_or_path)
    # Rank 0 loads the weights; the other ranks build on the meta device and receive them.
    meta_init = world > 1 and tc.fsdp.enabled and not _tied_embeddings(base_path, cfg.model.trust_remote_code)
    attn = [None]
    torch.manual_seed(tc.seed)
    if rank == 0 or not meta_init:
        lm = load_model(master, use_gpu=tc.use_gpu)
        attn = [getattr(lm.config, "_attn_implementation", None)]
    if meta_init:
        dist.broadcast_object_list(attn, src=0)  # the same attention kernel on every rank
        if rank != 0:
            lm = fsdp.meta_model(base_path, torch_dtype(master.dtype, tc.use_gpu), cfg.model.trust_remote_code, attn[0])
    n_params = sum(p.numel() for p in lm.parameters())
    if lora:
        lm = apply_lora(lm, cfg.model.lora)
    if tc.fsdp.activation_checkpointing:
        fsdp.enable_activation_checkpointing(lm)
    lm.train()
    objective = DertaObjective(lm)
    init = None
    if meta_init:
        init = fsdp.detach_to_meta(objective) if rank == 0 else fsdp.RankZeroInit({}, {})
    ref_objective = None
    if any(s["transition"] == "pref" for s in stages) and not lora:
        # Full fine-tuning: a frozen copy of the initial model is the reference (with meta
        # init a free copy of the meta module, filled from the same rank-0 tensors).
        ref_lm = copy.deepcopy(lm).eval()
        for p in ref_lm.parameters():
            p.requires_grad_(False)
        ref_objective = DertaObjective(ref_lm)
    ref_init = init
    wrap_kw = dict(use_gpu=tc.use_gpu, device=device, param_dtype=compute_dtype)
    model, mode = fsdp.wrap(objective, lm, tc.fsdp, init=init, **wrap_kw)
    if ref_objective is not None:
        if mode == "fsdp2":
            ref_objective, _ = fsdp.wrap(ref_objective, ref_objective.lm, tc.fsdp, init=ref_init, **wrap_kw)
        else:
            if ref_init is not None:
                fsdp.materialize_local(ref_objective, ref_init, device)
                for p in ref_objective.parameters():
                    dist.broadcast(p.data, src=0)
                for b in ref_objective.buffers():
                    dist.broadcast(b, src=0)
            ref_objective = ref_objective.to(device)
    return Models(model, mode, ref_objective, n_params, base_path)


def resume_point(resume: str, resume_from: str | None) -> tuple[str | None, str | None]:
    """(local checkpoint directory to resume from or None, temp dir to delete afterwards).

    Ray's latest checkpoint of this run (a worker-group retry, or a new `train()` on the same
    run directory) wins; else the newest one the driver found under paths.checkpoints."""
    import ray.train

    from derta import storage

    if resume != "auto":
        return None, None
    ray_ckpt = ray.train.get_checkpoint()
    if ray_ckpt is not None:
        from derta.train.checkpoint import trusted_here

        tmp = tempfile.mkdtemp(prefix="derta-resume-")
        ray_ckpt.to_directory(tmp)
        if trusted_here(tmp):  # recorded (with a digest) by this run under this config
            return tmp, tmp
        shutil.rmtree(tmp, ignore_errors=True)
    if resume_from and storage.is_s3(resume_from):
        tmp = tempfile.mkdtemp(prefix="derta-resume-")
        storage.download_dir(resume_from, tmp)
        return tmp, tmp
    return resume_from or None, None


# --------------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. config (built by trainer.train): experiment (cfg.to_dict()),
    stages, model_uri, run_name, tracking (handle dict | None), fault (test hook | None),
    resume_from (checkpoint URI | None), env (settings for this process), proxy (Tune's
    proxy objective | None), export (bool)."""
    import ray.train

    for k, v in (config.get("env") or {}).items():
        os.environ[k] = v  # the driver's cache / object store / tracking settings win
    from derta.faults import maybe_fail

    maybe_fail("train")
    cfg = ExperimentConfig.model_validate(config["experiment"])
    tc = cfg.train
    rank, world = _rank_world()
    device = torch.device("cpu")
    if tc.use_gpu and torch.cuda.is_available():
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)

    from derta.models import load_tokenizer, refusal_token_id, torch_dtype

    tokenizer = load_tokenizer(cfg.model)
    refusal_id = refusal_token_id(tokenizer, tc.refusal_token, tc.refusal_token_fallback)
    stages = config["stages"]
    lora = cfg.model.lora is not None
    built = build_models(cfg, stages, rank, world, device)
    model, mode, ref_objective, n_params, base_path = built.model, built.mode, built.ref, built.n_params, built.base_path
    params = [p for p in model.parameters() if p.requires_grad]
    peak = _peak_flops(device)

    tracking = _Tracking(config.get("tracking"), rank)
    proxy = None  # Tune trials: the held-out proxy objective (derta.tune.proxy), reported to Tune
    if config.get("proxy"):
        from derta.tune.proxy import ProxyHook

        proxy = ProxyHook(config["proxy"], device)
    if rank == 0:
        say(f"[derta.train] {world} worker(s), {mode}, device {device}, params {n_params / 1e6:.1f}M, "
            f"trainable {sum(p.numel() for p in params) / 1e6:.2f}M, "
            f"refusal token id {refusal_id}")

    # ------------------------------------------------------------- resume point
    resume_dir, tmp_resume = resume_point(tc.resume, config.get("resume_from"))
    state = ckpt.read_state(resume_dir) if resume_dir else ckpt.TrainState()
    if resume_dir and rank == 0:
        say(f"[derta.train] resuming from stage {state.stage} step {state.step} (epoch {state.epoch}, "
            f"micro-batch {state.offset})")

    fault = config.get("fault")
    final_metrics: dict[str, float] = {}
    global_step = state.global_step
    for si, stage in enumerate(stages):
        if si < state.stage:
            continue
        plan = step_plan(stage["rows_per_step"], world, tc.micro_batch, tc.global_batch, stage["samples"], tc.epochs,
                         tc.max_steps, tc.warmup_ratio)
        optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, p=plan: lr_factor(s, p.warmup_steps, p.total_steps))
        st = ckpt.TrainState(stage=si, total_steps=plan.total_steps, global_step=global_step)
        if resume_dir and state.stage == si:
            st = ckpt.load_checkpoint(model, optimizer, resume_dir, lora=lora)
            scheduler.load_state_dict(st.scheduler)
            global_step = st.global_step
            resume_dir = None
        if rank == 0:
            say(f"[derta.train] stage {si + 1}/{len(stages)} ({stage['name']}): {stage['samples']} samples in "
                f"{stage['rows']} rows, {plan.total_steps} steps ({plan.steps_per_epoch} per epoch), global batch "
                f"{plan.global_batch} samples, {min(plan.micro_per_step)}-{plan.accum} micro-batches per step per worker")
        shard = ray.train.get_dataset_shard(worker_key(stage["dataset"], rank))
        batches = micro_batches(shard, plan, tc.micro_batch, st.epoch, st.offset)
        t_start, steps_timed, tok_window, t_window, steps_window = time.perf_counter(), 0, 0, time.perf_counter(), 0
        while st.step < plan.total_steps:
            torch.manual_seed(step_seed(tc.seed, si, st.step, rank))
            micro = []
            for _ in range(plan.accum_at(st.step)):
                st.epoch, st.offset, b = next(batches)
                micro.append({k: v.to(device) for k, v in b.items()})
            targets = [
                build_targets(b, rto_keep=tc.loss.rto_keep, seed=step_seed(tc.seed, si, st.step, rank, i),
                              use_rto=stage["transition"] != "none", keep_rule=tc.loss.keep_rule)
                for i, b in enumerate(micro)
            ]
            counts = _all_reduce(torch.tensor([sum(t.n_mle for t in targets), sum(t.n_rto for t in targets)], dtype=torch.float64, device=device))
            denom = Denominators(float(counts[0]), float(counts[1]))
            sums = torch.zeros(4, dtype=torch.float64, device=device)
            for i, (b, t) in enumerate(zip(micro, targets)):
                ref = None
                if stage["transition"] == "pref":  # on every rank, even with no pref positions: FSDP collectives
                    with torch.no_grad():
                        ref = (ref_objective or model)(b, t, refusal_id, tc.loss.chunk_size, reference=True)
                sync = mode != "ddp" or i == len(micro) - 1
                ctx = model.no_sync() if not sync else _null()
                spec = LossSpec(stage["transition"], stage["w_mle"], stage["w_rto"], tc.loss.beta,
                                *denominators(t, denom, tc.loss.normalize))
                with ctx:
                    loss, logps = model(b, t, refusal_id, tc.loss.chunk_size, spec=spec, ref_logps=ref)
                    (loss * world).backward()  # FSDP/DDP average gradients over ranks
                with torch.no_grad():  # the logged terms, from the same log-probs
                    out = combine(logps, t, transition=stage["transition"], w_mle=stage["w_mle"], w_rto=stage["w_rto"],
                                  beta=tc.loss.beta, ref_logps=ref, denom=denom, normalize=tc.loss.normalize)
                sums += torch.stack([loss.detach().float(), out.loss_mle, out.loss_rto, out.loss_pref]).to(torch.float64)
                tok_window += b["input_ids"].numel()
            grad_norm = fsdp.clip_grad_norm(params, tc.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            st.step += 1
            global_step += 1
            st.global_step = global_step
            steps_timed += 1
            steps_window += 1

            log_now = st.step % tc.log_every == 0 or st.step == plan.total_steps
            save_now = (tc.checkpoint_every and st.step % tc.checkpoint_every == 0) or st.step == plan.total_steps
            metrics: dict[str, float] = {}
            if log_now:
                totals = _all_reduce(torch.cat([sums, torch.tensor([tok_window], dtype=torch.float64, device=device)]))
                dt = time.perf_counter() - t_window
                tps = float(totals[4]) / max(dt, 1e-9)
                metrics = {"loss": float(totals[0]), "loss_mle": float(totals[1]), "loss_rto": float(totals[2]),
                           "loss_pref": float(totals[3]), "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                           "n_mle_tokens": denom.n_mle, "n_rto_tokens": denom.n_rto, "epoch": float(st.epoch), "stage": float(si)}
                if peak:
                    metrics["mfu"] = 6.0 * n_params * tps / (peak * world)
                final_metrics = metrics
                if rank == 0:
                    elapsed = time.perf_counter() - t_start
                    eta = elapsed / steps_timed * (plan.total_steps - st.step)
                    say(f"[derta.train] step {st.step}/{plan.total_steps} loss {metrics['loss']:.4f} "
                        f"(mle {metrics['loss_mle']:.4f} rto {metrics['loss_rto']:.4f}"
                        f"{' pref %.4f' % metrics['loss_pref'] if stage['transition'] == 'pref' else ''}) "
                        f"lr {lr:.2e} gnorm {grad_norm:.3f} {tps:,.0f} tok/s ETA {_fmt_time(eta)}")
                    tracking.log(metrics, global_step)
                    telemetry.record_train_step(metrics, step=global_step, steps=steps_window, tokens=float(totals[4]),
                                                step_seconds=dt / max(1, steps_window), run=config.get("run_name"))
                tok_window, t_window, steps_window = 0, time.perf_counter(), 0
            if proxy is not None and (save_now or proxy.due(global_step)):  # collective: all ranks
                pm = proxy(model, refusal_id, tc.loss.chunk_size, global_step)
                metrics = {**metrics, **pm}
                if rank == 0:
                    tracking.log(pm, global_step)
                if not save_now:  # a checkpoint report below carries them otherwise
                    ray.train.report({**metrics, "step": global_step, "stage": si})
            if save_now:
                st.scheduler = scheduler.state_dict()
                local = tempfile.mkdtemp(prefix=f"derta-ckpt-r{rank}-")
                try:
                    ckpt.save_checkpoint(model, optimizer, st, local, lora=lora)
                    ray.train.report({**metrics, "step": global_step, "stage": si},
                                     checkpoint=ray.train.Checkpoint.from_directory(local),
                                     checkpoint_dir_name=f"checkpoint_s{si}_{st.step:08d}")
                finally:
                    shutil.rmtree(local, ignore_errors=True)
            _maybe_kill(fault, rank, global_step)
        state = ckpt.TrainState(stage=si + 1)
    if tmp_resume:
        shutil.rmtree(tmp_resume, ignore_errors=True)

    # ------------------------------------------------------------- export
    export_dtype = torch_dtype(cfg.model.dtype, tc.use_gpu)
    t0 = time.perf_counter()
    if config.get("export", True):  # Tune trials skip it unless their models get a full evaluation
        ckpt.export_model(model, config["model_uri"], base_path=base_path, tokenizer=tokenizer,
                          lora_cfg=cfg.model.lora, dtype=export_dtype, base_ref=cfg.model.name_or_path)
        if rank == 0:
            say(f"[derta.train] exported {config['model_uri']} in {time.perf_counter() - t0:.1f}s")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if proxy is not None:  # every report a Tune trial makes carries the proxy metric
        final_metrics = {**final_metrics, **proxy(model, refusal_id, tc.loss.chunk_size, global_step)}
    ray.train.report({**final_metrics, "step": global_step, "done": 1})
    tracking.close()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
