"""Secrets kept out of everything written, and paths kept inside their roots.

* `seal` / `unseal`: a value the driver hands to Ray Train workers (the unredacted config, the
  tracking URI, the AWS keys of the driver's environment) travels as a key into the Ray
  cluster's in-memory key-value store. Ray Train and Tune pickle their run configs into
  trainer.pkl / tuner.pkl under the run directory; a sealed value pickles as its key only.
* `RedactingConsole`: every printed line (tracking URI, run directory, error text) redacted.
* `keep_secrets_out_of_tune_runtime_envs`: Ray Tune's own copy of AWS keys into runtime envs off.
"""

from __future__ import annotations

import contextlib
import pickle
import uuid
from typing import Any, Iterator

from rich.console import Console

from derta.config import is_secret_env, redact_text

KV_NAMESPACE = "derta-sealed"


class Sealed:
    """A value left in the cluster's memory; only `key` is ever pickled."""

    def __init__(self, key: str):
        self.key = key

    def __repr__(self) -> str:
        return f"Sealed({self.key!r})"


def seal(value: Any) -> Sealed:
    from ray.experimental import internal_kv

    key = f"derta-{uuid.uuid4().hex}"
    internal_kv._internal_kv_put(key, pickle.dumps(value), namespace=KV_NAMESPACE)
    return Sealed(key)


def unseal(value: Any) -> Any:
    """The value behind a Sealed (anything else is returned as it is)."""
    if not isinstance(value, Sealed):
        return value
    from ray.experimental import internal_kv

    data = internal_kv._internal_kv_get(value.key, namespace=KV_NAMESPACE)
    if data is None:
        raise RuntimeError(f"sealed value {value.key} is gone (the driver that sealed it has ended)")
    return pickle.loads(data)


def release(*values: Any) -> None:
    """Forget sealed values once the workers that read them are done."""
    from ray.experimental import internal_kv

    for v in values:
        if isinstance(v, Sealed):
            with contextlib.suppress(Exception):
                internal_kv._internal_kv_del(v.key, namespace=KV_NAMESPACE)


@contextlib.contextmanager
def sealed(mapping: dict[str, Any], keys: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """A copy of mapping with `keys` sealed, released at exit."""
    out = dict(mapping)
    for k in keys:
        if out.get(k) is not None:
            out[k] = seal(out[k])
    try:
        yield out
    finally:
        release(*(out[k] for k in keys if k in out))


def unseal_keys(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: unseal(v) for k, v in mapping.items()}


def keep_secrets_out_of_tune_runtime_envs() -> None:
    """Ray Tune copies the driver's AWS_SECRET_ACCESS_KEY / session token into every trial
    actor's runtime env, and Ray's runtime-env agent writes runtime envs to its log file in the
    session directory. Dropped here: trials get the driver's settings sealed (run_tune), and
    nodes otherwise use their own credential chain (env, profile, instance role)."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # Ray moved it: nothing to drop
        return
    names = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if names is not None:
        class_cache.ENV_VARS_TO_PROPAGATE = {n for n in names if not is_secret_env(n)}


class RedactingConsole(Console):
    """A rich Console whose printed strings pass through redact_text first."""

    def print(self, *objects: Any, **kwargs: Any) -> None:  # noqa: A003 - rich's name
        super().print(*(redact_text(o) if isinstance(o, str) else o for o in objects), **kwargs)

    def rule(self, title: Any = "", **kwargs: Any) -> None:
        super().rule(redact_text(title) if isinstance(title, str) else title, **kwargs)


_CHECKED: set[tuple[str, str | None]] = set()


def check_services(cfg: Any, timeout: float = 5.0) -> None:
    """Before anything starts: the S3 endpoint of storage.root and the tracking store answer
    within seconds (ConfigError -> exit 2 otherwise). Once per (root, tracking URI) per process."""
    from derta import storage
    from derta.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.uri, cfg.storage.root) if cfg.tracking.enabled else None
    key = (cfg.storage.root, uri)
    if key in _CHECKED:
        return
    storage.check_reachable(cfg.storage.root, timeout)
    if uri:
        check_reachable(uri, timeout)
    _CHECKED.add(key)
