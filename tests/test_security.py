"""Security and reliability (issue 18): redaction, containment, finite floats, and a sweep of
every byte a real `derta run` + `derta tune` wrote for the secrets they were given."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from derta.cli import main
from derta.config import ConfigError, ExperimentConfig, load_config, redact, redact_text, validate_config

AWS_SECRET = "AKsweep/S3cr3t+Key0123456789abcdefSWEEP"  # like AWS secret keys: holds '/' and '+'


# --------------------------------------------------------------------------- redaction
@pytest.mark.parametrize("text, secret, kept", [
    ("https://user:Se/cret+x@host/p", "Se/cret", "https://user:***@host/p"),
    ("https://ghp_TOKEN123456@github.com/o/r", "ghp_TOKEN123456", "https://***@github.com/o/r"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F20260101&"
     "X-Amz-Signature=deadbeef42&X-Amz-Security-Token=FwoGZX", "deadbeef42", "X-Amz-Algorithm=AWS4"),
    ("curl -H 'Authorization: Bearer sk-abcdefghijkl'", "sk-abcdefghijkl", "Authorization: Bearer ***"),
    ("mlflow at http://u:p4ss@h:5000 and s3://bucket/key@v2", "p4ss", "s3://bucket/key@v2"),
])  # fmt: skip
def test_redact_text_covers_uri_query_and_header_secrets(text, secret, kept):
    out = redact_text(text)
    assert secret not in out and kept in out
    assert "AKIA%2F20260101" not in out and "FwoGZX" not in out


def test_redact_by_key_and_environment_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_envsecret999")
    red = redact({"hf_token": "x1", "GITHUB_TOKEN": "x2", "Authorization": "Basic x3", "session_token": "x4",
                  "refusal_token": "Sorry", "judge_api_key_env": "OPENAI_API_KEY", "max_new_tokens": 64,
                  "note": "a log line with hf_envsecret999 inside"})
    assert red == {"hf_token": "***", "GITHUB_TOKEN": "***", "Authorization": "***", "session_token": "***",
                   "refusal_token": "Sorry", "judge_api_key_env": "OPENAI_API_KEY", "max_new_tokens": 64,
                   "note": "a log line with *** inside"}


def test_config_errors_never_echo_a_secret_value(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    # A secret-looking key that does not exist: the value is hidden, the key named.
    assert main(["plan", "--config", str(cfg), "--set", "model.hf_token=hf_abcdef123456"]) == 2
    err = capsys.readouterr().err
    assert "hf_abcdef123456" not in err and "model.hf_token=***" in err and "unknown key 'model.hf_token'" in err
    # A bad value inside a URI: the password never shows.
    assert main(["plan", "--config", str(cfg), "--set", "tracking.uri={u: http://a:pw123456@h}"]) == 2
    err = capsys.readouterr().err
    assert "pw123456" not in err and "tracking.uri" in err
    # Credentials inside an s3:// storage root are refused (they would land in every artefact).
    assert main(["plan", "--config", str(cfg), "--set", "storage.root=s3://AKIAX:Sec/ret@bucket/runs"]) == 2
    err = capsys.readouterr().err
    assert "Sec/ret" not in err and "storage.root" in err and "AWS_ACCESS_KEY_ID" in err


def test_printed_lines_are_redacted(capsys):
    from derta.pipeline import console

    console.print("MLflow store  : https://alice:Pa/ss@mlflow.example.com")
    out = capsys.readouterr().out
    assert "Pa/ss" not in out and "alice:***@mlflow.example.com" in out


# --------------------------------------------------------------------------- loading
@pytest.mark.parametrize("override, key", [
    ("data.prefix.beta_a=.inf", "data.prefix.beta_a"),
    ("train.lr=.nan", "train.lr"),
    ("data.mix.prefix=.inf", "data.mix.prefix"),
    ("tune.space={train.lr: {sampler: choice, values: [1.0, .inf]}}", "tune.space"),
    ("eval.prefill_k=[0,-5]", "eval.prefill_k"),
    ("storage.run_name=../x", "storage.run_name"),
    ("storage.run_name=/etc", "storage.run_name"),
    ("storage.run_name=a/b", "storage.run_name"),
    ("storage.run_name=..", "storage.run_name"),
])  # fmt: skip
def test_bad_values_are_refused_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_good_run_names_pass():
    for name in ("e2e", "derta-20260101-120000", "arm_1.v2"):
        assert load_config(None, [f"storage.run_name={name}"]).storage.run_name == name
    from derta.paths import RunPaths

    with pytest.raises(ValueError, match="one path segment"):
        RunPaths("/tmp/runs", "../escape")


# --------------------------------------------------------------------------- containment
def test_s3_keys_with_dotdot_never_leave_the_download_dir(s3_bucket, tmp_path):
    from derta import storage

    bucket = s3_bucket[len("s3://"):]
    client = storage.s3_client()
    client.put_object(Bucket=bucket, Key="model/ok.txt", Body=b"ok")
    client.put_object(Bucket=bucket, Key="model/../../../escaped.txt", Body=b"evil")
    dst = tmp_path / "a" / "b" / "dl"
    with pytest.raises(storage.StorageError, match="outside"):
        storage.download_dir(f"{s3_bucket}/model", dst)
    with pytest.raises(storage.StorageError, match="outside"):
        storage.local_copy(f"{s3_bucket}/model/../../../escaped.txt", tmp_path / "cache")
    assert not list(tmp_path.rglob("escaped.txt"))


def test_s3_publish_uploads_before_removing_the_old_model(s3_bucket, tmp_path, monkeypatch):
    from derta import storage
    from derta.train import checkpoint

    uri = f"{s3_bucket}/run/model"

    def staged(files: dict[str, str]) -> str:
        d = tempfile.mkdtemp(dir=tmp_path)
        for rel, text in files.items():
            Path(d, rel).write_text(text)
        return d

    checkpoint.publish_dir(staged({"config.json": "v1", "old-shard.bin": "v1"}), uri)
    real_upload = storage.upload_dir

    def failing_upload(local_dir, dst):
        raise storage.StorageError("network down")

    monkeypatch.setattr(storage, "upload_dir", failing_upload)
    with pytest.raises(storage.StorageError):
        checkpoint.publish_dir(staged({"config.json": "v2"}), uri)
    assert storage.read_text(f"{uri}/config.json") == "v1"  # the old model survives a failed publish
    monkeypatch.setattr(storage, "upload_dir", real_upload)
    checkpoint.publish_dir(staged({"config.json": "v2", "model.safetensors": "v2"}), uri)
    assert sorted(f.rsplit("/", 1)[1] for f in storage.list_files(uri)) == ["config.json", "model.safetensors"]
    assert storage.read_text(f"{uri}/config.json") == "v2"


# --------------------------------------------------------------------------- reachability
@pytest.fixture
def silent_port():
    """A TCP port that accepts connections (backlog) and never answers."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv.getsockname()[1]
    srv.close()


def test_an_s3_endpoint_or_tracking_server_that_never_answers_fails_in_seconds(silent_port, monkeypatch, tmp_path):
    import time

    from derta import storage
    from derta.tracking import check_reachable

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent_port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"s3://bkt/runs: the S3 endpoint http://127\.0\.0\.1:\d+ did not answer within 1s"):
        storage.check_reachable("s3://bkt/runs", timeout=1)
    with pytest.raises(ConfigError, match=r"tracking\.uri: the MLflow server http://u:\*\*\*@127\.0\.0\.1:\d+ did not answer"):
        check_reachable(f"http://u:pw@127.0.0.1:{silent_port}", timeout=1)
    assert time.monotonic() - t0 < 15
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ConfigError, match="cannot be written"):
        check_reachable(f"sqlite:///{afile}/sub/mlflow.db")
    with pytest.raises(ConfigError, match="cannot be written"):
        check_reachable("sqlite:////proc/derta/mlflow.db")
    check_reachable(f"sqlite:///{tmp_path}/new/dir/mlflow.db")  # created later: fine


def test_s3_bucket_checks(s3_bucket):
    from derta import storage

    storage.check_reachable(f"{s3_bucket}/runs")
    with pytest.raises(ConfigError, match="does not exist"):
        storage.check_reachable("s3://no-such-bucket-derta/runs")


# --------------------------------------------------------------------------- reruns
def test_same_name_other_config_is_refused_naming_keys_unless_a_new_run_is_asked(tmp_path):
    from derta import storage
    from derta.config import dump_yaml
    from derta.pipeline import run_paths

    base = ["storage.root=" + str(tmp_path / "runs"), "storage.run_name=r1"]
    first = load_config(None, base)
    paths = run_paths(first)
    storage.write_text(paths.config, dump_yaml(first.redacted()))  # what every verb writes first
    # Same config (where/how it runs may change): resumes the same directory.
    assert run_paths(load_config(None, [*base, "train.max_failures=2", "ray.num_cpus=3"])).dir == paths.dir
    with pytest.raises(ConfigError, match=r"run 'r1' already exists .*\(eval\.limit, train\.loss\.w_rto, train\.lr differ\)"):
        run_paths(load_config(None, [*base, "train.lr=0.5", "train.loss.w_rto=0", "eval.limit=3"]))
    fresh = load_config(None, [*base, "train.lr=0.5", "storage.if_exists=new"])
    assert run_paths(fresh).name == "r1-2" and fresh.storage.run_name == "r1-2"


# --------------------------------------------------------------------------- checkpoint trust
def test_resume_trusts_only_checkpoints_this_run_recorded(tmp_path):
    from derta.train import checkpoint as C

    root, ledger = tmp_path / "ckpts", str(tmp_path / "ledger.json")

    def ckpt(name: str, step: int) -> str:
        d = root / name
        d.mkdir(parents=True)
        (d / ".metadata").write_bytes(b"pickled-metadata-" + name.encode())
        (d / C.STATE_FILE).write_text(C.TrainState(step=step).to_json())
        return str(d)

    ours = ckpt("checkpoint_a", 2)
    C.record_checkpoint(ours, ledger, "fp1")
    planted = ckpt("checkpoint_b", 9)  # newer, but nobody recorded it
    assert C.find_latest(str(root)) == planted  # without a ledger: the newest (old behaviour)
    assert C.find_latest(str(root), ledger, "fp1") == ours
    assert C.find_latest(str(root), ledger, "other-config") is None  # another config's checkpoint
    (root / "checkpoint_a" / ".metadata").write_bytes(b"tampered")
    assert C.find_latest(str(root), ledger, "fp1") is None


# --------------------------------------------------------------------------- sealed values
def test_sealed_values_pickle_as_a_key_only(ray_local):
    from derta.security import release, seal, unseal

    s = seal({"AWS_SECRET_ACCESS_KEY": AWS_SECRET})
    blob = pickle.dumps(s)
    assert AWS_SECRET.encode() not in blob
    assert unseal(pickle.loads(blob)) == {"AWS_SECRET_ACCESS_KEY": AWS_SECRET}
    assert ray_local.get(ray_local.remote(lambda x: unseal(x)["AWS_SECRET_ACCESS_KEY"]).remote(s)) == AWS_SECRET
    release(s)
    with pytest.raises(RuntimeError, match="gone"):
        unseal(s)


from _fixtures import ray_local  # noqa: E402,F401


def test_tune_state_pickles_no_tracking_uri_and_trials_get_no_keys_by_runtime_env():
    """Tune pickles its callbacks into tuner.pkl (cloudpickle: a class made in a function goes
    by value, with the globals its methods name) and copies the driver's AWS keys into every
    trial actor's runtime env (logged by Ray's runtime-env agent); neither may carry a secret."""
    from ray import cloudpickle
    from ray.tune.execution import class_cache

    from derta.security import keep_secrets_out_of_tune_runtime_envs
    from derta.tune import tuner

    handle = {"tracking_uri": "http://u:TunePw_S3cret@h:5000", "experiment": "e", "parent_run_id": "p"}
    cb = tuner._tune_callback_cls()(handle, "/runs/r", "proxy_score")
    assert cb.tracking == handle  # the driver still has it
    assert b"TunePw_S3cret" not in cloudpickle.dumps(cb)
    keep_secrets_out_of_tune_runtime_envs()
    names = class_cache.ENV_VARS_TO_PROPAGATE
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"} & names
    assert "AWS_ACCESS_KEY_ID" in names and "RAY_CHDIR_TO_TRIAL_DIR" in names  # only secrets dropped


# --------------------------------------------------------------------------- the sweep
SECRETS = {
    "aws": AWS_SECRET,
    "tracking password": "TrackPw_S3cret9",
    "judge api key": "JudgeKey_S3cret7",
    "hf token": "hf_SweepToken_S3cret5",
    "mlflow token": "MlflowTok_S3cret3",
}


def _needles() -> dict[str, bytes]:
    from urllib.parse import quote

    out = {}
    for name, s in SECRETS.items():
        out[name] = s.encode()
        out[f"{name} (url-quoted)"] = quote(s, safe="").encode()
    return out


def _hits(blobs: dict[str, bytes]) -> list[str]:
    needles = _needles()
    return [f"{where}: {name}" for where, data in blobs.items() for name, n in needles.items() if n in data]


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and not p.is_socket():
            try:
                out[str(p)] = p.read_bytes()
            except OSError:
                pass
    return out


@pytest.mark.slow
def test_secret_sweep_run_and_tune_write_no_secret(s3_bucket, mlflow_server, tmp_path, tmp_path_factory):
    """`derta run` and `derta tune` (tiny, on S3 + an MLflow server) with secrets in env, config
    and URIs; then every byte they wrote (S3 objects, pickles, the local cache, Ray's session
    directory, the MLflow store) and printed is searched for each secret: 0 hits."""
    import boto3

    host = mlflow_server.split("://", 1)[1]
    cfg = {
        "model": {"name_or_path": "builtin:tiny"},
        "data": {"safety": {"uri": "builtin:demo", "limit": 64}, "helpful": {"uri": "builtin:demo", "limit": 32},
                 "max_len": 160, "holdout": 0.1},
        "train": {"workers": 1, "max_steps": 2, "global_batch": 8, "micro_batch": 8, "lr": 1e-3, "warmup_ratio": 0.0},
        "eval": {"engine": "hf", "limit": 4, "prefill_k": [0, 10], "max_new_tokens": 8, "helpfulness": ["demo"],
                 "questions": {"uri": "builtin:demo"},
                 "judge_url": f"https://judge.example/v1?api_key={SECRETS['judge api key']}"},
        "tune": {"num_samples": 1, "max_concurrent_trials": 1, "scheduler": "fifo", "proxy_samples": 8,
                 "space": {"train.lr": {"sampler": "choice", "values": [1e-3, 3e-3]}}},
        "tracking": {"uri": f"http://sweep:{SECRETS['tracking password']}@{host}", "experiment": "sweep"},
        "storage": {"root": f"{s3_bucket}/runs"},
    }  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ray_tmp = tempfile.mkdtemp(prefix="rsw", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "DERTA_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp,
           "AWS_SECRET_ACCESS_KEY": SECRETS["aws"], "HF_TOKEN": SECRETS["hf token"],
           "MLFLOW_TRACKING_TOKEN": SECRETS["mlflow token"]}
    env.pop("RAY_ADDRESS", None)
    # On a loaded 2-core box the raylet's wait for the dashboard agent can exceed Ray's default.
    env.setdefault("RAY_agent_register_timeout_ms", "300000")
    env.setdefault("RAY_raylet_start_wait_time_s", "600")
    printed = {}
    for verb, name in (("run", "sweep-run"), ("tune", "sweep-tune")):
        proc = subprocess.run([sys.executable, "-m", "derta.cli", verb, "--config", str(path),
                               "--set", f"storage.run_name={name}"],
                              capture_output=True, env=env, timeout=900, cwd=tmp_path)
        assert proc.returncode == 0, (proc.stdout[-3000:] + proc.stderr[-3000:]).decode(errors="replace")
        printed[f"{verb} stdout"], printed[f"{verb} stderr"] = proc.stdout, proc.stderr

    blobs = dict(printed)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    bucket = s3_bucket[len("s3://"):]
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert any(k.endswith(".pkl") for k in keys), keys  # Tune/Train state was written and is swept
    assert any(k.startswith("runs/sweep-run/model/") for k in keys) and any("sweep-tune/tune" in k for k in keys)
    for k in keys:
        blobs[f"s3://{bucket}/{k}"] = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
    blobs.update(_files(tmp_path))
    # Not written by the runs: the test's own input, the config file a user writes (its
    # secrets are the point of the sweep). Everything the runs wrote under tmp_path is swept.
    del blobs[str(path)]
    blobs.update(_files(Path(ray_tmp)))
    for store in tmp_path_factory.getbasetemp().glob("mlflow_server*"):
        blobs.update(_files(store))
    assert len(blobs) > 50
    hits = _hits(blobs)
    assert hits == [], "secrets found:\n" + "\n".join(hits)
    # The tracking server got the runs (the URI with its password worked), under one experiment.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("sweep")
    names = {r.info.run_name for r in client.search_runs([exp.experiment_id])}
    assert {"sweep-run", "train"} <= names


def test_env_secrets_survive_a_thread_changing_the_environment(monkeypatch):
    """MLflow's telemetry thread deletes a variable while redaction reads the environment: the
    read must not raise KeyError (it killed `derta run`s), and the secret is still found."""
    import threading

    from derta.config import _env_secrets

    monkeypatch.setenv("HF_TOKEN", "secret-value-123")
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            os.environ["_DERTA_CHURN"] = "1"
            os.environ.pop("_DERTA_CHURN", None)

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        for _ in range(5000):
            assert "secret-value-123" in _env_secrets()
    finally:
        stop.set()
        t.join()
