"""`derta plan` / `jobs/X.py --plan`: what a run will ask the cluster for, and whether it fits,
before asking for anything (no Ray, no weights: the model is built on the meta device).

Notation: N = train.workers (one GPU each), P parameters, L decoder layers, P_layer the
parameters of one decoder layer, P_root = P - L·P_layer (embeddings, final norm, lm_head),
h hidden size, h_kv = kv_heads·head_dim, i MLP intermediate size, V vocabulary, b =
train.micro_batch, s = data.max_len, c = 2 bytes (bf16 compute), A LoRA adapter parameters.

Training, bytes per GPU, FSDP2 full sharding as derta.train does it:
  m = master weight bytes: 4 (fp32 master weights, bf16 compute) on GPU with FSDP mixed
      precision (train/loop.py), else the bytes of model.dtype
  full fine-tuning   weights m·P/N   grads m·P/N   AdamW moments 2·m·P/N     (4P/N, 4P/N, 8P/N)
  LoRA               weights m·P/N + 4A/N (frozen base + fp32 adapters), grads 4A/N, moments 8A/N
                     A = r · Σ (in + out) over the targeted linears of every decoder layer
  reference model    m·P/N more for derta_pref with full fine-tuning (a frozen copy)
  gathered           c·(2·P_layer + P_root): the layer in use, the next one prefetched, and the
                     root group, which FSDP2 keeps unsharded from forward to backward
  unsharded grads    c·(P_layer + P_root), full fine-tuning only: before the reduce-scatter
  activations        bf16, SDPA/flash attention (no s² term), no dropout. Elements saved per
                     token and layer: a = 6h + 2·h_kv + 4i (2 norm inputs, 2 norm outputs =
                     projection inputs, q, attention output; k, v; gate, up, SiLU(gate),
                     SiLU(gate)·up). Without activation checkpointing c·b·s·a·L; with it
                     (per decoder layer) c·b·s·h·L (layer inputs) + c·b·s·a (one layer
                     recomputed in backward)
  loss               2·4·min(chunk, b·s)·V: one fp32 chunk of logits and its gradient
                     (train/losses.py never builds the full [b·s, V] logits)
  total              the sum × 1.10 (CUDA context, NCCL buffers, allocator fragmentation)

Evaluation and response generation, per engine actor over T = eval.tensor_parallel GPUs:
  weights c·P/T, KV cache of one batch 2·L·h_kv·c·(s + max_new_tokens)·batch_size / T (eval.* or
  data.generate.*), within vLLM's budget of 0.85 × GPU memory (eval/engines.py).

A plan fails (False, exit 1 from the jobs) when a stage that uses GPUs does not fit
train.gpu_memory_gb GiB per GPU, or when tensor parallelism spans more GPUs than a node has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from derta.config import ExperimentConfig, dump_yaml

GiB = 1024**3
HEADROOM = 0.10
COMPUTE_BYTES = 2  # bf16
GPUS_PER_NODE = 8  # p5.48xlarge, a3-highgpu-8g, the KubeRay GPU group (clusters/)
STAGES = ("train", "eval")
DTYPE_BYTES = {"float32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    hidden: int
    vocab: int
    intermediate: int
    kv_dim: int  # num_key_value_heads * head_dim
    layer_params: int
    lora_params: int = 0

    @property
    def root_params(self) -> int:
        return self.params - self.layers * self.layer_params

    @property
    def act_elements(self) -> int:
        """Activation elements saved per token by one decoder layer (module docstring)."""
        return 6 * self.hidden + 2 * self.kv_dim + 4 * self.intermediate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU for training, part by part (module docstring)."""

    weights: float
    grads: float
    optimizer: float
    reference: float
    gathered: float
    unsharded_grads: float
    activations: float
    logits: float

    PARTS = ("weights", "grads", "optimizer", "reference", "gathered", "unsharded_grads", "activations", "logits")

    @property
    def subtotal(self) -> float:
        return sum(getattr(self, p) for p in self.PARTS)

    @property
    def total(self) -> float:
        return self.subtotal * (1 + HEADROOM)


@dataclass(frozen=True)
class EvalEstimate:
    """Bytes per GPU for one inference engine actor."""

    weights: float
    kv_cache: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache


@dataclass(frozen=True)
class Resources:
    """What a run asks Ray for. Stages run one after another, so the peak is the larger one."""

    train_workers: int
    train_gpus: int
    train_cpus: float
    eval_actors: int
    gpus_per_actor: int
    judge_gpus: int = 0  # an LLM judge engine beside the eval engines (same Ray Data pipeline)
    concurrent_trials: int = 1
    gpus_per_node: int = GPUS_PER_NODE

    @property
    def eval_gpus(self) -> int:
        return self.eval_actors * self.gpus_per_actor + self.judge_gpus

    @property
    def peak_gpus(self) -> int:
        return max(self.train_gpus * self.concurrent_trials, self.eval_gpus)

    @property
    def gpu_nodes(self) -> int:
        return math.ceil(self.peak_gpus / self.gpus_per_node)


@dataclass
class Plan:
    shape: ModelShape
    resources: Resources
    train: MemoryEstimate | None
    eval: EvalEstimate | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------- pure estimates
def master_bytes(cfg: ExperimentConfig) -> int:
    """Bytes per master weight, as train/loop.py loads them."""
    t = cfg.train
    if t.use_gpu and t.fsdp.enabled and t.fsdp.mixed_precision:
        return 4
    if cfg.model.dtype == "auto":
        return 2 if t.use_gpu else 4
    return DTYPE_BYTES[cfg.model.dtype]


def estimate_memory(shape: ModelShape, cfg: ExperimentConfig) -> MemoryEstimate:
    """Training bytes per GPU (formulas in the module docstring)."""
    n, p, a = cfg.train.workers, shape.params, shape.lora_params
    m, c = master_bytes(cfg), COMPUTE_BYTES
    b, s, h = cfg.train.micro_batch, cfg.data.max_len, shape.hidden
    lora = cfg.model.lora is not None
    if lora:
        weights, grads, optimizer = m * p / n + 4 * a / n, 4 * a / n, 8 * a / n
        unsharded = 0.0
    else:
        weights, grads, optimizer = m * p / n, m * p / n, 2 * m * p / n
        unsharded = c * (shape.layer_params + shape.root_params)
    reference = m * p / n if cfg.train.method == "derta_pref" and not lora else 0.0
    gathered = c * (2 * shape.layer_params + shape.root_params)
    per_layer = c * b * s * shape.act_elements
    if cfg.train.fsdp.activation_checkpointing:
        activations = c * b * s * h * shape.layers + per_layer
    else:
        activations = per_layer * shape.layers
    logits = 2 * 4 * min(cfg.train.loss.chunk_size, b * s) * shape.vocab
    return MemoryEstimate(weights, grads, optimizer, reference, gathered, unsharded, activations, logits)


def estimate_eval(shape: ModelShape, cfg: ExperimentConfig, generate: bool = False) -> EvalEstimate:
    """Inference bytes per GPU for one engine over eval.tensor_parallel x eval.pipeline_parallel
    GPUs (with generate=True, the batch and new tokens of data.generate)."""
    t, c = cfg.eval.tensor_parallel * cfg.eval.pipeline_parallel, COMPUTE_BYTES
    g = cfg.data.generate if generate and cfg.data.generate else cfg.eval
    kv = 2 * shape.layers * shape.kv_dim * c * (cfg.data.max_len + g.max_new_tokens) * g.batch_size
    return EvalEstimate(c * shape.params / t, kv / t)


def eval_uses_gpu(cfg: ExperimentConfig) -> bool:
    """Engines go on GPUs when the run trains on GPUs or vLLM is asked for (engine=auto picks
    vLLM on a GPU node)."""
    return cfg.train.use_gpu or cfg.eval.engine == "vllm"


def resources(cfg: ExperimentConfig, stages: Iterable[str] = STAGES, gpus_per_node: int = GPUS_PER_NODE) -> Resources:
    stages = tuple(stages)
    t = cfg.train
    train = "train" in stages or "tune" in stages
    evaluate = "eval" in stages or "generate" in stages
    trials = 1
    if "tune" in stages:
        trials = cfg.tune.max_concurrent_trials or cfg.tune.num_samples
    return Resources(
        train_workers=t.workers if train else 0,
        train_gpus=t.workers if (train and t.use_gpu) else 0,
        train_cpus=t.workers * t.cpus_per_worker if train else 0.0,
        eval_actors=cfg.eval.num_actors if evaluate else 0,
        gpus_per_actor=cfg.eval.tensor_parallel * cfg.eval.pipeline_parallel if (evaluate and eval_uses_gpu(cfg)) else 0,
        judge_gpus=1 if ("eval" in stages and cfg.eval.judge == "llm" and eval_uses_gpu(cfg)) else 0,
        concurrent_trials=trials,
        gpus_per_node=gpus_per_node,
    )


def check(plan: Plan, cfg: ExperimentConfig) -> None:
    """Fill plan.problems (the run cannot work) and plan.notes (it can, but look)."""
    limit = cfg.train.gpu_memory_gb * GiB
    r = plan.resources
    if plan.train is not None and cfg.train.use_gpu and plan.train.total > limit:
        plan.problems.append(
            f"training needs {plan.train.total / GiB:.1f} GiB per GPU > {cfg.train.gpu_memory_gb:g} GiB "
            "(more workers, LoRA, train.fsdp.activation_checkpointing or a smaller train.micro_batch)")
    if plan.eval is not None and r.gpus_per_actor:
        util = cfg.eval.gpu_memory_utilization
        budget = util * limit
        if plan.eval.total > budget:
            plan.problems.append(
                f"an inference engine needs {plan.eval.total / GiB:.1f} GiB per GPU > {budget / GiB:.1f} GiB "
                f"(eval.gpu_memory_utilization {util:.0%} of {cfg.train.gpu_memory_gb:g}); raise eval.tensor_parallel "
                "or lower eval.batch_size")
        if cfg.eval.tensor_parallel > r.gpus_per_node:  # pipeline stages may span nodes; a TP group may not
            plan.problems.append(f"eval.tensor_parallel={cfg.eval.tensor_parallel} spans more than one {r.gpus_per_node}-GPU node")


def make_plan(cfg: ExperimentConfig, stages: Iterable[str] = STAGES, shape: ModelShape | None = None,
              gpus_per_node: int = GPUS_PER_NODE, model: str | None = None) -> Plan:
    """Resources + memory estimates + problems for the given stages (train, eval, tune,
    generate); `model` sizes another model than cfg.model (e.g. a generation model)."""
    stages = tuple(stages)
    shape = shape or model_shape(cfg, model)
    training = "train" in stages or "tune" in stages
    evaluating = "eval" in stages or "generate" in stages
    plan = Plan(
        shape=shape,
        resources=resources(cfg, stages, gpus_per_node),
        train=estimate_memory(shape, cfg) if training else None,
        eval=estimate_eval(shape, cfg, generate="generate" in stages) if evaluating else None,
    )
    check(plan, cfg)
    return plan


# --------------------------------------------------------------------------- model shape
def _decoder_layers(model):
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:  # the longest ModuleList is the stack of blocks
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        layers = max(lists, key=len) if lists else []
    return list(layers)


def shape_from_hf_config(hf, lora_r: int | None = None, lora_targets: Iterable[str] = (),
                         trust_remote_code: bool = False) -> ModelShape:
    """Count parameters of an HF config's model built on the meta device: no weights, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, trust_remote_code=trust_remote_code)
    params = sum(p.numel() for p in model.parameters())
    layers = _decoder_layers(model)
    layer_params = sum(p.numel() for p in layers[0].parameters()) if layers else 0
    lora = 0
    if lora_r is not None:
        targets = set(lora_targets)
        for layer in layers:
            for name, module in layer.named_modules():
                if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
                    lora += lora_r * (module.in_features + module.out_features)
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    return ModelShape(params, len(layers) or text.num_hidden_layers, text.hidden_size, text.vocab_size,
                      intermediate, kv_heads * head_dim, layer_params, lora)


def _hf_config(ref: str, revision: str | None, trust_remote_code: bool):
    """The model's config alone: from an s3:// HF directory only config.json is fetched."""
    import tempfile
    from pathlib import Path

    from transformers import AutoConfig

    from derta.models import resolve_model_path

    if ref.startswith("s3://"):
        from derta import storage

        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "config.json").write_text(storage.read_text(storage.join(ref, "config.json")))
            return AutoConfig.from_pretrained(tmp, trust_remote_code=trust_remote_code)
    return AutoConfig.from_pretrained(resolve_model_path(ref), revision=revision, trust_remote_code=trust_remote_code)


def model_shape(cfg: ExperimentConfig, name_or_path: str | None = None) -> ModelShape:
    """The shape of cfg's model (or another model, e.g. a generation model) from its config.json
    alone: an HF id fetches only that file, so does an s3:// directory; builtin:tiny is built."""
    ref = name_or_path or cfg.model.name_or_path
    hf = _hf_config(ref, cfg.model.revision if name_or_path is None else None, cfg.model.trust_remote_code)
    lora = cfg.model.lora if name_or_path is None else None
    return shape_from_hf_config(hf, lora.r if lora else None, lora.target_modules if lora else (),
                                cfg.model.trust_remote_code)


# --------------------------------------------------------------------------- data and steps
@dataclass
class DataCounts:
    """Samples of each kind the data stage builds (None when the sources are not readable here)
    and the lines that say how they follow from the sources."""

    samples: dict[str, int] | None
    lines: list[str]

    @property
    def total(self) -> int | None:
        return None if self.samples is None else sum(self.samples.values())


def optimizer_steps(samples: int, cfg: ExperimentConfig) -> tuple[int, int]:
    """(steps per epoch, total steps): ceil(samples / train.global_batch) per epoch (global_batch
    counts samples), total ceil(epochs x that) unless train.max_steps sets it."""
    per_epoch = max(1, math.ceil(samples / cfg.train.global_batch))
    return per_epoch, cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * per_epoch))


def data_counts(cfg: ExperimentConfig) -> DataCounts:
    """Exact counts from the sources' rows when they are local (derta.data.plan.local_plan: the
    data stage's own rules, without Ray); otherwise the formula over the source row counts."""
    from derta.data import mix as M
    from derta.data.plan import local_plan

    d = cfg.data
    preset, amounts = M.resolve_mix(d.mix, cfg.train.method)
    how = f"data.mix preset {preset}, triples {d.mix.triples}"
    plan = local_plan(cfg)
    if plan is not None:
        samples: dict[str, int] = {}
        lines = [how]
        for role, src in plan.sources.items():
            kinds = src["kinds"] if src["kinds"] is not None else {"prebuilt": src["valid"]}
            for k, c in kinds.items():
                samples[k] = samples.get(k, 0) + c
            made = ", ".join(f"{k} {c}" for k, c in kinds.items() if c) or "nothing"
            lines.append(f"{role}: {src['rows']} rows in {src['uri']} ({src['bad']} bad, {src['heldout']} held out, "
                         f"{src['eligible']} used) -> {made}")
        return DataCounts({k: c for k, c in samples.items() if c}, lines)
    lines = [how + "; the sources are not readable here, so by formula (N safety triples, M helpful pairs):"]
    if d.prebuilt is not None:
        return DataCounts(None, lines + [f"prebuilt: every valid row of {d.prebuilt.uri}"])
    n = "N" if not d.holdout else f"N x (1 - data.holdout {d.holdout:g})"
    terms = []
    if d.safety is not None:
        for k in M.SAFETY_ORDER:
            a = amounts.get(k, 0)
            if a:
                terms.append(f"{k} = " + (f"{a} x {n}" if isinstance(a, float) else f"min({a}, {n})"))
    if d.helpful is not None and amounts.get("helpful"):
        a = amounts["helpful"]
        terms.append("helpful = " + (f"{a} x M" if isinstance(a, float) else f"min({a}, M)"))
    lines.append(", ".join(terms) or "no samples")
    if d.mix.triples == "shared":
        lines.append("(triples shared: the safety kinds draw from the same triples)")
    return DataCounts(None, lines)


# --------------------------------------------------------------------------- output
def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def print_plan(cfg: ExperimentConfig, stages: Iterable[str] = STAGES, *, show_config: bool = True,
               gpus_per_node: int = GPUS_PER_NODE, model: str | None = None) -> bool:
    """Print config, resources and memory; False when the run cannot fit the GPUs it names."""
    from rich.console import Console
    from rich.table import Table

    stages = tuple(stages)
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 110  # job logs and pipes: no wrapping at 80 columns
    if show_config:
        console.rule("resolved config (secrets redacted)")
        console.print(dump_yaml(cfg.redacted()), markup=False)
    plan = make_plan(cfg, stages, gpus_per_node=gpus_per_node, model=model)
    t, r, shape = cfg.train, plan.resources, plan.shape
    console.rule("resources")
    if plan.train is not None:
        accel = f"{r.train_gpus} GPU" if r.train_gpus else "no GPU"
        trials = f" x {r.concurrent_trials} concurrent trials" if r.concurrent_trials > 1 else ""
        console.print(f"train: {t.workers} workers x ({t.cpus_per_worker:g} CPU{', 1 GPU' if t.use_gpu else ''}) = "
                      f"{r.train_cpus:g} CPU, {accel}{trials}; method={t.method}, "
                      f"{'LoRA r=' + str(cfg.model.lora.r) if cfg.model.lora else 'full fine-tuning'}, "
                      f"FSDP2={t.fsdp.enabled}, activation checkpointing={t.fsdp.activation_checkpointing}")
        console.print(f"       global batch {t.global_batch} samples per optimizer step, packed into rows of "
                      f"{cfg.data.max_len} tokens; micro-batches of {t.micro_batch} rows per worker")
    if plan.eval is not None:
        gpus = f"{r.gpus_per_actor} GPU(s) each" if r.gpus_per_actor else "CPU"
        judge = f" + LLM judge ({r.judge_gpus} GPU)" if r.judge_gpus else ""
        console.print(f"{'generate' if 'generate' in stages else 'eval'}: {r.eval_actors} engine actor(s), {gpus}, "
                      f"engine={cfg.eval.engine}{judge}")
    if r.peak_gpus:
        console.print(f"peak: {r.peak_gpus} GPUs = {r.gpu_nodes} node(s) of {r.gpus_per_node} GPUs")
    if plan.train is not None:
        console.print(f"training memory per {'GPU' if t.use_gpu else 'worker'}: {model or cfg.model.name_or_path}, {_count(shape.params)} params"
                      + (f", {_count(shape.lora_params)} LoRA" if cfg.model.lora else "") + f", {t.workers} shards")
        table = Table()
        table.add_column("part")
        table.add_column("GiB", justify="right")
        for part in MemoryEstimate.PARTS:
            value = getattr(plan.train, part)
            if value or part in ("weights", "grads", "optimizer", "activations"):
                table.add_row(part.replace("_", " "), f"{value / GiB:.2f}")
        table.add_row(f"total (+{HEADROOM:.0%} headroom)", f"{plan.train.total / GiB:.2f}")
        console.print(table)
    if plan.eval is not None:
        console.print(f"{'generation' if 'generate' in stages else 'eval'} memory per {'GPU' if r.gpus_per_actor else 'engine'} "
                      f"({model or cfg.model.name_or_path}): weights {plan.eval.weights / GiB:.2f} GiB + KV cache of one batch "
                      f"{plan.eval.kv_cache / GiB:.2f} GiB = {plan.eval.total / GiB:.2f} GiB"
                      + ("" if r.gpus_per_actor else " (on CPU)"))
    if plan.train is not None:
        counts = data_counts(cfg)
        console.rule("data and optimizer steps")
        for line in counts.lines:
            console.print(line, markup=False)
        if counts.total is not None:
            per_epoch, total = optimizer_steps(counts.total, cfg)
            kinds = " + ".join(f"{c} {k}" for k, c in counts.samples.items())
            console.print(f"samples: {kinds} = {counts.total}; optimizer steps: ceil({counts.total} / global batch "
                          f"{t.global_batch}) = {per_epoch} per epoch, {total} in all"
                          + (" (train.max_steps)" if t.max_steps else f" ({t.epochs:g} epochs)"), markup=False)
        else:
            console.print(f"optimizer steps: ceil(samples / global batch {t.global_batch}) per epoch x {t.epochs:g} epochs"
                          + (f" (train.max_steps={t.max_steps} caps it)" if t.max_steps else ""), markup=False)
    for note in plan.notes:
        console.print(f"[yellow]note: {note}")
    if not t.use_gpu and plan.train is not None:
        console.print(f"(train.use_gpu is false: the fit check against {t.gpu_memory_gb:g} GiB applies to GPU runs)")
    for problem in plan.problems:
        console.print(f"[red]does not fit: {problem}")
    console.print("[green]plan fits" if plan.fits else "[red]plan does not fit: nothing was requested from Ray")
    return plan.fits
