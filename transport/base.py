"""The transport interface: batched put/get of whole chunks, addressed by string keys."""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable


class TransportError(RuntimeError):
    """The transport itself failed (down, misconfigured); a missing key is not an error."""


@runtime_checkable
class Transport(Protocol):
    """Every call is batched: one Python call moves a list of chunks.

    ``buffers`` are writable/readable buffer-protocol objects (memoryview, numpy array,
    contiguous CPU tensor ``.numpy()``), ideally from a reused staging pool.
    """

    #: short description of where chunks live, published in READY (e.g. "shm:/dev/shm/pdkv-x")
    location: str

    def put(self, keys: Sequence[str], buffers: Sequence[memoryview]) -> list[bool]:
        """Store each buffer under its key; returns per-key success (False = dropped)."""

    def get(self, keys: Sequence[str], buffers: Sequence[memoryview]) -> list[int]:
        """Read each key into its buffer; returns bytes read per key, 0 = miss.

        A buffer shorter than the stored value is a miss (never a partial read).
        """

    def exists(self, keys: Sequence[str]) -> list[bool]: ...

    def delete(self, keys: Sequence[str]) -> int:
        """Delete the keys that exist; returns how many were deleted."""

    def close(self) -> None: ...


def make_transport(cfg, role: str = "both") -> Transport | None:
    """Build the transport named by a ``TransportConfig`` (None for kind "none")."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "shm":
        from transport.shm import ShmTransport

        return ShmTransport(cfg)
    raise ValueError(f"unknown transport kind {cfg.kind!r}; allowed: shm, none")
