"""`derta plan`: what a run will ask the cluster for, and whether it fits, before asking.

Per-GPU memory under FSDP2 full sharding over N = train.workers GPUs, P parameters,
L layers, hidden size h, vocabulary V, micro-batch b, sequence length s (bytes):

  full fine-tuning (fp32 master params, bf16 compute, AdamW):
      params 4P/N + grads 4P/N + Adam moments 8P/N            = 16P/N
  LoRA (frozen base in the compute dtype, trainable adapters of A parameters):
      base 2P/N (bf16) + adapters 16A/N
  gathered layer (all-gather of one decoder layer, double-buffered): 2 * 2 * P_layer
  activations, bf16 (Korthikanti et al. 2022, with flash/SDPA attention):
      with activation checkpointing: 2*b*s*h per layer (layer inputs) + 34*b*s*h (one layer live)
      without:                       34*b*s*h per layer
  loss: one chunk of fp32 logits and its gradient: 2 * 4 * chunk * V

The estimate leaves out the CUDA context and allocator fragmentation; `headroom` (10%) covers them.
"""

from __future__ import annotations

from dataclasses import dataclass

from derta.config import ExperimentConfig, dump_yaml

GiB = 1024**3
HEADROOM = 0.10


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    hidden: int
    vocab: int
    lora_params: int = 0

    @property
    def layer_params(self) -> int:
        return max(1, (self.params - 2 * self.vocab * self.hidden) // max(1, self.layers))


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    grads: float
    optimizer: float
    gathered: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.gathered + self.activations + self.logits) * (
            1 + HEADROOM
        )


def estimate_memory(shape: ModelShape, cfg: ExperimentConfig) -> MemoryEstimate:
    """Bytes per GPU (see the module docstring for each formula)."""
    n = cfg.train.workers
    p = shape.params
    b, s, h = cfg.train.micro_batch, cfg.data.max_len, shape.hidden
    if cfg.model.lora is not None:
        weights = 2 * p / n + 4 * shape.lora_params / n
        grads = 4 * shape.lora_params / n
        optimizer = 8 * shape.lora_params / n
    else:
        weights, grads, optimizer = 4 * p / n, 4 * p / n, 8 * p / n
    gathered = 2 * 2 * shape.layer_params
    per_layer = 34 * b * s * h
    if cfg.train.fsdp.activation_checkpointing:
        activations = 2 * b * s * h * shape.layers + per_layer
    else:
        activations = per_layer * shape.layers
    logits = 2 * 4 * min(cfg.train.loss.chunk_size, b * s) * shape.vocab
    return MemoryEstimate(weights, grads, optimizer, gathered, activations, logits)


def model_shape(cfg: ExperimentConfig) -> ModelShape:
    """Count parameters from the model's config on the meta device: no weights are loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from derta.models import resolve_model_path

    hf = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, trust_remote_code=cfg.model.trust_remote_code)
    params = sum(p.numel() for p in model.parameters())
    lora = 0
    if cfg.model.lora is not None:
        targets = set(cfg.model.lora.target_modules)
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
                lora += cfg.model.lora.r * (module.in_features + module.out_features)
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    return ModelShape(params, text.num_hidden_layers, text.hidden_size, text.vocab_size, lora)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def print_plan(cfg: ExperimentConfig) -> bool:
    """Print config, resources and memory; False when the run cannot fit the GPUs it names."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.rule("resolved config (secrets redacted)")
    console.print(dump_yaml(cfg.redacted()), markup=False)
    t = cfg.train
    console.rule("resources")
    accel = f"{t.workers} x GPU" if t.use_gpu else "no GPU"
    console.print(f"train: {t.workers} workers x {t.cpus_per_worker} CPU, {accel}; method={t.method}, "
                  f"{'LoRA' if cfg.model.lora else 'full fine-tuning'}, FSDP2={t.fsdp.enabled}")
    console.print(f"eval: {cfg.eval.num_actors} engine actor(s) x {cfg.eval.tensor_parallel} GPU(s), engine={cfg.eval.engine}")
    shape = model_shape(cfg)
    est = estimate_memory(shape, cfg)
    table = Table(title=f"per-GPU memory estimate: {_count(shape.params)} params, {t.workers} shards")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for part in ("weights", "grads", "optimizer", "gathered", "activations", "logits"):
        table.add_row(part, f"{getattr(est, part) / GiB:.2f}")
    table.add_row(f"total (+{HEADROOM:.0%} headroom)", f"{est.total / GiB:.2f}")
    console.print(table)
    if t.use_gpu and est.total > t.gpu_memory_gb * GiB:
        console.print(f"[red]does not fit: {est.total / GiB:.1f} GiB > {t.gpu_memory_gb} GiB per GPU "
                      "(more workers, LoRA, activation checkpointing or a smaller micro_batch)")
        return False
    return True
