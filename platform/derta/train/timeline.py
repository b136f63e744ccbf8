"""Phase timestamps of one Ray Train worker, for benchmarks/runtime (profiling only).

With DERTA_TRAIN_TIMELINE=<dir> set on the driver, every worker writes <dir>/rank<r>.json:
its process start, when the entry point ran, and (start, end) wall times of the calls that make
up a run's fixed cost (imports, tokenizer/model build, data ingest, reports, checkpoints,
export). Wall-clock (time.time) so the driver's own marks line up with the workers'.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Any, Callable, Iterator

# (module, attribute) pairs wrapped while the loop runs; looked up at call time by the loop.
TRACED = (
    ("derta.models", "load_tokenizer"),
    ("derta.train.loop", "build_models"),
    ("derta.train.checkpoint", "save_checkpoint"),
    ("derta.train.checkpoint", "export_model"),
    ("ray.train", "report"),
)


def _proc_start() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - profiling only
        return float("nan")


def _wrap(fn: Callable, name: str, events: list) -> Callable:
    @functools.wraps(fn)
    def inner(*a: Any, **kw: Any) -> Any:
        t = time.time()
        try:
            return fn(*a, **kw)
        finally:
            events.append([name, t, time.time()])

    return inner


def _wrap_batches(fn: Callable, events: list) -> Callable:
    """micro_batches is a generator: record when its first batch arrives (first data ingest)."""

    @functools.wraps(fn)
    def inner(*a: Any, **kw: Any) -> Iterator:
        t = time.time()
        first = True
        for item in fn(*a, **kw):
            if first:
                events.append(["first_batch", t, time.time()])
                first = False
            yield item

    return inner


@contextlib.contextmanager
def traced(directory: str) -> Iterator[None]:
    import importlib

    entry = time.time()
    events: list = []
    t = time.time()
    loop = importlib.import_module("derta.train.loop")
    events.append(["import_loop", t, time.time()])
    patched = []
    for mod_name, attr in TRACED:
        mod = importlib.import_module(mod_name)
        orig = getattr(mod, attr)
        setattr(mod, attr, _wrap(orig, attr, events))
        patched.append((mod, attr, orig))
    orig_mb = loop.micro_batches
    loop.micro_batches = _wrap_batches(orig_mb, events)
    patched.append((loop, "micro_batches", orig_mb))
    try:
        yield
    finally:
        for mod, attr, orig in patched:
            setattr(mod, attr, orig)
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "pid": os.getpid(), "proc_start": _proc_start(), "entry": entry,
                       "done": time.time(), "events": events}, f)
