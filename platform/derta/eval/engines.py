"""Inference engines behind one interface: `Engine.generate(requests) -> list[str]`.

A `GenRequest` carries an already rendered prompt: token ids from derta.prompts (the run's
template: inst / raw / llama3 / chat_template, the same renderer the training rows came from),
or raw completion text (no template: CompletingAttack, HarmBench-style judges), plus an optional
start of the assistant turn (prefill, as ids or text) that the model continues. Engines never
apply a chat template themselves, so a base model without one evaluates fine. Both engines turn
a request into prompt ids with the same function (`render_prompt_ids`), so HF and vLLM see
identical prompts and a prefill of token ids is exact (no re-tokenisation at the seam).

* HFEngine: transformers, batched, left-padded, CPU or GPU, greedy by default, stops at eos/eot.
* VLLMEngine: vllm.LLM (tensor parallel, LoRA adapters via LoRARequest), fed token-id prompts.
  vllm is imported lazily (it lives in the `gpu` extra).
* EngineActor: a thin Ray actor around either; EngineUDF: the same for Ray Data map_batches.

`engine: auto` picks vLLM when it is importable and a GPU is present, else HF.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from derta.config import ConfigError, ExperimentConfig
from derta.preflight import vllm_max_lora_rank


# --------------------------------------------------------------------------- requests
@dataclass
class GenRequest:
    """One generation. Exactly one of `prompt_ids` (a rendered prompt, derta.prompts) or `prompt`
    (raw completion text; the tokenizer's own special tokens such as BOS are added) is set.

    prefill_text / prefill_ids: the start of the assistant turn, appended after the prompt; the
    engine continues from there and returns only the new text (not the prefill).
    user: the user turn before rendering, kept for the record (generations.jsonl `prompt`).
    """

    prompt_ids: list[int] | None = None
    prompt: str | None = None
    prefill_text: str | None = None
    prefill_ids: list[int] | None = None
    user: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.prompt_ids is None) == (self.prompt is None):
            raise ValueError("GenRequest needs exactly one of prompt_ids (rendered) or prompt (raw completion)")
        if self.prefill_text is not None and self.prefill_ids is not None:
            raise ValueError("GenRequest: give prefill_text or prefill_ids, not both")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "GenRequest":
        return cls(**json.loads(text))

    def display(self) -> str:
        """Human-readable prompt for generations.jsonl (the user turn, or the raw prompt)."""
        if self.user is not None:
            return self.user
        return self.prompt or ""


class Engine(Protocol):
    def generate(self, requests: Sequence[GenRequest]) -> list[str]: ...


def render_prompt_ids(tokenizer: Any, req: GenRequest) -> list[int]:
    """The exact token ids the model is fed: the rendered prompt (or raw text), then the prefill."""
    if req.prompt_ids is not None:
        ids = [int(i) for i in req.prompt_ids]
        if req.prefill_text:
            ids += list(tokenizer.encode(req.prefill_text, add_special_tokens=False))
    else:
        ids = list(tokenizer.encode(req.prompt + (req.prefill_text or ""), add_special_tokens=True))
    if req.prefill_ids:
        ids += [int(i) for i in req.prefill_ids]
    return ids


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """eos from the generation config and the tokenizer, plus end-of-turn tokens if present."""
    ids: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for v in ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id]:
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    for tok in ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        if isinstance(tid, int) and tid not in ids:
            ids.append(tid)
    return ids


# --------------------------------------------------------------------------- model references
def split_model_ref(model: str) -> tuple[str, str | None]:
    """(base model path, LoRA adapter path or None). A directory holding adapter_config.json is an
    adapter; its base comes from base_model_name_or_path. Resolves builtin:tiny and s3://."""
    from derta.models import resolve_model_path

    path = resolve_model_path(model)
    cfg_file = os.path.join(path, "adapter_config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            base = json.load(f).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{cfg_file}: adapter without base_model_name_or_path")
        return resolve_model_path(base), path
    return path, None


def _tokenizer_dir(base: str, adapter: str | None) -> str:
    if adapter and any(os.path.isfile(os.path.join(adapter, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return adapter
    return base


def load_eval_tokenizer(model: str):
    from transformers import AutoTokenizer

    base, adapter = split_model_ref(model)
    tok = AutoTokenizer.from_pretrained(_tokenizer_dir(base, adapter))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to build an engine in another process (plain, picklable values)."""

    model: str
    kind: str = "hf"  # "hf" | "vllm"
    dtype: str = "auto"
    use_gpu: bool = False
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    batch_size: int = 16
    seed: int = 0
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.85
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_gpus(self) -> float:
        """GPUs per engine: tensor_parallel x pipeline_parallel for vLLM; HF runs on one device."""
        if not self.use_gpu:
            return 0.0
        return float(self.tensor_parallel * self.pipeline_parallel) if self.kind == "vllm" else 1.0


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def gpu_available() -> bool:
    """A GPU here or in the Ray cluster this process is connected to."""
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except Exception:  # pragma: no cover
        pass
    try:
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    except Exception:  # pragma: no cover
        return False


def choose_engine(kind: str) -> tuple[str, bool]:
    """eval.engine -> (engine kind, use_gpu)."""
    gpu = gpu_available()
    if kind == "auto":
        return ("vllm" if (gpu and vllm_available()) else "hf"), gpu
    if kind == "vllm":
        if not vllm_available():
            raise ConfigError("eval.engine=vllm but vllm is not installed (pip install -e .[gpu])")
        if not gpu:
            raise ConfigError("eval.engine=vllm needs a GPU; none found (use eval.engine=hf or auto)")
        return "vllm", True
    return "hf", gpu


def spec_from_config(cfg: ExperimentConfig, model: str) -> EngineSpec:
    kind, gpu = choose_engine(cfg.eval.engine)
    return EngineSpec(
        model=model, kind=kind, dtype=cfg.model.dtype, use_gpu=gpu, tensor_parallel=cfg.eval.tensor_parallel,
        pipeline_parallel=cfg.eval.pipeline_parallel, batch_size=cfg.eval.batch_size, seed=cfg.eval.seed,
        max_model_len=cfg.eval.max_model_len, gpu_memory_utilization=cfg.eval.gpu_memory_utilization,
    )


def make_engine(spec: EngineSpec) -> "HFEngine | VLLMEngine":
    if spec.kind == "vllm":
        return VLLMEngine(spec)
    if spec.kind == "hf":
        return HFEngine(spec)
    raise ConfigError(f"eval.engine: unknown engine {spec.kind!r} (auto | vllm | hf)")


# --------------------------------------------------------------------------- HF
class HFEngine:
    """transformers generate, batched with left padding (so every row's new tokens start at the
    same column). Greedy unless a request asks for temperature > 0."""

    def __init__(self, spec: EngineSpec) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from derta.models import torch_dtype

        self.spec = spec
        base, adapter = split_model_ref(spec.model)
        self.tokenizer = load_eval_tokenizer(spec.model)
        self.device = torch.device("cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype(spec.dtype, self.device.type == "cuda"))
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        self.model = model.to(self.device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer, getattr(self.model, "generation_config", None))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.tokens_generated = 0  # new tokens (up to the stop token) over this engine's life

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        # One generate call per sampling setting; within it, batches of spec.batch_size.
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.max_new_tokens, r.temperature, r.seed), []).append(i)
        for (max_new, temp, seed), idx in groups.items():
            prompts = [render_prompt_ids(self.tokenizer, requests[i]) for i in idx]
            # Similar lengths together: less padding, and batch results do not depend on order.
            order = sorted(range(len(idx)), key=lambda j: len(prompts[j]))
            bs = max(1, self.spec.batch_size)
            for s in range(0, len(order), bs):
                chunk = order[s : s + bs]
                texts = self._generate_ids([prompts[j] for j in chunk], max_new, temp, seed)
                for j, t in zip(chunk, texts):
                    out[idx[j]] = t
        return [t or "" for t in out]

    def _generate_ids(self, batch: list[list[int]], max_new: int, temperature: float, seed: int) -> list[str]:
        import torch

        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p) :] = 1
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new, eos_token_id=self.stop_ids, pad_token_id=self.pad_id, do_sample=temperature > 0
        )
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
            torch.manual_seed(seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            gen = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
            )
        new = gen[:, width:].tolist()
        texts = []
        for row in new:
            cut = next((k for k, t in enumerate(row) if t in self.stop_ids), len(row))
            self.tokens_generated += cut
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
        return texts


# --------------------------------------------------------------------------- vLLM
class VLLMEngine:
    """vllm.LLM on token-id prompts (rendered like HF, so a prefill continues the assistant turn
    exactly); LoRA adapter directories are served through LoRARequest."""

    def __init__(self, spec: EngineSpec) -> None:
        try:
            from vllm import LLM
        except ImportError as e:  # pragma: no cover - exercised only where vllm is missing
            raise ConfigError("eval.engine=vllm but vllm is not importable: " + str(e)) from None
        self.spec = spec
        base, adapter = split_model_ref(spec.model)
        self.adapter = adapter
        self.tokenizer = load_eval_tokenizer(spec.model)
        kwargs: dict[str, Any] = dict(
            model=base, tokenizer=_tokenizer_dir(base, adapter), tensor_parallel_size=spec.tensor_parallel,
            pipeline_parallel_size=spec.pipeline_parallel,
            dtype={"auto": "auto", "float32": "float32", "bf16": "bfloat16", "fp16": "float16"}[spec.dtype],
            seed=spec.seed, gpu_memory_utilization=spec.gpu_memory_utilization, enable_lora=adapter is not None,
        )
        if spec.max_model_len:
            kwargs["max_model_len"] = spec.max_model_len
        if adapter:
            with open(os.path.join(adapter, "adapter_config.json")) as f:
                kwargs["max_lora_rank"] = vllm_max_lora_rank(int(json.load(f).get("r", 16)))
        kwargs.update(spec.extra)
        self.llm = LLM(**kwargs)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.tokens_generated = 0

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=render_prompt_ids(self.tokenizer, r)) for r in requests]
        params = [
            SamplingParams(
                max_tokens=r.max_new_tokens, temperature=r.temperature, seed=r.seed if r.temperature > 0 else None,
                stop_token_ids=self.stop_ids, skip_special_tokens=True,
            )
            for r in requests
        ]
        lora = None
        if self.adapter:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("derta-adapter", 1, self.adapter)
        outs = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        self.tokens_generated += sum(len(o.outputs[0].token_ids) for o in outs)
        return [o.outputs[0].text for o in outs]


# --------------------------------------------------------------------------- Ray edges
class EngineActor:
    """Ray actor holding one engine: `ray.remote(EngineActor).options(num_gpus=...).remote(spec)`.
    Use `engine_actor(spec)` to get the right resources."""

    def __init__(self, spec: EngineSpec) -> None:
        self.engine = make_engine(spec)

    def generate(self, requests: list[GenRequest]) -> list[str]:
        return self.engine.generate(requests)


def engine_actor(spec: EngineSpec):
    import ray

    return ray.remote(EngineActor).options(num_gpus=spec.num_gpus, num_cpus=1).remote(spec)


class RemoteEngine:
    """The Engine interface over an EngineActor handle (for driver-side loops such as PAIR)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        import ray

        return ray.get(self.handle.generate.remote(list(requests)))


class EngineUDF:
    """Ray Data map_batches callable class: column `request` (GenRequest JSON) -> `response`."""

    def __init__(self, spec: EngineSpec) -> None:
        self.engine = make_engine(spec)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        reqs = [GenRequest.from_json(str(r)) for r in batch["request"]]
        batch["response"] = np.array(self.engine.generate(reqs), dtype=object)
        return batch


def map_generate(ds: Any, spec: EngineSpec, num_actors: int = 1, batch_size: int = 16) -> Any:
    """ds (with a `request` column) -> ds with `response`, on an actor pool of engines."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        EngineUDF,
        fn_constructor_kwargs={"spec": spec},
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=num_actors),
        num_gpus=spec.num_gpus or None,
        num_cpus=1,
        batch_format="numpy",
    )
