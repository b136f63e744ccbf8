"""Shared fixtures: the tiny model directory and one local Ray cluster per test session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from derta.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster with 4 logical CPUs (2 train workers + data/eval tasks)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DERTA_CACHE": os.environ.get("DERTA_CACHE", "")}} if os.environ.get("DERTA_CACHE") else None)
    yield ray
    ray.shutdown()
