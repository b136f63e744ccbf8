"""vLLM through ray.data.llm, on CPU: the processor config is Ray's own pydantic model, built and
validated from derta's config; the stage graph checked against the installed Ray classes; rows
carry derta's token ids (prefill byte-exact) and per-row sampling params; LoRA routing; failed and
too-long rows counted. Running the processor needs vLLM + a GPU (benchmarks/gpu/run.sh)."""

from __future__ import annotations

import json

import pytest

from _fixtures import ray_local, tiny_model_dir, tiny_tokenizer  # noqa: F401
from derta.config import ConfigError, load_config
from derta.eval import ray_llm
from derta.eval.attacks import Question
from derta.eval.attacks import prefill as prefill_attack
from derta.eval.engines import EngineSpec, render_prompt_ids, stop_token_ids
from derta.eval.failures import failure_counts, split_too_long
from derta.prompts import Renderer


def _spec(model, **kw):
    return EngineSpec(model=model, kind="vllm", use_gpu=True, dtype="bf16", batch_size=8, **kw)


def test_processor_config_is_rays_validated_model(tiny_model_dir):
    from ray.data.llm import vLLMEngineProcessorConfig

    c = ray_llm.processor_config(_spec(tiny_model_dir, max_model_len=512), num_actors=3, continue_on_error=True)
    assert isinstance(c, vLLMEngineProcessorConfig)
    assert (c.batch_size, c.concurrency, c.should_continue_on_error) == (8, 3, True)
    assert not c.chat_template_stage and not c.tokenize_stage and not c.detokenize_stage  # derta renders, vLLM detokenises
    kw = c.engine_kwargs
    assert (kw["tensor_parallel_size"], kw["pipeline_parallel_size"], kw["dtype"], kw["max_model_len"]) == (1, 1, "bfloat16", 512)
    assert c.placement_group_config is None and "enable_lora" not in kw
    tp = ray_llm.processor_config(_spec(tiny_model_dir, tensor_parallel=4), num_actors=1)
    assert tp.placement_group_config["bundle_per_worker"] == {"GPU": 1.0, "CPU": 1.0}
    assert tp.placement_group_config["strategy"] == "STRICT_PACK"
    pp = ray_llm.processor_config(_spec(tiny_model_dir, tensor_parallel=2, pipeline_parallel=2))
    assert pp.placement_group_config["strategy"] == "PACK" and pp.engine_kwargs["pipeline_parallel_size"] == 2
    with pytest.raises(ConfigError, match="vLLMEngineProcessorConfig"):
        ray_llm.processor_config(_spec(tiny_model_dir), num_actors=0)
    with pytest.raises(ConfigError, match="serves vLLM"):
        ray_llm.processor_config(EngineSpec(model=tiny_model_dir, kind="hf"))


def test_config_fields_reach_the_spec(tiny_model_dir, monkeypatch):
    from derta.eval import engines

    monkeypatch.setattr(engines, "choose_engine", lambda kind: ("vllm", True))
    cfg = load_config(None, ["eval.tensor_parallel=2", "eval.pipeline_parallel=2", "eval.batch_size=32",
                             "eval.max_model_len=2048", "eval.num_actors=2"])
    spec = engines.spec_from_config(cfg, tiny_model_dir)
    assert (spec.tensor_parallel, spec.pipeline_parallel, spec.max_model_len, spec.num_gpus) == (2, 2, 2048, 4.0)
    c = ray_llm.processor_config(spec, num_actors=cfg.eval.num_actors, continue_on_error=cfg.eval.continue_on_error)
    assert c.concurrency == 2 and c.batch_size == 32 and c.should_continue_on_error


def test_rows_carry_derta_token_ids_and_per_row_sampling(tiny_model_dir, tiny_tokenizer):
    cfg = load_config(None, ["eval.prefill_k=[0,5]", "eval.max_new_tokens=7"])
    r = Renderer.make("inst", tiny_tokenizer)
    q = Question("a", "How do I make a wexxel?", "Sure, here is how to do it with a wexxel. Step 1: take the jar.")
    items = prefill_attack.build([q], cfg, r)
    items[1].request.temperature = 0.7  # per-row sampling settings survive
    stop = stop_token_ids(tiny_tokenizer)
    ids = [render_prompt_ids(tiny_tokenizer, it.request) for it in items]
    rows = ray_llm.to_rows([{"key": it.key, "row": "{}"} for it in items], ids, [it.request for it in items], stop)
    assert rows[1]["tokenized_prompt"] == r.prompt_ids(q.question) + r.prefill_ids(q.harmful, 5)  # byte-exact prefill
    assert rows[0]["sampling_params"] == {"max_tokens": 7, "temperature": 0.0, "seed": 0, "stop_token_ids": stop,
                                          "skip_special_tokens": True, "detokenize": True}
    assert rows[1]["sampling_params"]["temperature"] == 0.7 and "model" not in rows[0]
    ok = ray_llm.from_output({"key": "k", "row": "{}", "generated_text": "hi", ray_llm.ERROR_COLUMN: ""})
    bad = ray_llm.from_output({"key": "k", "row": "{}", "generated_text": "", ray_llm.ERROR_COLUMN: "ValueError: x"})
    assert ok == {"key": "k", "row": "{}", "response": "hi", "error": ""} and bad["error"] == "ValueError: x"


def test_lora_adapters_are_routed_per_row(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny_model_dir, "r": 96}))
    c = ray_llm.processor_config(_spec(str(adapter)))
    assert c.model_source == tiny_model_dir and c.engine_kwargs["enable_lora"] and c.engine_kwargs["max_lora_rank"] == 128
    assert ray_llm.lora_route(str(adapter), str(adapter)) == (str(adapter), None)
    assert ray_llm.lora_route("s3://b/runs/r1/model", "/cache/x") == ("model", "s3://b/runs/r1")
    rows = ray_llm.to_rows([{"key": "k", "row": "{}"}], [[1, 2]], [_req()], [0], lora_model=str(adapter))
    assert rows[0]["model"] == str(adapter)


def _req():
    from derta.eval.engines import GenRequest

    return GenRequest(prompt_ids=[1, 2])


def test_too_long_and_failed_rows_are_counted(tiny_tokenizer):
    from derta.eval.engines import GenRequest

    class It:
        def __init__(self, key, n, new):
            self.key, self.request = key, GenRequest(prompt_ids=list(range(n)), max_new_tokens=new)

    items = [It("a", 10, 5), It("b", 30, 5), It("c", 20, 5)]
    keep, ids, long_rows = split_too_long(items, tiny_tokenizer, 25, lambda it: {"key": it.key, "attack": "direct"})
    assert [it.key for it in keep] == ["a", "c"] and [len(i) for i in ids] == [10, 20]
    assert [r["key"] for r in long_rows] == ["b"] and "30 prompt + 5 new tokens > 25" in long_rows[0]["error"]
    rows = long_rows + [{"key": "d", "attack": "prefill", "error": "RuntimeError: boom"}, {"key": "e", "attack": "prefill"}]
    m = failure_counts(rows, 25)
    assert m["too_long"] == {"n": 1, "by_attack": {"direct": 1}, "context": 25}
    assert m["failed_rows"]["n"] == 1 and m["failed_rows"]["by_attack"] == {"prefill": 1}
    assert split_too_long(items, tiny_tokenizer, None, dict)[0] == items  # unknown context: nothing skipped


@pytest.mark.slow
def test_stage_graph_against_installed_ray(ray_local, tiny_model_dir):
    """build_processor on CPU (no vLLM needed to build): the stage graph is the engine stage alone,
    our rows hold its required inputs, and TP > 1 schedules through placement-group bundles."""
    from ray.llm._internal.batch.stages import vLLMEngineStage

    proc = ray_llm.build(_spec(tiny_model_dir), num_actors=2)
    assert ray_llm.stage_graph(proc) == ray_llm.STAGES
    stage = proc.stages["vLLMEngineStage"]
    assert isinstance(stage, vLLMEngineStage)
    assert set(stage.get_required_input_keys()) <= {"sampling_params"}
    assert {"tokenized_prompt", "model"} <= set(stage.get_optional_input_keys())
    assert stage.map_batches_kwargs["num_gpus"] == 1 and stage.fn_constructor_kwargs["should_continue_on_error"]
    assert stage.map_batches_kwargs["compute"].max_size == 2
    tp = ray_llm.build(_spec(tiny_model_dir, tensor_parallel=2), num_actors=1).stages["vLLMEngineStage"]
    assert tp.map_batches_kwargs["num_gpus"] == 0 and "ray_remote_args_fn" in tp.map_batches_kwargs
    assert tp.fn_constructor_kwargs["engine_kwargs"]["distributed_executor_backend"] == "ray"


def _gpu_and_vllm() -> bool:
    import importlib.util

    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _gpu_and_vllm(), reason="needs vllm and a CUDA GPU")
def test_processor_runs_and_counts_a_failed_row(ray_local, tiny_model_dir, tiny_tokenizer):
    """On a GPU: the processor generates from derta's ids; a row with an out-of-vocabulary id fails
    alone (should_continue_on_error) and comes back with its error, not a response."""
    import ray

    from derta.eval.engines import GenRequest

    reqs = [GenRequest(prompt_ids=tiny_tokenizer("How do I bake bread?")["input_ids"], max_new_tokens=8) for _ in range(3)]
    ids = [r.prompt_ids for r in reqs]
    ids[2] = ids[2] + [10**7]  # not a token of this vocabulary
    rows = ray_llm.to_rows([{"key": f"k{i}", "row": "{}"} for i in range(3)], ids, reqs, stop_token_ids(tiny_tokenizer))
    spec = EngineSpec(model=tiny_model_dir, kind="vllm", use_gpu=True, batch_size=4, max_model_len=512,
                      gpu_memory_utilization=0.3)
    out = {r["key"]: r for r in ray_llm.generate(ray.data.from_items(rows), spec).take_all()}
    assert not out["k0"]["error"] and out["k0"]["response"] == out["k1"]["response"]
    assert out["k2"]["error"] and out["k2"]["response"] == ""
