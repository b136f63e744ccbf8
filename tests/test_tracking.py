"""derta.tracking against real MLflow: the default sqlite store, an HTTP server, S3 artifacts."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import pytest
from mlflow import MlflowClient

from derta import storage
from derta.tracking import Tracker, TrackingHandle, default_artifact_location, flatten, resolve_tracking_uri


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("http://mlflow:5000", str(tmp_path)) == "http://mlflow:5000"
    s3_default = resolve_tracking_uri(None, "s3://bucket/runs")
    assert s3_default == "sqlite:///" + os.path.abspath("./runs/mlflow.db")
    assert default_artifact_location(s3_default, "s3://bucket/runs") == "s3://bucket/runs/mlartifacts"
    assert default_artifact_location("http://x", str(tmp_path)) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None, str(tmp_path)) == "http://env:5000"
    assert resolve_tracking_uri("sqlite:///x.db", str(tmp_path)) == "sqlite:///x.db"  # explicit wins


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}, "f": 3}) == {"a.b": 1, "a.c.d": 2, "e": {}, "f": 3}


def _log_everything(tracker: Tracker, tmp_path) -> str:
    """One run with every kind of record; returns its id."""
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "ckpt" / "w.bin").write_bytes(b"w")
    (tmp_path / "notes.md").write_text("# notes")
    with tracker.run("train", tags={"method": "derta"}) as run_id:
        tracker.log_params({"train": {"lr": 2e-5, "loss": {"w_rto": 1.0}}, "attacks": ["prefill", "pair"]})
        tracker.log_params({"judge": {"api_key": "sk-secret"}, "db": "postgresql://u:hunter2@db/x", "big": "x" * 7000})
        tracker.log_metrics({"loss": 2.0, "eval": {"asr": 12.5}, "skipped": None}, step=0)
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.set_tags({"stage": "sft", "hf_token": "t0ps3cret"})
        tracker.log_artifact(str(tmp_path / "notes.md"))
        tracker.log_artifact(str(tmp_path / "ckpt"), artifact_path="model")
        tracker.log_dict({"model": {"name": "tiny"}, "password": "p"}, "config.json")
        tracker.log_text("hello", "logs/out.txt")
        tracker.log_table([{"attack": "prefill", "unsafe": True}, {"attack": "pair", "unsafe": False}], "eval/generations")
    return run_id


def _check_everything(client: MlflowClient, run_id: str, tmp_path) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train"
    p = run.data.params
    assert p["train.lr"] == "2e-05" and p["train.loss.w_rto"] == "1.0"
    assert json.loads(p["attacks"]) == ["prefill", "pair"]
    assert p["judge.api_key"] == "***" and p["db"] == "postgresql://u:***@db/x"
    assert len(p["big"]) == 6000 and p["big"].endswith("...")
    assert run.data.metrics == {"loss": 1.0, "eval.asr": 12.5}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 2.0), (1, 1.0)]
    assert run.data.tags["method"] == "derta" and run.data.tags["hf_token"] == "***"

    out = client.download_artifacts(run_id, "", str(tmp_path / "dl"))
    files = sorted(os.path.relpath(f, out) for f in storage.list_files(out))
    assert files == ["config.json", "eval/generations.json", "logs/out.txt", "model/w.bin", "notes.md"]
    assert json.loads(open(os.path.join(out, "config.json")).read()) == {"model": {"name": "tiny"}, "password": "***"}
    assert open(os.path.join(out, "logs/out.txt")).read() == "hello"
    table = json.loads(open(os.path.join(out, "eval/generations.json")).read())
    assert table["columns"] == ["attack", "unsafe"] and len(table["data"]) == 2


@pytest.fixture(scope="module")
def sqlite_tracker(tmp_path_factory) -> Tracker:
    """The default store (no URI anywhere), shared by the tests below: each new sqlite db
    costs MLflow seconds of schema migrations."""
    root = tmp_path_factory.mktemp("store") / "runs"
    with pytest.MonkeyPatch.context() as m:
        m.delenv("MLFLOW_TRACKING_URI", raising=False)
        return Tracker.for_root(str(root), experiment="unit")


def test_default_sqlite_store(sqlite_tracker, tmp_path):
    root = Path(sqlite_tracker.tracking_uri[len("sqlite:///") :]).parent
    run_id = _log_everything(sqlite_tracker, tmp_path)
    assert (root / "mlflow.db").is_file()
    assert storage.list_files(str(root / "mlartifacts"), suffix="config.json")  # artifacts under the root
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert client.get_experiment_by_name("unit").artifact_location == (root / "mlartifacts").as_uri()
    _check_everything(client, run_id, tmp_path)


def test_nested_runs_and_statuses(sqlite_tracker):
    t = sqlite_tracker
    with t.run("sweep") as parent:
        with t.run("trial-0", nested=True) as child0:
            assert t.active_run_id == child0
            t.log_metrics({"proxy_score": 0.5})
        assert t.active_run_id == parent
    with t.run("trial-1", parent_run_id=parent) as child1:  # e.g. from a Tune trial process
        pass
    with pytest.raises(ZeroDivisionError):
        with t.run("broken", parent_run_id=parent) as broken:
            1 / 0
    assert t.active_run_id is None
    c = t.client
    for child in (child0, child1, broken):
        assert c.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert c.get_run(broken).info.status == "FAILED"
    assert c.get_run(child0).data.metrics == {"proxy_score": 0.5}


def test_reuse_reopens_one_run_and_kills_its_stale_children(sqlite_tracker):
    """A resumed run reopens its MLflow run (same name, parent and reuse tags) instead of
    creating a second; children a killed process left RUNNING are marked KILLED."""
    t, c = sqlite_tracker, sqlite_tracker.client
    key = {"verb": "run", "run_dir": "/runs/r-reuse"}
    with t.run("r-reuse", tags=key, reuse=key) as first:
        t.log_params({"train": {"lr": 0.1}, "ray": {"num_cpus": 2}})
        orphan = t.start_run("data", parent_run_id=first)  # its process "dies": never ended
        t._stack.remove(orphan)
    assert c.get_run(orphan).info.status == "RUNNING"
    with pytest.raises(KeyboardInterrupt):
        with t.run("r-reuse", tags=key, reuse=key) as second:
            assert second == first and c.get_run(first).info.status == "RUNNING"
            t.log_params({"train": {"lr": 0.1}, "ray": {"num_cpus": 3}, "new": 1}, new_only=True)
            raise KeyboardInterrupt
    assert c.get_run(first).info.status == "KILLED" and c.get_run(orphan).info.status == "KILLED"
    assert c.get_run(first).data.params["ray.num_cpus"] == "2" and c.get_run(first).data.params["new"] == "1"
    elsewhere = {**key, "run_dir": "/runs/other"}
    with t.run("r-reuse", tags=elsewhere, reuse=elsewhere) as other:  # another directory
        pass
    with t.run("r-reuse", tags=key, reuse=key, parent_run_id=other) as nested:  # another parent
        pass
    assert len({first, other, nested}) == 3
    with t.run("r-reuse", reuse=key) as third:
        pass
    assert third == first and c.get_run(first).info.status == "FINISHED"
    assert len(c.search_runs([t.experiment_id], "attributes.run_name = 'r-reuse'")) == 3


def test_misuse_is_reported(sqlite_tracker):
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        sqlite_tracker.log_metrics({"x": 1})
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        sqlite_tracker.start_run("orphan", nested=True)
    with sqlite_tracker.run("typed"):
        with pytest.raises(TypeError, match="'acc'"):
            sqlite_tracker.log_metrics({"acc": "high"})


def _worker(handle: TrackingHandle, rank: int) -> None:
    """What a Ray Train rank-0 worker or an eval actor does with the handle it was given."""
    with handle.attached() as tracker:
        tracker.log_metrics({"worker_loss": 0.25 * rank}, step=rank)
        tracker.log_text(f"rank {rank}", f"workers/{rank}.txt")


def _attach_from_another_process(tracker: Tracker) -> None:
    ctx = mp.get_context("spawn")
    with tracker.run("driver") as run_id:
        handle = TrackingHandle.of(tracker, run_id)
        proc = ctx.Process(target=_worker, args=(handle, 1))
        proc.start()
        proc.join(120)
        assert proc.exitcode == 0
        with pickle.loads(pickle.dumps(tracker)).attach(run_id) as same:  # a Tracker travels too
            assert same == run_id
        tracker.log_metrics({"driver_metric": 1.0})
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"  # attaching never ended the run early
    assert run.data.metrics == {"worker_loss": 0.25, "driver_metric": 1.0}
    assert [a.path for a in tracker.client.list_artifacts(run_id, "workers")] == ["workers/1.txt"]


def test_attach_from_another_process(sqlite_tracker):
    _attach_from_another_process(sqlite_tracker)


def test_disabled_tracker_is_a_noop(tmp_path):
    t = Tracker(f"sqlite:///{tmp_path}/never.db", "x", enabled=False)
    with t.run("r", tags={"a": 1}) as run_id:
        assert run_id is None
        t.log_params({"a": 1})
        t.log_metrics({"m": 1.0})
        t.log_artifact("/does/not/exist")
        t.log_table([{"a": 1}], "t")
        with t.attach(None):
            t.set_tags({"b": 2})
    handle = TrackingHandle.of(t, run_id)
    assert handle.run_id is None
    with handle.attached() as worker_tracker:
        assert not worker_tracker.enabled
        worker_tracker.log_metrics({"m": 2.0})
    assert list(tmp_path.iterdir()) == []


def test_http_server(mlflow_server, tmp_path):
    tracker = Tracker.for_root(str(tmp_path / "unused-root"), experiment="remote", uri=mlflow_server)
    assert tracker.tracking_uri == mlflow_server and tracker.artifact_location is None
    run_id = _log_everything(tracker, tmp_path)
    _check_everything(MlflowClient(mlflow_server), run_id, tmp_path)
    _attach_from_another_process(tracker)
    assert not (tmp_path / "unused-root").exists()  # nothing local in server mode


def test_s3_storage_root_puts_artifacts_on_s3(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    root = s3_bucket + "/runs"
    tracker = Tracker.for_root(root, experiment="s3")
    with tracker.run("r") as run_id:
        tracker.log_dict({"k": 1}, "metrics.json")
    assert (tmp_path / "runs" / "mlflow.db").is_file()  # the db stays local
    [uri] = storage.list_files(root + "/mlartifacts", suffix="metrics.json")
    assert run_id in uri and storage.read_json(uri) == {"k": 1}
