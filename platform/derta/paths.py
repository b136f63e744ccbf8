"""The run directory layout (public contract, docs/ARCHITECTURE.md): one place for every path."""

from __future__ import annotations

from dataclasses import dataclass

from derta.config import check_run_name
from derta.storage import join


@dataclass(frozen=True)
class RunPaths:
    root: str  # storage.root: a local path or s3://bucket/prefix
    name: str  # the run name

    def __post_init__(self) -> None:
        check_run_name(self.name)  # one safe segment: <root>/<name>/... never leaves root

    @property
    def dir(self) -> str:
        return join(self.root, self.name)

    @property
    def config(self) -> str:
        return join(self.dir, "config.yaml")

    @property
    def data(self) -> str:
        return join(self.dir, "data")

    @property
    def manifest(self) -> str:
        return join(self.data, "manifest.json")

    @property
    def heldout(self) -> str:
        return join(self.data, "heldout.jsonl")

    @property
    def checkpoints(self) -> str:
        return join(self.dir, "checkpoints")

    @property
    def model(self) -> str:
        return join(self.dir, "model")

    @property
    def eval(self) -> str:
        return join(self.dir, "eval")

    @property
    def generations(self) -> str:
        return join(self.eval, "generations.jsonl")

    @property
    def metrics(self) -> str:
        return join(self.eval, "metrics.json")

    @property
    def report(self) -> str:
        return join(self.dir, "report.html")
