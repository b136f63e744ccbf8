"""vLLM through Ray Data LLM (`ray.data.llm`): the processor config and stage graph built from
derta's config, the rows it is fed, and what comes back.

* Rows carry token ids rendered by derta's renderer (engines.render_prompt_ids, the function the
  HF engine uses too) in the column `tokenized_prompt`, which Ray's vLLMEngineStage hands to vLLM
  as a TokensPrompt. The chat-template and tokenize stages are OFF, so nothing re-renders or
  re-tokenises: a prefill stays byte-exact. The detokenize stage is off too: vLLM detokenises
  the new tokens itself (skip_special_tokens, cut at derta's stop ids), as the HF engine does.
* Per-row `sampling_params` (max_tokens, temperature, seed, stop_token_ids), so one dataset mixes
  attacks and helpfulness rows with different settings.
* LoRA: a run's adapter directory is served through the row's `model` column (a local adapter
  path, or its name under `dynamic_lora_loading_path` for s3:// adapters), engine_kwargs
  enable_lora + max_lora_rank.
* eval.batch_size, eval.num_actors (concurrency: engine replicas), eval.tensor_parallel,
  eval.pipeline_parallel, eval.max_model_len, eval.gpu_memory_utilization. TP/PP > 1: one
  placement-group bundle {GPU: 1, CPU: 1} per engine worker, STRICT_PACK (TP on one node's
  NVLink) unless pipeline stages may spread (PACK).
* eval.continue_on_error -> should_continue_on_error: a failed row comes back with
  `__inference_error__` set; the runner counts it (metrics.json "failed_rows") and never judges it.

Building the config needs no vLLM (it is a pydantic model in Ray); `build_processor` needs Ray up
and the model's tokenizer files; running it needs vLLM and a GPU.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from derta.config import ConfigError
from derta.eval.engines import EngineSpec, GenRequest, _tokenizer_dir, split_model_ref
from derta.preflight import vllm_max_lora_rank

DTYPES = {"auto": "auto", "float32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ERROR_COLUMN = "__inference_error__"
STAGES = ["vLLMEngineStage"]  # the stage graph derta builds: the engine alone (no template/tokenize/detokenize)


def lora_route(model_ref: str, adapter: str | None) -> tuple[str | None, str | None]:
    """(row `model` value, dynamic_lora_loading_path) for an adapter; (None, None) without one."""
    if adapter is None:
        return None, None
    if model_ref.startswith("s3://"):
        parent, _, name = model_ref.rstrip("/").rpartition("/")
        return name, parent
    return adapter, None


def engine_kwargs(spec: EngineSpec, base: str, adapter: str | None) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        tensor_parallel_size=spec.tensor_parallel, pipeline_parallel_size=spec.pipeline_parallel,
        dtype=DTYPES[spec.dtype], seed=spec.seed, gpu_memory_utilization=spec.gpu_memory_utilization,
        tokenizer=_tokenizer_dir(base, adapter),
    )
    if spec.max_model_len:
        kw["max_model_len"] = spec.max_model_len
    if adapter:
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            rank = int(json.load(f).get("r", 16))
        kw.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(rank), max_loras=1)
    kw.update(spec.extra)
    return kw


def processor_config(spec: EngineSpec, *, num_actors: int = 1, continue_on_error: bool = True):
    """The ray.data.llm.vLLMEngineProcessorConfig for one evaluated model (validated by Ray's
    pydantic model: a bad field raises here, on the driver, before any GPU is asked for)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    if spec.kind != "vllm":
        raise ConfigError(f"eval.engine: the ray.data.llm processor serves vLLM, not {spec.kind!r}")
    base, adapter = split_model_ref(spec.model)
    _, dyn = lora_route(spec.model, adapter)
    kw = engine_kwargs(spec, base, adapter)
    workers = kw["tensor_parallel_size"] * kw["pipeline_parallel_size"]
    pg = None
    if workers > 1:
        pg = {"bundle_per_worker": {"GPU": 1, "CPU": 1}, "strategy": "STRICT_PACK" if kw["pipeline_parallel_size"] == 1 else "PACK"}
    try:
        return vLLMEngineProcessorConfig(
            model_source=base, engine_kwargs=kw, batch_size=spec.batch_size, concurrency=num_actors,
            chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
            should_continue_on_error=continue_on_error, dynamic_lora_loading_path=dyn, placement_group_config=pg,
            log_engine_metrics=False,
        )
    except ValueError as e:  # pydantic ValidationError is a ValueError
        raise ConfigError(f"eval (ray.data.llm vLLMEngineProcessorConfig): {e}") from None


def sampling_params(req: GenRequest, stop_ids: list[int]) -> dict[str, Any]:
    """vLLM SamplingParams fields for one request (greedy at temperature 0, as the HF engine)."""
    return {"max_tokens": int(req.max_new_tokens), "temperature": float(req.temperature), "seed": int(req.seed),
            "stop_token_ids": [int(i) for i in stop_ids], "skip_special_tokens": True, "detokenize": True}


def to_rows(records: Iterable[dict[str, Any]], prompt_ids: list[list[int]], requests: list[GenRequest],
            stop_ids: list[int], lora_model: str | None = None) -> list[dict[str, Any]]:
    """Processor input rows: derta's record (key, row) + tokenized_prompt + sampling_params (+ model)."""
    out = []
    for rec, ids, req in zip(records, prompt_ids, requests):
        row = {"key": rec["key"], "row": rec["row"], "tokenized_prompt": [int(i) for i in ids],
               "sampling_params": sampling_params(req, stop_ids)}
        if lora_model:
            row["model"] = lora_model
        out.append(row)
    return out


def from_output(row: dict[str, Any]) -> dict[str, Any]:
    """A processor output row (success or error: the same columns, postprocess is the identity)
    -> derta's record: key, row, response, error ('' when it worked)."""
    err = str(row.get(ERROR_COLUMN) or "")
    return {"key": row["key"], "row": row["row"], "response": "" if err else str(row.get("generated_text") or ""),
            "error": err}


def build(spec: EngineSpec, *, num_actors: int = 1, continue_on_error: bool = True):
    """ray.data.llm.build_processor over processor_config (needs Ray initialised)."""
    from ray.data.llm import build_processor

    return build_processor(processor_config(spec, num_actors=num_actors, continue_on_error=continue_on_error))


def stage_graph(processor: Any) -> list[str]:
    """The names of the processor's stages, in order (checked against STAGES in tests)."""
    return list(processor.stages.keys())


def generate(ds: Any, spec: EngineSpec, *, num_actors: int = 1, continue_on_error: bool = True) -> Any:
    """ds of to_rows() rows -> ds of from_output() records (lazy)."""
    proc = build(spec, num_actors=num_actors, continue_on_error=continue_on_error)
    return proc(ds).map(from_output)
