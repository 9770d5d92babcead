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
