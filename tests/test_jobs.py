"""jobs/ and the runtime env: the job entrypoints (config + --set, --plan, exit codes), the runtime
env each way a job reaches a cluster, and real `ray job submit` against a local Ray head on
loopback (started with `ray start --head`, stopped at the end even on failure)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from derta.config import ConfigError, load_config
from derta.runtime_env import (
    declared,
    driver_runtime_env,
    ignore_patterns,
    job_runtime_env,
    project_requirements,
)

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
JOB_FILES = sorted(p for p in JOBS.glob("*.py") if not p.name.startswith("_"))


# --------------------------------------------------------------------------- job files
def test_every_job_is_a_thin_entrypoint_with_its_config():
    names = {p.stem for p in JOB_FILES}
    assert names >= {"demo", "derta_8b", "derta_70b", "tune_prefix", "eval_attacks", "generate_responses"}
    for path in JOB_FILES:
        text = path.read_text()
        code = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        assert len(code) < 45, f"{path.name} should stay a thin entrypoint"
        assert 'sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))' in text, path.name
        assert "from _job import main" in text and "sys.exit(main(" in text, path.name
        m = re.search(r'^CONFIG = "([\w.]+)"', text, re.M)
        if m:  # demo.py uses the built-in demo config
            load_config(JOBS / "configs" / m.group(1))


def test_paper_hyper_parameters():
    c8 = load_config(JOBS / "configs" / "derta_8b.yaml")
    t = c8.train
    assert (t.lr, t.warmup_ratio, t.weight_decay, c8.data.max_len, t.global_batch, t.epochs) == (2e-5, 0.03, 2e-5, 1024, 128, 2)
    assert c8.model.dtype == "bf16" and t.fsdp.activation_checkpointing and t.use_gpu and c8.model.lora is None
    assert t.loss.rto_keep == 0.05 and t.method == "derta"
    c70 = load_config(JOBS / "configs" / "derta_70b.yaml")
    t, lora = c70.train, c70.model.lora
    assert (t.lr, t.warmup_ratio, c70.data.max_len, t.global_batch, t.epochs, t.loss.rto_keep) == (1e-4, 0.0, 512, 128, 2, 1.0)
    assert (lora.r, lora.alpha, lora.dropout) == (96, 16, 0.05)
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert t.workers == 16 and t.global_batch % (t.workers * t.micro_batch) == 0
    assert c8.train.global_batch % (c8.train.workers * c8.train.micro_batch) == 0


@pytest.fixture(scope="module")
def job_main():
    sys.path.insert(0, str(JOBS))
    try:
        import _job

        yield _job.main
    finally:
        sys.path.remove(str(JOBS))


def test_job_main_exit_codes_and_overrides(job_main, tmp_path, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr("derta.runtime_env.init_ray", lambda cfg: seen.append(("init", cfg.train.lr)))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"train": {"lr": 0.5}, "data": {"safety": {"uri": "builtin:demo"}},
                                        "eval": {"questions": {"uri": "builtin:demo"}}}))

    # --set takes several KEY=VALUE at once and may repeat; Ray is initialised before the run.
    rc = job_main(lambda cfg: seen.append(("run", cfg.train.lr, cfg.eval.prefill_k, cfg.eval.limit)), cfg_file, "doc",
                  argv=["--set", "train.lr=0.25", "eval.prefill_k=[0,10]", "--set", "eval.limit=8"])
    assert rc == 0 and seen == [("init", 0.25), ("run", 0.25, [0, 10], 8)]

    assert job_main(lambda cfg: None, cfg_file, "doc", argv=["--set", "train.workers=0"]) == 2
    assert "train.workers" in capsys.readouterr().err
    assert job_main(lambda cfg: None, tmp_path / "missing.yaml", "doc", argv=[]) == 2

    def boom(cfg):
        raise RuntimeError("stage exploded")

    assert job_main(boom, cfg_file, "doc", argv=[]) == 1
    assert "stage exploded" in capsys.readouterr().err

    # --plan prints and exits without touching Ray; 1 when the plan does not fit.
    seen.clear()
    assert job_main(lambda cfg: seen.append("run"), cfg_file, "doc", argv=["--plan"], plan=lambda cfg: True) == 0
    assert job_main(lambda cfg: seen.append("run"), cfg_file, "doc", argv=["--plan"], plan=lambda cfg: False) == 1
    assert seen == []


# --------------------------------------------------------------------------- runtime env
def test_runtime_env_declaration():
    env = declared()
    assert env["working_dir"] == "."
    assert env["env_vars"]["PYTHONPATH"] == "platform"
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    patterns = ignore_patterns()
    assert {".git/", ".venv/", "runs/", "mlruns/"} <= set(patterns)
    full = job_runtime_env()
    assert full["working_dir"] == str(ROOT) and full["excludes"] == patterns and "pip" not in full

    from ray.runtime_env import RuntimeEnv

    with_pip = job_runtime_env(pip=True, extras=("gpu",))
    RuntimeEnv(**with_pip)  # Ray accepts it as is (the Jobs SDK path)
    pkgs = with_pip["pip"]["packages"]
    assert any(p.startswith("transformers") for p in pkgs) and any(p.startswith("vllm") for p in pkgs)
    assert not any(re.match(r"ray\b", p) for p in pkgs), "never reinstall Ray into a job"
    assert project_requirements() == [p for p in pkgs if not p.startswith("vllm")]
    with pytest.raises(ConfigError):
        project_requirements(extras=("nope",))


def test_runtime_env_cli_prints_what_ray_job_submit_takes():
    out = subprocess.run([sys.executable, "-m", "derta.runtime_env", "--json"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, check=True).stdout
    assert json.loads(out) == job_runtime_env()
    out = subprocess.run([sys.executable, "-m", "derta.runtime_env"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, check=True).stdout
    assert yaml.safe_load(out) == job_runtime_env()


def test_driver_runtime_env_in_every_situation(monkeypatch):
    """What the job's driver adds to ray.init, and that Ray merges it into the job's env."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    monkeypatch.setenv("PYTHONPATH", "/opt/extra")
    declared_vars = declared()["env_vars"]
    no_pp = {k: v for k, v in declared_vars.items() if k != "PYTHONPATH"}

    # `ray job submit --working-dir .` with no env file: every env var, PYTHONPATH relative to the
    # working dir (each worker's cwd); the working dir itself is the job's.
    job = {"working_dir": "gcs://_ray_pkg_abc.zip"}
    add = driver_runtime_env(None, job_env=job, connecting=True, installed=False)
    assert add == {"env_vars": declared_vars}
    assert _merge_runtime_env(job, add) == {**job, "env_vars": declared_vars}

    # Submitted WITH jobs/runtime_env.yaml: nothing left to add (a repeated key would make Ray fail).
    job = {"working_dir": "gcs://_ray_pkg_abc.zip", "env_vars": dict(declared_vars)}
    assert driver_runtime_env(None, job_env=job, connecting=True, installed=False) == {}
    partial = {"working_dir": "gcs://x", "env_vars": {"PYTHONPATH": "platform:/opt/mine"}}
    add = driver_runtime_env(None, job_env=partial, connecting=True, installed=False)
    assert add == {"env_vars": no_pp} and _merge_runtime_env(partial, add) is not None

    # A job without a working dir on an image that has the package (KubeRay RayJob): env vars only.
    assert driver_runtime_env(None, job_env={}, connecting=True, installed=True) == {"env_vars": no_pp}
    # ... and on nodes without the package: the driver uploads the checkout itself.
    add = driver_runtime_env(None, job_env={}, connecting=True, installed=False)
    assert add["working_dir"] == str(ROOT) and add["env_vars"] == declared_vars and ".venv/" in add["excludes"]

    # A driver outside any job, connecting to a cluster.
    assert driver_runtime_env(None, job_env=None, connecting=True, installed=False) == job_runtime_env()
    assert driver_runtime_env(None, job_env=None, connecting=True, installed=True) == {"env_vars": no_pp}

    # A local cluster: same filesystem, platform/ by absolute path, the user's PYTHONPATH kept.
    local = driver_runtime_env(None, job_env=None, connecting=False, installed=False)
    assert local["env_vars"]["PYTHONPATH"] == f"{ROOT / 'platform'}{os.pathsep}/opt/extra"
    assert "working_dir" not in local


def test_rayignore_keeps_runs_and_environments_out_of_the_upload(tmp_path):
    """Ray's own packager, on a checkout-like tree with this repo's .rayignore."""
    from ray._private.runtime_env.packaging import create_package

    src = tmp_path / "repo"
    for rel in ["platform/derta/config.py", "jobs/demo.py", "jobs/runtime_env.yaml", "jobs/configs/derta_8b.yaml",
                "runs/old/model/model.safetensors", ".venv/lib/x.py", ".git/HEAD", "platform/derta/__pycache__/a.pyc",
                "mlruns/0/meta.yaml", "weights.pt", "platform/derta/assets/demo_base/model.safetensors"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    shutil.copy(ROOT / ".rayignore", src / ".rayignore")
    target = tmp_path / "pkg.zip"
    create_package(str(src), target, include_gitignore=True)
    names = {n for n in zipfile.ZipFile(target).namelist() if not n.endswith("/")}
    assert {"platform/derta/config.py", "jobs/demo.py", "jobs/runtime_env.yaml", "jobs/configs/derta_8b.yaml",
            "platform/derta/assets/demo_base/model.safetensors"} <= names  # the shipped base travels with the job
    assert not [n for n in names if n.startswith(("runs/", ".venv/", ".git/", "mlruns/")) or n.endswith((".pyc", ".pt"))]


# --------------------------------------------------------------------------- a real Ray head
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head:
    """`ray start --head --block` in its own session on loopback; stopped by signalling only the
    processes of that session (never `ray stop`, which would kill every Ray on the machine)."""

    def __init__(self, temp_dir: Path, env: dict[str, str]):
        ports = {name: _free_port() for name in (
            "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
            "node-manager-port", "object-manager-port")}
        self.url = f"http://127.0.0.1:{ports['dashboard-port']}"
        self.log = temp_dir / "head.log"
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
               "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0",
               "--disable-usage-stats", f"--temp-dir={temp_dir}", *(f"--{k}={v}" for k, v in ports.items())]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                _rest(self.url, "/api/version")
                _rest(self.url, "/api/jobs/")  # the job manager answers too
                return
            except OSError:  # not up yet (URLError, connection refused, 5xx)
                time.sleep(0.5)
        raise RuntimeError(f"Ray head did not come up in {timeout}s:\n{self.log.read_text(errors='replace')[-3000:]}")

    def _ours(self) -> list[int]:
        """Live processes of the head's session (it was started with start_new_session)."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) != self.proc.pid:
                        continue
                    state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state not in ("Z", "X"):  # zombies are dead already
                        pids.append(int(entry))
                except (OSError, IndexError):  # gone meanwhile
                    pass
        return pids

    def _wait_gone(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._ours() and time.monotonic() < deadline:
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        self._wait_gone(15)
        for pid in self._ours():  # stragglers of this session only, by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._wait_gone(30)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _rest(url: str, path: str, method: str = "GET"):
    """The Jobs REST API (what the SDK and the CLI call), from this process without Ray state,
    with the head's token (RAY_AUTH_TOKEN of the head fixture)."""
    req = urllib.request.Request(url + path, method=method, headers={"Authorization": f"Bearer {_TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


_TOKEN = secrets.token_hex(32)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """A real Ray head with the dashboard on 127.0.0.1; yields (dashboard URL, client env).

    Its own --temp-dir (so `ray.init()` elsewhere never finds it), its own ports, and token
    authentication (Ray 2.60's default once ~/.ray/auth_token exists) with its own token, given
    to the head and to every client explicitly, so ~/.ray never decides who may talk to it.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's unix socket paths
    cache = tmp_path_factory.mktemp("derta_cache")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "PYTHONPATH") and not k.startswith("RAY_AUTH_")}
    env.update(DERTA_CACHE=str(cache), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_TOKEN)
    head = Head(temp_dir, env)
    try:
        head.wait_ready()
        yield head.url, env
    finally:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not head._ours(), "the head's processes are gone"


def _wait(url: str, job_id: str, timeout: float) -> tuple[str, str]:
    """Poll until the job ends; (status, logs)."""
    deadline = time.monotonic() + timeout
    status = _rest(url, f"/api/jobs/{job_id}")["status"]
    while status not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(1)
        status = _rest(url, f"/api/jobs/{job_id}")["status"]
    return status, _rest(url, f"/api/jobs/{job_id}/logs")["logs"]


PROBE = """
import json, os, ray, derta.config
ray.init()
@ray.remote
def where():
    import os, derta.config
    return derta.config.__file__, os.getcwd(), os.environ.get("TOKENIZERS_PARALLELISM")
print("PROBE " + json.dumps({"driver": derta.config.__file__, "task": ray.get(where.remote())}))
"""


SUBMIT_WITH_SDK = """
import sys
from ray.job_submission import JobSubmissionClient
from derta.runtime_env import job_runtime_env
print(JobSubmissionClient(sys.argv[1]).submit_job(entrypoint=sys.argv[2], runtime_env=job_runtime_env()))
"""


@pytest.mark.slow
def test_jobs_sdk_ships_the_package_to_driver_and_workers(ray_head):
    """Jobs SDK + job_runtime_env(): `derta` comes from the uploaded working dir, not the install."""
    url, env = ray_head
    entrypoint = f"python -c {shlex.quote(PROBE)}"
    sub = subprocess.run([sys.executable, "-c", SUBMIT_WITH_SDK, url, entrypoint], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr[-3000:]
    job_id = sub.stdout.strip().splitlines()[-1]
    status, logs = _wait(url, job_id, 150)
    assert status == "SUCCEEDED", logs[-4000:]
    found = re.search(r"^PROBE (\{.*\})$", logs, re.M)  # (the echoed entrypoint holds the word too)
    assert found, logs[-4000:]
    probe = json.loads(found.group(1))
    driver, (task_file, task_cwd, tokenizers) = probe["driver"], probe["task"]
    for path in (driver, task_file):
        assert "working_dir_files" in path and path.endswith("platform/derta/config.py"), path
    assert "working_dir_files" in task_cwd and tokenizers == "false"


# The science check's job as `ray job submit` runs it, sized for the suite: the four arms start
# from the shipped base (no pretraining stage) with a handful of questions, so it checks the
# machinery (job submission, data -> Ray Train -> eval per arm, equal budgets, every rule decided,
# MLflow nesting), not the science. The findings' numbers come from full-size runs on three seeds
# (README: "Science check"); their rules are unit-tested against degenerate models
# (tests/test_position_bias.py). The full-size job took 8 minutes alone, two-thirds of the
# suite's budget.
SMALL = ["position_bias.base_model=builtin:demo-base", "position_bias.heldout_questions=4",
         "position_bias.seen_questions=4", "position_bias.unlike_questions=4", "position_bias.completion_questions=12",
         "train.epochs=1", "eval.prefill_k=[0, 10]", "eval.max_new_tokens=16"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ray_job_submit_runs_the_position_bias_science_check(ray_head, tmp_path):
    """`ray job submit --working-dir . -- python jobs/position_bias.py` until SUCCEEDED: four
    arms through data -> Ray Train -> eval; every arm's run directory follows the contract, the
    arms had equal safety budgets, every rule that needs no base is decided, and MLflow nests
    arm -> stage runs under one parent."""
    from derta.experiments.position_findings import RULES

    url, env = ray_head
    root = tmp_path / "runs"
    sets = [f"storage.root={root}", "storage.run_name=science", *SMALL]
    job_id = f"derta-science-{os.getpid()}-{int(time.time())}"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", url, "--working-dir", ".",
           "--submission-id", job_id, "--", "python", "jobs/position_bias.py", "--set", *sets]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1100)
    except subprocess.TimeoutExpired:
        _rest(url, f"/api/jobs/{job_id}/stop", method="POST")
        raise
    status, logs = _wait(url, job_id, 10)
    assert proc.returncode == 0 and status == "SUCCEEDED", (proc.stdout[-3000:] + proc.stderr[-2000:] + logs[-3000:])

    exp = root / "science"
    for rel in ("config.yaml", "corpus/pretrain.jsonl", "corpus/completion.jsonl", "table.md", "position_bias.json",
                "refusal_positions.png"):
        assert (exp / rel).is_file(), rel
    assert not (exp / "pretrain").exists()  # the base was given
    budgets = {}
    for arm in ("vanilla", "recaug", "rto", "derta"):
        for rel in ("config.yaml", "data/manifest.json", "model/config.json", "eval/generations.jsonl", "eval/metrics.json"):
            assert (exp / arm / rel).is_file(), f"{arm}/{rel}"
        assert yaml.safe_load((exp / arm / "config.yaml").read_text())["model"]["name_or_path"] == "builtin:demo-base"
        counts = json.loads((exp / arm / "data/manifest.json").read_text())["counts"]
        budgets[arm] = sum(counts.get(k, 0) for k in ("vanilla", "prefix", "rto", "pref"))
        groups = {json.loads(line)["attack"] for line in (exp / arm / "eval/generations.jsonl").read_text().splitlines()}
        assert {"prefill", "direct"} <= groups, groups  # the prefill groups and the completion-style prompts
    assert len(set(budgets.values())) == 1, budgets  # equal safety-data budgets

    saved = json.loads((exp / "position_bias.json").read_text())
    decided = {f["name"] for f in saved["findings"]}
    assert decided == {r.name for r in RULES if not r.needs_base}, decided  # every rule without the base
    assert all(isinstance(f["holds"], bool) and f["rule"] for f in saved["findings"])

    from derta.tracking import Tracker

    tracker = Tracker.for_root(str(root), "position-bias")
    runs = tracker.client.search_runs([tracker.experiment_id])
    by_id = {r.info.run_id: r for r in runs}
    parent = next(r for r in runs if r.data.tags.get("verb") == "position_bias")
    kids = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(kids) == {"vanilla", "recaug", "rto", "derta"}
    stages = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == kids["derta"].info.run_id}
    assert stages == {"data", "train", "eval"} and len(by_id) == 1 + 4 + 4 * 3
    assert parent.data.metrics["findings_total"] == len(decided) and "vanilla_asr_heldout_k10" in parent.data.metrics
