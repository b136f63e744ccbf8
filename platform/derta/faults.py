"""Test-only fault injection: DERTA_FAULT=data makes every Ray Data sample-building actor call
raise, DERTA_FAULT=train every Ray Train worker. tests/test_reliability.py uses it to prove that
an exception inside Ray ends a run with exit 1 and the original error, never a hang. Never set
it in a real run."""

from __future__ import annotations

import os

FAULT_ENV = "DERTA_FAULT"


class InjectedFault(RuntimeError):
    """The error DERTA_FAULT raises (a plain RuntimeError to everything that catches it)."""


def maybe_fail(stage: str) -> None:
    if os.environ.get(FAULT_ENV) == stage:
        raise InjectedFault(f"{FAULT_ENV}={stage}: injected failure inside a {stage}-stage Ray process (test hook)")
