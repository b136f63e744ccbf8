"""Real services on loopback for the tests: an S3-compatible server (moto) and an MLflow
tracking server, each a subprocess started once per session and stopped at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], ready_url: str, log: Path, timeout: float) -> subprocess.Popen:
    """Start cmd in its own process group and wait until ready_url answers (any HTTP status)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(ready_url, timeout=2).close()
            return proc
        except urllib.error.HTTPError:
            return proc
        except OSError:
            time.sleep(0.2)
    _stop(proc)
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{' '.join(cmd)} did not become ready at {ready_url} in {timeout}s:\n{tail}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the process group we started (servers may fork workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; AWS_* env points at it for the rest of the session."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = _start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], endpoint, log, 60)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        try:
            yield endpoint
        finally:
            _stop(proc)


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh empty bucket on the loopback S3 server, as "s3://<bucket>"."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real MLflow tracking server (sqlite backend, proxied artifacts) on 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    proc = _start(cmd, f"{uri}/health", root / "server.log", 300)  # minutes on a loaded 2-core box
    try:
        yield uri
    finally:
        _stop(proc)
