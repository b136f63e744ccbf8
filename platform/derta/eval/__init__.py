"""Evaluation stage: engines (HF / vLLM), attacks, judges, helpfulness, metrics, and the Ray Data
runner. Entry points: `evaluate(cfg, paths, model_dir, tracking)` and `judge_file(...)`."""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "judge_file", "run_judge", "EvalResult"]


def evaluate(cfg: Any, paths: Any, model_dir: str | None = None, tracking: Any = None):
    from derta.eval.runner import evaluate as _evaluate

    return _evaluate(cfg, paths, model_dir, tracking)


def judge_file(input_path: str, output_path: str | None = None, judge: str = "refusal", cfg: Any = None):
    from derta.eval.judge_file import judge_file as _judge_file

    return _judge_file(input_path, output_path, judge, cfg)


def run_judge(input_path: str, output_path: str | None = None, judge: str = "refusal", cfg: Any = None):
    """`derta judge`: judge a file, print the ASR line, return the summary."""
    from derta.eval.judge_file import run_judge as _run_judge

    return _run_judge(input_path, output_path, judge, cfg)


def __getattr__(name: str) -> Any:
    if name == "EvalResult":
        from derta.eval.runner import EvalResult

        return EvalResult
    raise AttributeError(name)
