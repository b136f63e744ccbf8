"""What a DeRTa job needs on the cluster, declared once, and how it gets there.

Each piece has one home, where Ray or pip already looks for it:
  jobs/runtime_env.yaml   env vars; PYTHONPATH=platform lets every worker import `derta` from the
                          shipped working dir (platform/ is the source root, the package is not
                          installed on the cluster)
  .rayignore              what never goes up with the working dir (Ray reads it on every upload)
  pyproject.toml          pip dependencies, shipped only when the cluster image lacks them (pip=True)

The same declaration serves every way a job reaches a cluster:
  ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/X.py
  JobSubmissionClient(addr).submit_job(entrypoint=..., runtime_env=job_runtime_env())
  ray job submit --working-dir . -- python jobs/X.py    (no env file: `init_ray` in the job adds
                                                        the missing env vars; Ray merges a
                                                        driver's runtime env into the job's)
  RAY_ADDRESS=ray://... python jobs/X.py                (a driver outside a job: `init_ray`
                                                        uploads the repo as the working dir)
  python jobs/X.py                                      (local Ray: same filesystem, nothing is
                                                        uploaded; workers get platform/ by path)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from derta.config import ConfigError, ExperimentConfig

DECLARATION = Path("jobs") / "runtime_env.yaml"
IGNORE_FILE = ".rayignore"
# Set by Ray's job supervisor for the entrypoint process: the job's config, runtime env included.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Packages the cluster always has (the Ray image); never reinstalled into a job's virtualenv.
CLUSTER_PROVIDED = {"ray"}


# --------------------------------------------------------------------------- declaration
def repo_root(root: str | Path | None = None) -> Path:
    """The project checkout that holds the declaration (this file's repo unless given)."""
    path = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    if not (path / DECLARATION).is_file():
        raise ConfigError(f"{path / DECLARATION}: runtime env declaration not found (pass the project checkout as root)")
    return path.resolve()


def declared(root: str | Path | None = None) -> dict[str, Any]:
    """jobs/runtime_env.yaml as a dict, checked: env var values must be strings for Ray."""
    path = repo_root(root) / DECLARATION
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    env = data.get("env_vars") or {}
    if not isinstance(env, dict):
        raise ConfigError(f"{path}: env_vars must be a mapping")
    for key, value in env.items():
        if not isinstance(value, str):
            raise ConfigError(f"{path}: env_vars.{key} must be a string (quote it), got {value!r}")
    data["env_vars"] = dict(env)
    return data


def ignore_patterns(root: str | Path | None = None) -> list[str]:
    """The patterns in .rayignore (comments and blank lines dropped)."""
    path = repo_root(root) / IGNORE_FILE
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def project_requirements(root: str | Path | None = None, extras: tuple[str, ...] = ()) -> list[str]:
    """pyproject's dependencies (plus `extras`), minus what the cluster image always has."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    meta = tomllib.loads((repo_root(root) / "pyproject.toml").read_text())["project"]
    reqs = list(meta.get("dependencies", []))
    for extra in extras:
        if extra not in meta.get("optional-dependencies", {}):
            raise ConfigError(f"pyproject.toml: no optional dependency group {extra!r}")
        reqs += meta["optional-dependencies"][extra]
    return [r for r in reqs if re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() not in CLUSTER_PROVIDED]


def job_runtime_env(root: str | Path | None = None, *, pip: bool = False, extras: tuple[str, ...] = ()) -> dict[str, Any]:
    """The full runtime env for a job submission (Jobs SDK, `ray.init(runtime_env=...)`).

    working_dir is the absolute checkout path (the SDK resolves it on the submitting machine);
    excludes repeat .rayignore for Ray versions that do not read that file.
    """
    base = repo_root(root)
    env: dict[str, Any] = {"working_dir": str(base), "env_vars": declared(base)["env_vars"]}
    patterns = ignore_patterns(base)
    if patterns:
        env["excludes"] = patterns
    if pip:
        env["pip"] = {"packages": project_requirements(base, extras), "pip_check": False}
    return env


# --------------------------------------------------------------------------- driver side
def _without_pythonpath(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k != "PYTHONPATH"}


def driver_runtime_env(
    root: str | Path | None,
    *,
    job_env: dict[str, Any] | None,
    connecting: bool,
    installed: bool,
) -> dict[str, Any]:
    """The runtime env a job's driver passes to ray.init (pure: decides, does not connect).

    job_env    the runtime env of the submitted job this driver runs in, or None (no job)
    connecting True when the driver joins an existing cluster, False for a local one
    installed  True when `derta` is installed on the nodes (the project's image)

    Inside a job Ray merges the driver's env into the job's and refuses a key given twice, so
    only what the job lacks is added. Without a job and with a remote cluster, the checkout
    goes up as the working dir unless the nodes have the package. A local cluster shares the
    driver's filesystem: workers get platform/ by absolute path.
    """
    base = repo_root(root)
    env_vars: dict[str, str] = declared(base)["env_vars"]
    if job_env is not None:
        have = set(job_env.get("env_vars") or {})
        ship = not job_env.get("working_dir") and not installed  # nothing on the nodes: upload
        has_dir = bool(job_env.get("working_dir")) or ship  # a relative PYTHONPATH needs one
        add = {k: v for k, v in env_vars.items() if k not in have and (k != "PYTHONPATH" or has_dir)}
        out: dict[str, Any] = {"env_vars": add} if add else {}
        if ship:
            out["working_dir"] = str(base)
            if "excludes" not in job_env and ignore_patterns(base):
                out["excludes"] = ignore_patterns(base)
        return out
    if connecting:
        if installed:
            return {"env_vars": _without_pythonpath(env_vars)}
        return job_runtime_env(base)
    local = _without_pythonpath(env_vars)
    local["PYTHONPATH"] = os.pathsep.join(p for p in (str(base / "platform"), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": local}


def current_job_runtime_env() -> dict[str, Any] | None:
    """The runtime env of the Ray job this process is the entrypoint of, or None."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def derta_installed() -> bool:
    from importlib import metadata

    try:
        metadata.distribution("derta")
        return True
    except metadata.PackageNotFoundError:
        return False


def init_ray(cfg: ExperimentConfig, root: str | Path | None = None) -> dict[str, Any]:
    """Connect (or start a local Ray) with the project's runtime env; returns the env passed.

    A no-op when Ray is already up. After it, derta.cluster.ensure_ray (called by every
    pipeline verb) finds Ray initialised and does nothing.
    """
    import ray

    from derta.cluster import local_cpus, quiet_console

    if ray.is_initialized():
        quiet_console()
        return {}

    job_env = current_job_runtime_env()
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    env = driver_runtime_env(root, job_env=job_env, connecting=bool(address), installed=derta_installed())
    if address or job_env is not None:
        ray.init(address=address, runtime_env=env or None, log_to_driver=True, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or local_cpus(cfg), include_dashboard=False, runtime_env=env, log_to_driver=True,
                 logging_level=logging.WARNING)
    quiet_console()
    return env


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """`python -m derta.runtime_env [--pip] [--json]`: print the job runtime env, for
    `ray job submit --runtime-env FILE` (YAML) or `--runtime-env-json` (JSON)."""
    p = argparse.ArgumentParser(prog="python -m derta.runtime_env", description=main.__doc__.splitlines()[0])
    p.add_argument("--pip", action="store_true", help="also ship pyproject's dependencies (clusters on a stock Ray image)")
    p.add_argument("--extra", action="append", default=[], help="pyproject extra to ship with --pip (e.g. gpu)")
    p.add_argument("--json", action="store_true", help="JSON instead of YAML")
    p.add_argument("--root", help="project checkout (default: this one)")
    args = p.parse_args(argv)
    try:
        env = job_runtime_env(args.root, pip=args.pip, extras=tuple(args.extra))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(env) if args.json else yaml.safe_dump(env, sort_keys=False), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
