"""The iterative attacks, run in the eval driver after the Ray Data pass: PAIR (attacker ->
target -> judge rounds) and AutoDAN-HGA (a genetic search on the target's likelihoods). Their rows
join generations.jsonl through the same resume file as every other row."""

from __future__ import annotations

from typing import Any

from derta.config import ConfigError, ExperimentConfig
from derta.eval.attacks import load_questions
from derta.eval.engines import EngineSpec, engine_actor, load_eval_tokenizer
from derta.eval.judges import RefusalJudge, make_judge
from derta.eval.runner import PartialWriter, judge_rows
from derta.prompts import Renderer


def run_pair(cfg: ExperimentConfig, spec: EngineSpec, done: dict[str, Any], writer: PartialWriter,
             renderer: Renderer) -> None:
    """PAIR is a driver-side loop (attacker -> target -> judge, batched per round). On GPU the
    target and attacker are EngineActors (each with its own GPUs); on CPU they are engines in this
    process, which avoids starting more workers for a CPU-sized model."""
    from derta.eval.attacks import pair
    from derta.eval.engines import RemoteEngine, make_engine

    questions = load_questions(cfg.eval.questions, cfg.eval.limit)
    todo = [q for q in questions if f"pair|{q.id}|" not in done]
    if not todo:
        return
    settings = pair.PairSettings.from_config(cfg)
    att_spec = EngineSpec(**{**spec.__dict__, "model": settings.attacker_model or spec.model})
    if spec.use_gpu:
        target = RemoteEngine(engine_actor(spec))
        attacker = target if att_spec.model == spec.model else RemoteEngine(engine_actor(att_spec))
    else:
        target = make_engine(spec)
        attacker = target if att_spec.model == spec.model else make_engine(att_spec)
    # the attacker is the target (same renderer) or its own model, prompted in its chat template
    att_renderer = renderer if att_spec.model == spec.model else Renderer.make(
        "chat_template", load_eval_tokenizer(att_spec.model), "eval.pair.attacker_model")
    judge = make_judge(cfg.eval, cache_dir=None)
    rows = pair.run(todo, cfg.eval, target, attacker, judge, settings, renderer=renderer, attacker_renderer=att_renderer)
    judge_rows(rows, judge, RefusalJudge())
    writer.add(rows)


def run_autodan(cfg: ExperimentConfig, spec: EngineSpec, done: dict[str, Any], writer: PartialWriter,
                renderer: Renderer) -> None:
    """AutoDAN-HGA in the driver: a white-box search on an HF engine in this process (it needs the
    target's log-probabilities, which vLLM engines behind ray.data.llm do not serve)."""
    from derta.eval.attacks import autodan
    from derta.eval.engines import make_engine

    todo = [q for q in load_questions(cfg.eval.questions, cfg.eval.limit) if f"autodan|{q.id}|" not in done]
    if not todo:
        return
    if spec.kind != "hf":
        raise ConfigError("eval.attacks=autodan needs the target's likelihoods: set eval.engine=hf "
                          "(or replay pre-found prompts with eval.prompt_files.autodan)")
    judge = make_judge(cfg.eval, cache_dir=None)
    rows = autodan.run(todo, cfg.eval, make_engine(spec), judge, renderer)
    judge_rows(rows, judge, RefusalJudge())
    writer.add(rows)
