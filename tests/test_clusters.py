"""clusters/: the launcher YAMLs against the JSON schema inside the installed ray wheel (and Ray's
own checks `ray up` runs), the KubeRay manifests' required fields and their consistency with the
jobs' resource requests, and the container image definition against the installed Ray."""

from __future__ import annotations

import json
import math
import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import ray
from derta.config import load_config
from derta.plan import GPUS_PER_NODE, resources

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
JOBS = ROOT / "jobs"
LAUNCHER_YAMLS = sorted(CLUSTERS.glob("*.yaml"))
KUBERAY = CLUSTERS / "kuberay"
GPU_JOBS = ("derta_8b", "derta_70b", "tune_prefix", "eval_attacks", "generate_responses")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def job_config_name(job: str) -> str:
    """The config a job file runs by default (its CONFIG constant)."""
    m = re.search(r'^CONFIG = "([\w.]+\.yaml)"', (JOBS / f"{job}.py").read_text(), re.M)
    assert m, f"jobs/{job}.py has no CONFIG = \"....yaml\""
    return m.group(1)


def job_resources(job: str, overrides: list[str] = ()):
    cfg = load_config(JOBS / "configs" / job_config_name(job), list(overrides))
    stages = {"tune_prefix": ("tune",), "eval_attacks": ("eval",), "generate_responses": ("generate",)}.get(job, ("train", "eval"))
    return cfg, resources(cfg, stages)


def quantity(value) -> float:
    """A Kubernetes quantity ("160", "500m", 8) as a number (CPU / GPU counts only)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --------------------------------------------------------------------------- launcher YAMLs
def test_there_are_aws_and_gcp_cluster_yamls():
    assert {p.name for p in LAUNCHER_YAMLS} >= {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_matches_the_schema_in_the_ray_wheel(path):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert schema_path.is_file(), "ray-schema.json ships inside the ray wheel"
    schema = json.loads(schema_path.read_text())
    config = load(path)
    jsonschema.validate(config, schema)  # unknown keys, wrong types: additionalProperties is false
    validate_config(config)  # Ray's extra checks (head_node_type, min/max workers)
    validate_config(prepare_config(config))  # after merging the provider defaults, as `ray up` does


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_shape(path):
    """A CPU head that schedules nothing, worker types from zero with an idle timeout, 8-GPU
    nodes as derta.plan assumes, the project's image, S3-friendly storage settings."""
    c = load(path)
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert c["idle_timeout_minutes"] > 0
    workers = {k: v for k, v in types.items() if k != c["head_node_type"]}
    gpu_types = {k: v for k, v in workers.items() if v["resources"].get("GPU")}
    assert gpu_types, "an autoscaling GPU worker type"
    for name, t in workers.items():
        assert t.get("min_workers", 0) == 0 and t["max_workers"] >= 1, name
    for name, t in gpu_types.items():
        assert t["resources"]["GPU"] == GPUS_PER_NODE, name
    assert c["max_workers"] >= max(t["max_workers"] for t in gpu_types.values())
    assert c["docker"]["image"] == image_in_dockerfile_docs()
    assert "--dashboard-host=0.0.0.0" in " ".join(c["head_start_ray_commands"])  # ray job submit / dashboard

    # Every GPU job fits the largest GPU node type at its maximum size.
    capacity = max(t["resources"]["GPU"] * t["max_workers"] for t in gpu_types.values())
    for job in GPU_JOBS:
        cfg, r = job_resources(job)
        assert 0 < r.peak_gpus <= capacity, (job, r)
        gpu_cpus = max(t["resources"]["CPU"] for t in gpu_types.values())
        assert GPUS_PER_NODE * cfg.train.cpus_per_worker <= gpu_cpus, job


# --------------------------------------------------------------------------- KubeRay
RAYCLUSTER_SPEC_KEYS = {"autoscalerOptions", "enableInTreeAutoscaling", "headGroupSpec", "workerGroupSpecs", "rayVersion",
                        "suspend", "managedBy", "gcsFaultToleranceOptions", "headServiceAnnotations", "networkPolicy",
                        "authOptions", "upgradeStrategy"}
HEAD_GROUP_KEYS = {"rayStartParams", "template", "serviceType", "enableIngress", "headService", "labels", "resources",
                   "ingressOptions"}
WORKER_GROUP_KEYS = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "idleTimeoutSeconds",
                     "numOfHosts", "scaleStrategy", "suspend", "labels", "resources", "priority"}
AUTOSCALER_KEYS = {"upscalingMode", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources", "env", "envFrom",
                   "securityContext", "volumeMounts", "version", "command", "args"}
RAYJOB_SPEC_KEYS = {"entrypoint", "rayClusterSpec", "clusterSelector", "runtimeEnvYAML", "submissionMode",
                    "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "backoffLimit", "activeDeadlineSeconds",
                    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "metadata", "suspend",
                    "submitterPodTemplate", "submitterConfig", "managedBy", "deletionStrategy", "preRunningDeadlineSeconds"}


def kuberay_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def ray_cluster_specs() -> list[tuple[str, dict]]:
    out = []
    for path, doc in kuberay_docs():
        if doc["kind"] == "RayCluster":
            out.append((f"{path.name}:RayCluster", doc["spec"]))
        elif doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
            out.append((f"{path.name}:RayJob", doc["spec"]["rayClusterSpec"]))
    return out


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def group_gpus(group: dict) -> int:
    c = containers(group)[0]["resources"]
    return int(quantity(c.get("limits", {}).get("nvidia.com/gpu", 0)))


def test_kuberay_manifests_exist_and_use_ray_io_v1():
    kinds = [d["kind"] for _, d in kuberay_docs()]
    assert "RayCluster" in kinds and "RayJob" in kinds
    for path, doc in kuberay_docs():
        assert doc.get("apiVersion") in ("ray.io/v1", "v1"), path
        assert doc["metadata"]["name"], path
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1"


@pytest.mark.parametrize("name,spec", ray_cluster_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_ray_cluster_spec_required_fields(name, spec):
    assert set(spec) <= RAYCLUSTER_SPEC_KEYS, f"{name}: unknown keys {set(spec) - RAYCLUSTER_SPEC_KEYS} (K8s drops them silently)"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray.__version__, "the cluster's Ray must be the Ray jobs are submitted with"
    auto = spec.get("autoscalerOptions", {})
    assert set(auto) <= AUTOSCALER_KEYS and auto.get("upscalingMode", "Default") in ("Default", "Aggressive", "Conservative")
    assert auto.get("idleTimeoutSeconds", 60) > 0

    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_KEYS and "template" in head
    assert head["rayStartParams"].get("num-cpus") == "0", "a CPU head that schedules no work"
    assert group_gpus(head) == 0
    groups = spec["workerGroupSpecs"]
    assert groups
    images = set()
    for g in [head, *groups]:
        assert all(isinstance(v, str) for v in g.get("rayStartParams", {}).values()), "rayStartParams values are strings"
        for c in containers(g):
            assert c["name"] and c["image"]
            images.add(c["image"])
            limits, requests = c["resources"].get("limits", {}), c["resources"].get("requests", {})
            if "nvidia.com/gpu" in limits or "nvidia.com/gpu" in requests:
                assert limits.get("nvidia.com/gpu") == requests.get("nvidia.com/gpu"), "GPU requests must equal limits"
    assert images == {image_in_dockerfile_docs()}
    for g in groups:
        assert set(g) <= WORKER_GROUP_KEYS, f"{name}/{g.get('groupName')}: unknown keys {set(g) - WORKER_GROUP_KEYS}"
        for key in ("groupName", "minReplicas", "maxReplicas", "template"):
            assert key in g, f"{name}: workerGroupSpecs[].{key} is required"
        assert 0 == g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], "scale from zero"
    gpu_groups = [g for g in groups if group_gpus(g)]
    assert gpu_groups and all(group_gpus(g) == GPUS_PER_NODE for g in gpu_groups)
    for g in gpu_groups:
        # CPUs for one train worker per GPU at the largest cpus_per_worker of the GPU jobs.
        need = GPUS_PER_NODE * max(job_resources(j)[0].train.cpus_per_worker for j in GPU_JOBS)
        assert quantity(containers(g)[0]["resources"]["limits"]["cpu"]) >= need


def test_raycluster_can_run_every_gpu_job():
    (_, spec), = [(n, s) for n, s in ray_cluster_specs() if n.endswith(":RayCluster")]
    capacity = sum(group_gpus(g) * g["maxReplicas"] for g in spec["workerGroupSpecs"])
    for job in GPU_JOBS:
        _, r = job_resources(job)
        assert 0 < r.peak_gpus <= capacity, job


def test_rayjob_runs_derta_70b_with_the_gpus_it_requests():
    (path, job), = [(p, d) for p, d in kuberay_docs() if d["kind"] == "RayJob"]
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_KEYS, f"unknown keys {set(spec) - RAYJOB_SPEC_KEYS}"
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1].endswith("jobs/derta_70b.py")
    assert (JOBS / "derta_70b.py").is_file()
    sets = [a for i, a in enumerate(argv) if i > 0 and argv[i - 1] == "--set"]
    cfg, r = job_resources("derta_70b", sets)
    assert cfg.storage.root.startswith("s3://")

    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpu = [g for g in groups if group_gpus(g)]
    assert len(gpu) == 1
    pods = gpu[0]["maxReplicas"]
    assert pods * group_gpus(gpu[0]) == cfg.train.workers == r.train_gpus == 16, "2 pods x 8 GPUs = 16 FSDP2 workers"
    assert pods == math.ceil(r.peak_gpus / GPUS_PER_NODE)
    assert r.eval_gpus <= pods * GPUS_PER_NODE and cfg.eval.tensor_parallel <= GPUS_PER_NODE
    # The image has the project; the job's own init_ray adds jobs/runtime_env.yaml's env vars.
    assert "runtimeEnvYAML" not in spec or "working_dir" not in spec["runtimeEnvYAML"]


# --------------------------------------------------------------------------- image
def image_in_dockerfile_docs() -> str:
    """The tag the Dockerfile's build instructions produce (the clusters run that image)."""
    m = re.search(r"docker build -f clusters/docker/Dockerfile -t (\S+) \.", (CLUSTERS / "docker" / "Dockerfile").read_text())
    assert m
    return m.group(1)


def test_dockerfile_builds_on_the_installed_ray_with_the_project_and_vllm():
    text = (CLUSTERS / "docker" / "Dockerfile").read_text()
    m = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", text, re.M)
    assert m and re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    tag = m.group(1)
    assert tag.startswith(f"{ray.__version__}-py3") and "-cu12" in tag, "same Ray as the submitting side, CUDA 12"
    assert 'pip install ".[gpu]"' in text and "==${RAY_VERSION}" in text
    for copied in ("pyproject.toml", "platform", "jobs"):
        assert re.search(rf"^COPY .*\b{copied}\b", text, re.M)
    ignore = (CLUSTERS / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and "runs" in ignore and ".git" in ignore


def test_install_brings_the_dashboard_that_ray_job_submit_needs():
    """`ray job submit` talks to the dashboard: ray[default] is part of the project's install."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_dep = [d for d in deps["dependencies"] if re.match(r"ray\b", d)]
    assert ray_dep and "default" in re.search(r"\[(.*?)\]", ray_dep[0]).group(1).split(",")
    assert any(d.startswith("vllm") for d in deps["optional-dependencies"]["gpu"])
    requires = metadata.requires("ray") or []
    assert any("aiohttp" in r and "default" in r for r in requires)
    import aiohttp  # noqa: F401  (installed with ray[default])
    from ray.dashboard.modules.job.sdk import JobSubmissionClient  # noqa: F401


def test_no_secrets_in_cluster_files():
    pattern = re.compile(r"(AKIA[0-9A-Z]{16}|(secret_access_key|password|api_key|token)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{12,}"
                         r"|BEGIN [A-Z ]*PRIVATE KEY|hf_[A-Za-z0-9]{30,})", re.I)
    for path in [*CLUSTERS.rglob("*.yaml"), CLUSTERS / "docker" / "Dockerfile", JOBS / "runtime_env.yaml"]:
        assert not pattern.search(path.read_text()), path
