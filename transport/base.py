"""The transport interface: batched put/get of whole chunks, addressed by string keys; and the
checks and slot bookkeeping its implementations share."""
from __future__ import annotations

import threading
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from common.bytes import byte_view, release_view


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
    #: True when the transport itself refuses torn or raced reads (shm: ``release`` re-checks each
    #: slot's sequence number), so a reader may skip payload checksums (``connector.checksum: auto``)
    guards_reads: bool
    #: True when the transport also implements ``ZeroCopyTransport`` (reserve/commit,
    #: acquire/release); the connector then gathers and scatters straight into its memory
    zero_copy: bool
    #: counters (puts, drops, ...; names per implementation), sent with each heartbeat
    stats: dict[str, int]

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


@runtime_checkable
class ZeroCopyTransport(Transport, Protocol):
    """Optional capability: hand out views of the transport's own memory instead of copying.

    A producer ``reserve``s slots, fills ``slot.view`` (a writable 1-D uint8 memoryview of
    exactly the reserved size, e.g. gathering KV straight into it) and ``commit``s them; a
    consumer ``acquire``s views of committed values, reads them and ``release``s them. A
    transport that implements it says so with ``zero_copy`` (shm, mooncake and infinistore do).
    """

    def reserve(self, keys: Sequence[str], sizes: Sequence[int]) -> list[Any]:
        """A writable slot per key (``.key``, ``.view``, ``.size``), invisible to readers until
        committed; None = no room (counted as dropped). Every slot must be committed."""

    def commit(self, slots: Sequence[Any], ok: Sequence[bool] | None = None) -> list[bool]:
        """Publish the slots (atomic per key); slots with ``ok`` False (or None slots) are
        released unpublished. Returns per slot whether it was published."""

    def acquire(self, keys: Sequence[str]) -> list[Any]:
        """Read views (``.key``, ``.view``, ``.size``) of committed values; None = miss."""

    def release(self, reads: Sequence[Any]) -> list[bool]:
        """End the reads; True where the value stayed committed and unchanged during the hold
        (so what was read is valid); False (and None entries) = treat the chunk as a miss."""


def check_buffers(op: str, keys: Sequence[str], buffers: Sequence[Any], writable: bool = False) -> list[memoryview]:
    """``buffers`` as flat byte views, one per key (ValueError otherwise), each writable with
    ``writable`` (TypeError naming a read-only one): what every ``put`` and ``get`` takes."""
    if len(keys) != len(buffers):
        raise ValueError(f"{op}: {len(keys)} keys but {len(buffers)} buffers")
    mvs = [byte_view(b) for b in buffers]
    for j, mv in enumerate(mvs):
        if writable and mv.readonly:
            raise TypeError(f"{op}: buffer {j} is read-only")
    return mvs


def check_reserve(keys: Sequence[str], sizes: Sequence[int]) -> list[int]:
    """``sizes`` as ints, one per key and none negative (ValueError otherwise): what every
    staging-region ``reserve`` takes."""
    if len(keys) != len(sizes):
        raise ValueError(f"reserve: {len(keys)} keys but {len(sizes)} sizes")
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes):
        raise ValueError(f"reserve: negative size in {sizes}")
    return sizes


def close_written(owner: Any, slots: Sequence[Any], ok: Sequence[bool] | None) -> list[bool]:
    """End the write slots ``commit`` got (ValueError for one not pending at ``owner``): views
    released, slots done; per slot whether it is to be stored (not None and ``ok``)."""
    if ok is not None and len(ok) != len(slots):
        raise ValueError(f"commit: {len(slots)} slots but {len(ok)} ok flags")
    for s in slots:
        if s is not None and (s._owner is not owner or s._done):
            raise ValueError(f"commit: slot for {s.key!r} is not a pending slot of this transport")
    for s in slots:
        if s is not None:
            s._done = True
            release_view(s.view)
    return [s is not None and (ok is None or bool(ok[i])) for i, s in enumerate(slots)]


def close_reads(owner: Any, reads: Sequence[Any]) -> list[bool]:
    """End the read slots ``release`` got: per slot True when it was a held read of ``owner``
    (now done, its view released), False for None, foreign or already released ones."""
    held = [r is not None and r._owner is owner and not r._done for r in reads]
    for r, h in zip(reads, held):
        if h:
            r._done = True
            release_view(r.view)
    return held


class InFlight:
    """The staging slots one engine call reads into. The caller frees them once the call answered;
    a caller that stopped waiting ``abandon``s them, and they are freed when the call has really
    ended (``ended``, run by the call's end), not before: a late answer must never land in memory
    handed out again."""

    def __init__(self, free: Callable[[], None]) -> None:
        self._free, self._lock = free, threading.Lock()
        self._ended = self._abandoned = False

    def ended(self) -> None:
        with self._lock:
            self._ended = True
            abandoned = self._abandoned
        if abandoned:
            self._free()

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            ended = self._ended
        if ended:
            self._free()
