"""Byte views of the buffers that move chunks (shared by transport/ and store/)."""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np


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


def buffer_address(mv: memoryview) -> int:
    """Address of a contiguous buffer (read-only ones too) without keeping an export."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(mv))
    except TypeError:  # read-only (bytes, ...)
        return np.frombuffer(mv, np.uint8).__array_interface__["data"][0]
