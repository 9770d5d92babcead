"""The persistent KV store interface (decode fallback and prefix reuse across requests).

A store maps chunk keys (``namespace/rank/hexhash``, see ``pd.connector.keys``) to opaque byte strings
(normally whole chunks in ``pd.connector.chunk`` format). It is a cache: any value may vanish at any time
(eviction, corruption, disk errors), and every failure is reported as a miss or a dropped put,
never as an exception on the serving path.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable


@runtime_checkable
class KVStore(Protocol):
    #: Counters (names depend on the backend; ``usage()`` returns them too).
    stats: dict[str, int]
    #: Where the values live, for log lines: ``local:<dir>``, ``hf3fs:<root>``.
    location: str
    #: The largest value one ``put`` can ever store (bytes); a larger one is dropped and counted
    #: ``too_large``.
    max_value: int

    def put(self, key: str, data: Any) -> bool:
        """Queue a copy of ``data`` (any buffer-protocol object) for writing under ``key``.

        Asynchronous: returns at once, never waits for disk I/O; the caller may reuse its
        buffer as soon as this returns. False = dropped (queue full, larger than the budget,
        store closed), counted in ``stats["dropped"]``. True does not promise the value will
        be readable later (a write may still fail, or the value may be evicted).
        """
        ...

    def get(self, key: str, into: Any) -> int:
        """Read the value of ``key`` into the writable buffer ``into``.

        Returns the number of bytes read; 0 = miss (absent, longer than ``into``, corrupt,
        or an I/O error). Bytes of ``into`` beyond the returned length are left unspecified.
        """
        ...

    def get_many(self, keys: Sequence[str], intos: Sequence[Any]) -> list[int]:
        """``get`` of each key into its buffer, as one batch where the backend can (hf3fs: one
        ring submit per staging area); the same results as ``get`` one by one."""
        ...

    def contains(self, keys: Sequence[str]) -> int:
        """Length of the longest prefix of ``keys`` that is present (for prefix reuse)."""
        ...

    def delete(self, keys: Sequence[str]) -> int:
        """Remove these keys; returns how many were present."""
        ...

    def usage(self) -> dict:
        """``bytes``, ``files``, ``budget`` and the counters of ``stats``."""
        ...

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued put has been written (or failed); False on timeout."""
        ...

    def close(self) -> None:
        """Flush briefly, then stop background threads; later puts are dropped."""
        ...
