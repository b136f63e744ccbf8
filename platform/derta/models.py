"""Models and tokenizers: loading (HF id, local dir, s3://, builtin:tiny), the refusal token,
LoRA, and a tiny offline model factory.

The tiny factory writes an ordinary Hugging Face directory (random-init Llama + a real fast
BPE tokenizer trained offline on the demo corpus, with a Llama-3-style chat template), so
tests and the demo go through exactly the `from_pretrained` path real models use.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from derta.config import ConfigError, LoraConfig, ModelConfig

BUILTIN_TINY = "builtin:tiny"
TINY_VERSION = "v1"  # bump when the factory's output changes

BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, EOT, PAD, HEADER_START, HEADER_END]

# Llama-3's layout: <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    vocab_size: int = 1024  # BPE target size; the real size is what training yields
    seed: int = 0


# builtin:tiny is the demo's and the tests' model; builtin:small has room for the science check
# (a base that complies and a safety tuning that changes only where the model refuses).
BUILTIN_SPECS = {BUILTIN_TINY: TinySpec(), "builtin:small": TinySpec(hidden_size=128, intermediate_size=384)}


def cache_dir() -> Path:
    return Path(os.environ.get("DERTA_CACHE", Path.home() / ".cache" / "derta"))


# --------------------------------------------------------------------------- tiny factory
def build_tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE fast tokenizer trained on the demo corpus (offline, < 1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from derta.demo import corpus_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    extra = ["Sorry, I'm sorry. I cannot help. Sure, here is how. The answer is 0 1 2 3 4 5 6 7 8 9."]
    tok.train_from_iterator(list(corpus_text()) + extra, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD, unk_token=None,
        additional_special_tokens=[EOS, HEADER_START, HEADER_END],
    )
    fast.chat_template = CHAT_TEMPLATE
    # The refusal token must be one id, as "Sorry" is in Llama-3 (id 19701).
    if len(fast.encode("Sorry", add_special_tokens=False)) != 1:
        fast.add_tokens(["Sorry"])
    return fast


def build_tiny_model(path: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a random-init Llama + tokenizer as an HF directory at `path` (atomically)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tiny_tokenizer(spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOS)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# --------------------------------------------------------------------------- resolving + loading
def resolve_model_path(name_or_path: str) -> str:
    """Turn a config's model reference into something `from_pretrained` accepts.

    builtin:tiny -> a cached local directory (built on first use, deterministic, so every node
    of a cluster builds the same weights); s3://... -> a local copy; HF ids and local dirs pass
    through unchanged.
    """
    if name_or_path in BUILTIN_SPECS:
        path = cache_dir() / "builtin" / f"{name_or_path.split(':', 1)[1]}-{TINY_VERSION}"
        if not (path / "config.json").exists():
            build_tiny_model(path, BUILTIN_SPECS[name_or_path])
        return str(path)
    if name_or_path.startswith("builtin:"):
        raise ConfigError(f"model.name_or_path: unknown builtin model {name_or_path!r} (known: {', '.join(BUILTIN_SPECS)})")
    if name_or_path.startswith("s3://"):
        from derta.storage import local_copy

        return str(local_copy(name_or_path))
    return name_or_path


def torch_dtype(name: str, use_gpu: bool) -> torch.dtype:
    """`auto` is bf16 on GPU and float32 on CPU (CPU bf16 is slow and lossy for tiny models)."""
    if name == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolve_model_path(cfg.name_or_path), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, *, use_gpu: bool = False, device: str | torch.device | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(cfg.name_or_path),
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=torch_dtype(cfg.dtype, use_gpu),
    )
    return model.to(device) if device is not None else model


def refusal_token_id(tokenizer, text: str = "Sorry", fallback: str | None = None) -> int:
    """The single token id RTO trains towards. Fails loudly rather than silently training
    towards the first piece of a multi-token word."""
    tried = []
    for key, candidate in (("train.refusal_token", text), ("train.refusal_token_fallback", fallback)):
        if candidate is None:
            continue
        ids = tokenizer.encode(candidate, add_special_tokens=False)
        if len(ids) == 1:
            return ids[0]
        tried.append(f"{key}={candidate!r} -> {len(ids)} tokens {ids}")
    raise ConfigError(
        "the tokenizer has no single token for the refusal text: " + "; ".join(tried)
        + ". Set train.refusal_token to a word that is one token (Llama-3: 'Sorry' = 19701) "
        "or train.refusal_token_fallback."
    )


def apply_lora(model, lora: LoraConfig):
    """Wrap `model` with peft LoRA adapters on the target modules it actually has."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in lora.target_modules if m in present]
    if not targets:
        raise ConfigError(f"model.lora.target_modules: none of {lora.target_modules} exist in this model")
    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, peft_cfg)
