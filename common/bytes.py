"""Byte views of the buffers that move chunks (shared by transport/ and store/)."""
from __future__ import annotations

from typing import Any


def byte_view(buf: Any) -> memoryview:
    """A flat unsigned-byte memoryview of any buffer-protocol object (no copy)."""
    mv = memoryview(buf)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def release_view(mv: Any) -> None:
    """Release ``mv`` if nothing else exports it (an array/tensor made of it keeps the memory);
    a view that is not a memoryview (a GPU arena's slot, a tensor) is left to its owner."""
    if not isinstance(mv, memoryview):
        return
    try:
        mv.release()
    except BufferError:
        pass
