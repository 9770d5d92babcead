"""Shared pieces of the property-based fuzz tests (tests/unit/test_fuzz_*.py, hypothesis).

``fuzz_settings(n)``: ``n`` examples in CI, times ``PDKV_FUZZ_EXAMPLES`` (a multiplier, default 1)
for a longer pass; no deadline (real sockets and files vary in speed); hypothesis' example
database is off so that a run never depends on an earlier one. ``tried(port)`` counts the inputs
each port was fed; with ``PDKV_FUZZ_REPORT=FILE`` the totals are written there as JSON when the
test process exits (docs/reliability.md, "Fuzzing", has the command and the figures).
"""
from __future__ import annotations

import atexit
import json
import os
from collections import Counter

from hypothesis import HealthCheck, settings

SCALE = float(os.environ.get("PDKV_FUZZ_EXAMPLES", "1") or 1)
TRIED: Counter = Counter()


def fuzz_settings(n: int, **kw) -> settings:
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large], **kw)


def tried(port: str, n: int = 1) -> None:
    """Count ``n`` inputs fed to ``port`` (coordinator, proxy, chunk, store-local, ...)."""
    TRIED[port] += n


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _report() -> None:
    path = os.environ.get("PDKV_FUZZ_REPORT")
    if not path or not TRIED:
        return
    old: dict = {}
    if os.path.exists(path):
        with open(path) as fh:
            old = json.load(fh)
    for port, n in TRIED.items():
        old[port] = old.get(port, 0) + n
    with open(path, "w") as fh:
        json.dump(dict(sorted(old.items())), fh, indent=1)


atexit.register(_report)
