"""Reruns: the same run name with the same config resumes; with a different config it is
refused (exit 2, naming the differing keys) unless the user asks for a new run.

A run directory holds one experiment: its config.yaml (written by every verb) says which. A
second `derta run` with other settings used to resume the old checkpoint, train 0 steps and
relabel the old model with the new config.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from derta import storage
from derta.config import ConfigError, ExperimentConfig, redact
from derta.paths import RunPaths

# Settings that say where or how a run executes, not what it computes.
IGNORED = ("storage", "tracking", "ray", "train.resume", "train.max_failures", "train.log_every",
           "eval.num_actors", "eval.batch_size")
SHOWN = 8  # differing keys named in the message


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ (IGNORED sections and keys left out), sorted."""
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in keys if not any(k == i or k.startswith(i + ".") for i in IGNORED)]


def config_fingerprint(cfg: ExperimentConfig) -> str:
    """Hash of everything that decides what a run computes (IGNORED keys left out): resume
    trusts only checkpoints written under the same fingerprint."""
    flat = {k: v for k, v in _flat(redact(cfg.to_dict())).items() if not any(k == i or k.startswith(i + ".") for i in IGNORED)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_rerun(cfg: ExperimentConfig, paths: RunPaths) -> RunPaths:
    """The paths this invocation may use. storage.if_exists: `resume` (default) continues a run
    of the same config and refuses another config; `new` picks the first free `<name>-N`."""
    try:
        text = storage.read_text(paths.config)
    except FileNotFoundError:
        return paths
    try:
        old = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        old = None
    new = redact(cfg.to_dict())  # config.yaml is written redacted
    diff = differing_keys(old, new) if isinstance(old, dict) else ["<unreadable config.yaml>"]
    if not diff:
        return paths
    if cfg.storage.if_exists == "new":
        n = 2
        while storage.exists(RunPaths(paths.root, f"{paths.name}-{n}").config):
            n += 1
        cfg.storage.run_name = f"{paths.name}-{n}"
        return RunPaths(paths.root, cfg.storage.run_name)
    more = f" and {len(diff) - SHOWN} more" if len(diff) > SHOWN else ""
    raise ConfigError(
        f"storage.run_name: run '{paths.name}' already exists at {paths.dir} with a different config "
        f"({', '.join(diff[:SHOWN])}{more} differ); rerun with the same config to resume it, pick another "
        f"storage.run_name, or set storage.if_exists=new for a fresh run next to it")
