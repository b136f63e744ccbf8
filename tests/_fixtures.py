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


def init_local_ray(**env: str) -> None:
    """A real local Ray cluster with 4 logical CPUs (2 train workers + data/eval tasks); `env`
    goes to every worker (DERTA_CACHE always, when set)."""
    import ray

    env = {**({"DERTA_CACHE": os.environ["DERTA_CACHE"]} if os.environ.get("DERTA_CACHE") else {}), **env}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env} if env else None)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        init_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_with_aws_env(ray_local, s3_server):
    """The local cluster restarted so its workers have the loopback S3 settings: S3 filesystems
    carry no keys (derta.storage), each process reads its own AWS chain, as cluster nodes do."""
    ray_local.shutdown()
    init_local_ray(**{k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    yield ray_local
    ray_local.shutdown()
    init_local_ray()
