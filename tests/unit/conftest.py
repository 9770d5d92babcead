"""Shared fixtures of the unit tests."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

DOUBLES = Path(__file__).resolve().parents[1] / "doubles"


@pytest.fixture
def usrbio_double(monkeypatch):
    """``import hf3fs_fuse.io`` gives the USRBIO emulator (tests/doubles) during the test only."""
    def forget():
        for name in ("hf3fs_fuse.io", "hf3fs_fuse"):
            sys.modules.pop(name, None)

    forget()
    monkeypatch.syspath_prepend(str(DOUBLES))
    yield
    forget()


#: Value sizes around a page: 1 byte, one short of a page, a page, not a page multiple, 1 MiB.
ROUND_TRIP_SIZES = [1, 4095, 4096, 100_000, 1 << 20]


def round_trip(store, key, data, sizes=ROUND_TRIP_SIZES) -> list[int]:
    """Put ``data(i, n)`` under ``key(i)`` for each size, flush, and read each back into a buffer
    10 bytes larger: every get returns the length and the bytes. Returns the sizes."""
    import numpy as np

    for i, n in enumerate(sizes):
        assert store.put(key(i), data(i, n))
    assert store.flush(10)
    for i, n in enumerate(sizes):
        out = np.zeros(n + 10, dtype=np.uint8)
        assert store.get(key(i), out) == n
        assert np.array_equal(out[:n], data(i, n))
    return sizes
