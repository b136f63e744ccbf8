"""MLflow tracking that needs no server by default and works from any Ray process.

Where runs go (first match wins):
  1. an explicit `tracking.uri` (any MLflow URI: http(s)://server, databricks, sqlite:///...)
  2. the MLFLOW_TRACKING_URI environment variable
  3. a sqlite store `<storage.root>/mlflow.db`, artifacts in `<storage.root>/mlartifacts`.
     When storage.root is s3:// (sqlite cannot live on S3) the db is the local file
     `./runs/mlflow.db` while artifacts still go to `<s3 root>/mlartifacts`; set a tracking
     server URI for a store shared by every node of a cluster.

`Tracker` talks to MLflow through an `MlflowClient` bound to its URI rather than MLflow's
global "active run", so a process can hold several trackers, and a Ray Train worker or eval
actor logs into the driver's run with the `TrackingHandle` (uri, experiment, run id) handed to
it: `with handle.attached() as tracker: tracker.log_metrics(...)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from derta import storage
from derta.config import redact

# MLflow prints "View run ... at: <tracking URI>/#/..." on every run end; with a server URI that
# holds userinfo (user:password@host) that line would put the password on the console and in logs.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

LOCAL_DB_FOR_S3_ROOT = "./runs/mlflow.db"

# MLflow's per-value limits (mlflow.utils.validation); copied so a disabled tracker never
# imports mlflow.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


# --------------------------------------------------------------------------- URIs
def resolve_tracking_uri(uri: str | None, storage_root: str) -> str:
    """The MLflow tracking URI for an explicit uri (or None) and a storage root."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = LOCAL_DB_FOR_S3_ROOT if storage.is_s3(storage_root) else os.path.join(storage_root, "mlflow.db")
    return "sqlite:///" + os.path.abspath(db)


def default_artifact_location(tracking_uri: str, storage_root: str) -> str | None:
    """`<storage_root>/mlartifacts` for a sqlite store; None (the server decides) otherwise."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    if storage.is_s3(storage_root):
        return storage.join(storage_root, "mlartifacts")
    return Path(os.path.abspath(storage_root), "mlartifacts").as_uri()


def _sqlite_path(tracking_uri: str) -> str | None:
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///") :]
        return path if path and path != ":memory:" else None
    return None


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking server must answer (any HTTP status) within timeout, and a sqlite
    store's directory must be writable: otherwise MLflow retries for minutes before failing.
    Raises ConfigError naming the (redacted) URI."""
    import urllib.error
    import urllib.request

    from derta.config import ConfigError, redact_text

    shown = redact_text(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(tracking_uri)
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else parts.netloc
        health = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
        try:
            urllib.request.urlopen(health, timeout=timeout).close()
        except urllib.error.HTTPError:
            return  # it answered
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(f"tracking.uri: the MLflow server {shown} did not answer within {timeout:g}s ({reason}); "
                              "start it, fix tracking.uri / MLFLOW_TRACKING_URI, or set tracking.enabled=false") from None
        return
    path = _sqlite_path(tracking_uri)
    if path:
        parent = os.path.dirname(os.path.abspath(path)) or "."
        probe = parent
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe) or not os.access(probe, os.W_OK) or probe.startswith(("/proc", "/sys")) or (
                os.path.exists(path) and not os.access(path, os.W_OK)):
            raise ConfigError(f"tracking.uri: the MLflow store {shown} cannot be written ({probe} is not a writable "
                              "directory); choose another storage.root or tracking.uri")


# --------------------------------------------------------------------------- value shaping
def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: MLflow params and metrics are flat."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _to_str(value: Any, limit: int) -> str:
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quiet_mlflow() -> None:
    """MLflow logs every alembic migration and a few advisory warnings; none help a user."""
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking._tracking_service.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", module=r"mlflow(\.|$)")


# --------------------------------------------------------------------------- tracker
class Tracker:
    """Log params, metrics and artifacts to one MLflow experiment.

    `with tracker.run("train", tags=...) as run_id:` creates a run (a child run when
    parent_run_id is given or nested=True inside another run); `with tracker.attach(run_id):`
    logs into an existing run from any process without ending it. The log_* methods write to
    the innermost open run. With enabled=False every method is a no-op and MLflow is never
    imported, so code paths need no `if tracking:` branches.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str = "derta",
        enabled: bool = True,
        artifact_location: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.enabled = enabled
        self.artifact_location = artifact_location
        self._client: Any = None
        self._experiment_id: str | None = None
        self._stack: list[str] = []

    @classmethod
    def for_root(
        cls, storage_root: str, experiment: str = "derta", uri: str | None = None, enabled: bool = True
    ) -> "Tracker":
        """The tracker a run under storage_root uses (see the module docstring for where)."""
        tracking_uri = resolve_tracking_uri(uri, storage_root)
        return cls(tracking_uri, experiment, enabled, default_artifact_location(tracking_uri, storage_root))

    # Trackers travel to Ray actors: send the settings, not the client or open runs.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_stack": []}

    # ----------------------------------------------------------------- plumbing
    @property
    def client(self) -> Any:
        if self._client is None:
            _quiet_mlflow()
            from mlflow import MlflowClient

            db = _sqlite_path(self.tracking_uri)
            if db:
                os.makedirs(os.path.dirname(db) or ".", exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        """The experiment's id, creating (or restoring) the experiment on first use."""
        if self._experiment_id is None:
            self._experiment_id = self._ensure_experiment()
        return self._experiment_id

    def _ensure_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            location = self.artifact_location
            if location is None and _sqlite_path(self.tracking_uri):
                # MLflow's default would be ./mlruns in whatever directory we run from.
                location = Path(_sqlite_path(self.tracking_uri)).parent.joinpath("mlartifacts").as_uri()
            try:
                return client.create_experiment(self.experiment, artifact_location=location)
            except MlflowException:  # another process created it first
                exp = client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    @property
    def active_run_id(self) -> str | None:
        return self._stack[-1] if self._stack else None

    def _run_id(self) -> str:
        if not self._stack:
            raise RuntimeError("no active MLflow run: log inside `tracker.run(...)` or `tracker.attach(run_id)`")
        return self._stack[-1]

    # ----------------------------------------------------------------- runs
    def start_run(
        self,
        run_name: str,
        tags: Mapping[str, Any] | None = None,
        nested: bool = False,
        parent_run_id: str | None = None,
    ) -> str | None:
        """Create a run and make it the active one; returns its id (None when disabled).

        Prefer `with tracker.run(...)`, which also ends the run with the right status.
        """
        if not self.enabled:
            return None
        if nested and parent_run_id is None:
            parent_run_id = self._run_id()
        all_tags = {k: _to_str(v, MAX_TAG_VALUE) for k, v in redact(dict(tags or {})).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self._stack.append(run.info.run_id)
        return run.info.run_id

    def end_run(self, status: str = "FINISHED") -> None:
        """End the active run (FINISHED, FAILED or KILLED) and pop it."""
        if not self.enabled:
            return
        self.client.set_terminated(self._run_id(), status=status)
        self._stack.pop()

    def find_run(self, run_name: str, match: Mapping[str, Any], parent_run_id: str | None = None) -> str | None:
        """The newest run named run_name whose tags hold every `match` item and whose parent is
        parent_run_id (None: a top-level run); None when there is none."""
        if not self.enabled or "'" in run_name or "\\" in run_name:  # never in a run name (one path segment)
            return None
        runs = self.client.search_runs([self.experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
                                       order_by=["attributes.start_time DESC"], max_results=100)
        want = {k: _to_str(v, MAX_TAG_VALUE) for k, v in redact(dict(match)).items()}
        for r in runs:
            tags = r.data.tags
            if tags.get("mlflow.parentRunId") == parent_run_id and all(tags.get(k) == v for k, v in want.items()):
                return r.info.run_id
        return None

    def reopen_run(self, run_id: str, tags: Mapping[str, Any] | None = None) -> str:
        """Make an existing run the active one again (status RUNNING). Its children a killed
        process left RUNNING (SIGKILL, a lost node: nobody closed them) are marked KILLED."""
        self.client.update_run(run_id, status="RUNNING")
        self.close_stale_children(run_id)
        self._stack.append(run_id)
        if tags:
            self.set_tags(tags)
        return run_id

    def close_stale_children(self, run_id: str) -> list[str]:
        """Mark the RUNNING child runs of run_id KILLED; returns their ids. Called when run_id is
        reopened, so no process of this tracker's run can still be writing to them."""
        stale = self.client.search_runs(
            [self.experiment_id], max_results=1000,
            filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and attributes.status = 'RUNNING'")
        for r in stale:
            self.close_stale_children(r.info.run_id)
            self.client.set_terminated(r.info.run_id, status="KILLED")
        return [r.info.run_id for r in stale]

    @contextlib.contextmanager
    def run(
        self,
        run_name: str,
        tags: Mapping[str, Any] | None = None,
        nested: bool = False,
        parent_run_id: str | None = None,
        reuse: Mapping[str, Any] | None = None,
    ) -> Iterator[str | None]:
        """A run for the duration of the block: FAILED if the block raises, KILLED on ^C.

        reuse: tags identifying the run across invocations (e.g. verb and run directory): the
        newest run of that name, parent and tags is reopened (reopen_run) instead of creating
        a second one, so a resumed run keeps one MLflow run."""
        found = self.find_run(run_name, reuse, parent_run_id) if reuse is not None else None
        if found:
            run_id = self.reopen_run(found, tags)
        else:
            run_id = self.start_run(run_name, tags=tags, nested=nested, parent_run_id=parent_run_id)
        if run_id is None:
            yield None
            return
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if self._stack and self._stack[-1] == run_id:
                self.end_run(status)

    @contextlib.contextmanager
    def attach(self, run_id: str | None) -> Iterator[str | None]:
        """Log into an existing run (e.g. the driver's, from a Ray worker); never ends it."""
        if not self.enabled:
            yield run_id
            return
        if not run_id:
            raise ValueError("attach() needs the run id of an existing run")
        self._stack.append(run_id)
        try:
            yield run_id
        finally:
            if self._stack and self._stack[-1] == run_id:
                self._stack.pop()

    # ----------------------------------------------------------------- logging
    def log_params(self, params: Mapping[str, Any], new_only: bool = False) -> None:
        """Nested dicts become dotted keys; values are stringified, truncated and redacted.
        new_only: keys the run already has are left as they are (a reopened run: MLflow
        refuses to change a param, and a resumed run differs only in where it runs)."""
        if not self.enabled or not params:
            return
        from mlflow.entities import Param

        flat = flatten(redact(dict(params)))
        items = [Param(k[:MAX_KEY], _to_str(v, MAX_PARAM_VALUE)) for k, v in flat.items()]
        if new_only:
            have = self.client.get_run(self._run_id()).data.params
            items = [p for p in items if p.key not in have]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self._run_id(), params=items[i : i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Numeric values only (nested dicts flattened); None values are skipped."""
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for k, v in flatten(metrics).items():
            if v is None:
                continue
            try:
                value = float(v)
            except (TypeError, ValueError):
                raise TypeError(f"metric {k!r}: expected a number, got {v!r}") from None
            items.append(Metric(k[:MAX_KEY], value, now, step or 0))
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self._run_id(), metrics=items[i : i + MAX_METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k[:MAX_KEY], _to_str(v, MAX_TAG_VALUE)) for k, v in flatten(redact(dict(tags))).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self._run_id(), tags=items[i : i + MAX_PARAMS_PER_BATCH])

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Log a file, or a directory's contents, under artifact_path (s3:// URIs are fetched first)."""
        if not self.enabled:
            return
        path = storage.local_copy(local_path)
        if os.path.isdir(path):
            self.client.log_artifacts(self._run_id(), path, artifact_path)
        elif os.path.isfile(path):
            self.client.log_artifact(self._run_id(), path, artifact_path)
        else:
            raise FileNotFoundError(f"{local_path}: no such file or directory to log")

    def log_dict(self, obj: Any, name: str) -> None:
        """Log obj as JSON/YAML (by name's extension), with secrets redacted."""
        if self.enabled:
            self.client.log_dict(self._run_id(), redact(obj), name)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self.client.log_text(self._run_id(), text, name)

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """Rows of one table as an MLflow table artifact (shown in the UI's evaluation view)."""
        if not self.enabled:
            return
        import pandas as pd

        if not name.endswith(".json"):
            name += ".json"
        self.client.log_table(self._run_id(), data=pd.DataFrame(rows), artifact_file=name)


# --------------------------------------------------------------------------- hand-off
@dataclass(frozen=True)
class TrackingHandle:
    """What a Ray worker / actor needs to log into a run the driver opened: three strings,
    cheap to pickle. run_id None means tracking is off, and attached() yields a no-op tracker."""

    tracking_uri: str
    experiment: str
    run_id: str | None

    @classmethod
    def of(cls, tracker: Tracker, run_id: str | None) -> "TrackingHandle":
        return cls(tracker.tracking_uri, tracker.experiment, run_id if tracker.enabled else None)

    def tracker(self) -> Tracker:
        return Tracker(self.tracking_uri, self.experiment, enabled=self.run_id is not None)

    @contextlib.contextmanager
    def attached(self) -> Iterator[Tracker]:
        """A tracker logging into this run for the duration of the block (the run stays open)."""
        tracker = self.tracker()
        with tracker.attach(self.run_id):
            yield tracker
