"""Models and tokenizers: loading (HF id, local dir, s3://, builtin:*), the refusal token,
LoRA, and a tiny offline model factory.

The tiny factory writes an ordinary Hugging Face directory (random-init Llama + a real fast
BPE tokenizer trained offline on the demo corpus), so tests and the demo go through exactly the
`from_pretrained` path real models use. Two tokenizer flavours:
  * builtin:tiny / builtin:small: a Llama-3-Instruct-like chat model (chat template, <|eot_id|>
    ends a turn, a pad token);
  * builtin:llama3-base: the stand-in for the BASE Llama-3 models the shipped 8B/70B jobs
    train: Llama-3's pre-tokenizer regex + byte-level BPE, its 256 special tokens after the
    vocabulary (<|begin_of_text|> added to every encode, <|end_of_text|> as EOS), NO chat
    template and no pad token, "Sorry" one token. The CPU twins of the jobs run on it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# Llama-3's split pattern (its tokenizer.json pre_tokenizer), applied before byte-level BPE.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_special_tokens() -> list[str]:
    """Llama-3's 256 special tokens in its order (ids 128000..128255 there)."""
    named = {0: BOS, 1: EOS, 6: HEADER_START, 7: HEADER_END, 9: EOT}
    out, reserved = [], 0
    for i in range(256):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


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
    base_tokenizer: bool = False  # True: the Llama-3 base stand-in (build_llama3_base_tokenizer)


# builtin:tiny is the demo's and the tests' model; builtin:small has room for the science check
# (a base that complies and a safety tuning that changes only where the model refuses).
BUILTIN_SPECS = {
    BUILTIN_TINY: TinySpec(),
    "builtin:small": TinySpec(hidden_size=128, intermediate_size=384),
    # 4,000+ BPE pieces so the loss head's [chunk, vocab] blocks are not trivially small.
    "builtin:llama3-base": TinySpec(vocab_size=4096, base_tokenizer=True),
}


# Models shipped with the package (HF directories under derta/assets/, package data), each made
# only by its script: builtin:demo-base, the complying base of `derta run` (derta.experiments.demo_base).
SHIPPED = {"builtin:demo-base": Path(__file__).resolve().parent / "assets" / "demo_base"}
SHIPPED_SCRIPTS = {"builtin:demo-base": "python -m derta.experiments.demo_base"}


def cache_dir() -> Path:
    """$DERTA_CACHE (an empty value counts as unset, as in derta.storage), else ~/.cache/derta."""
    return Path(os.environ.get("DERTA_CACHE") or Path.home() / ".cache" / "derta")


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


def _pseudo_words(n: int = 6000) -> list[str]:
    """Deterministic made-up words (syllable strings) that give BPE enough to merge for a vocabulary
    of a few thousand pieces; the demo corpus alone stops near 1,200."""
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "n", "r", "s", "x"]
    syll = [o + v + c for o in onsets for v in vowels for c in codas]
    return [" ".join(syll[(i * 7919 + j * 104729) % len(syll)] + syll[(i * 31 + j * 17) % len(syll)]
                     for j in range(8)) for i in range(n)]


def build_llama3_base_tokenizer(vocab_size: int = 4096):
    """A tokenizer with what matters of base Llama-3's (see the module docstring), trained on the
    demo corpus offline. Llama-3 has "Sorry" as one token (19701); so does this one."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from derta.demo import corpus_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    extra = ["Sorry, I'm sorry. Sorry, I cannot help with that. Sure, here is how. The answer is 0 1 2 3 4 5 6 7 8 9."] * 8
    tok.train_from_iterator(list(corpus_text()) + extra + _pseudo_words(), trainer=trainer)
    if tok.token_to_id("Sorry") is None:
        tok.add_tokens(["Sorry"])
    specials = llama3_special_tokens()
    tok.add_special_tokens(specials)  # appended after the vocabulary, as in Llama-3
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=None,
                                   model_max_length=8192)


def build_tiny_model(path: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a random-init Llama + tokenizer as an HF directory at `path` (atomically)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if spec.base_tokenizer:
        tokenizer = build_llama3_base_tokenizer(spec.vocab_size)
        eos_ids = [tokenizer.eos_token_id]
    else:
        tokenizer = build_tiny_tokenizer(spec.vocab_size)
        eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOS)]
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
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return save_model_dir(model, tokenizer, path)


def save_model_dir(model: Any, tokenizer: Any, path: Path, files: dict[str, str] | None = None) -> Path:
    """model + tokenizer (+ extra text files) as an HF directory at `path`, atomically: written
    to a temporary sibling, then renamed over any old one; readable by everyone (mkdtemp's 0700
    would make an installed copy unreadable to other users)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
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
    of a cluster builds the same weights); builtin:demo-base -> the directory shipped in the
    package; s3://... -> a local copy; HF ids and local dirs pass
    through unchanged.
    """
    if name_or_path in BUILTIN_SPECS:
        path = cache_dir() / "builtin" / f"{name_or_path.split(':', 1)[1]}-{TINY_VERSION}"
        if not (path / "config.json").exists():
            build_tiny_model(path, BUILTIN_SPECS[name_or_path])
        return str(path)
    if name_or_path in SHIPPED:
        if not (SHIPPED[name_or_path] / "config.json").is_file():
            raise ConfigError(f"model.name_or_path: {name_or_path} is missing from this install ({SHIPPED[name_or_path]}); "
                              f"make it with `{SHIPPED_SCRIPTS[name_or_path]}`")
        return str(SHIPPED[name_or_path])
    if name_or_path.startswith("builtin:"):
        known = ", ".join([*BUILTIN_SPECS, *SHIPPED])
        raise ConfigError(f"model.name_or_path: unknown builtin model {name_or_path!r} (known: {known})")
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
