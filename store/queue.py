"""The bounded write queue that store/local and store/hf3fs share.

``put`` never waits for the disk: it reserves room in the queue (``queue_budget`` bytes), copies
the value into an item and returns; writer threads take items and write them. A put that cannot
be queued is dropped and counted, never blocked:

* ``read_only``: the store was opened with ``writer=False`` (no writer threads);
* ``too_large``: the value can never be stored (larger than the queue or than what the backend
  can hold);
* ``queue_full``: the queue holds ``queue_budget`` bytes already;
* a closed store drops every put.

Each of these adds to ``dropped``. A put of a key that is stored or queued already is skipped
(``duplicates``) and returns True. A store using this class keeps its own index; it passes
``present(key)`` and shares its lock (``_lock`` / ``_cv``) with the queue.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable

log = logging.getLogger(__name__)

QUEUED, DUPLICATE, DROPPED = "queued", "duplicate", "dropped"


class WriteQueue:
    """Queue state and bookkeeping; items need ``.key`` and ``.size`` (bytes reserved)."""

    def __init__(self, budget: int, stats: dict[str, int], lock: threading.Lock, name: str,
                 writer: bool = True) -> None:
        self.budget = budget
        self.stats = stats
        self.cv = threading.Condition(lock)
        self.name = name  # for log lines
        self.writer = writer
        self.items: deque[Any] = deque()
        self.pending: dict[str, Any] = {}
        self.queued_bytes = 0
        self.writing = 0  # batches taken by writer threads and not finished
        self.taken = 0  # batches taken so far
        self.closed = self.stopping = False

    # -- put side (call without the lock) -----------------------------------------------
    def reserve(self, key: str, size: int, present: Callable[[str], bool], limit: int | None = None
                ) -> str:
        """QUEUED (``size`` bytes reserved: then ``push`` or ``unreserve``), DUPLICATE or DROPPED."""
        with self.cv:
            if not self.writer:  # no writer threads would ever drain the queue
                self._drop("read_only")
                return DROPPED
            if self.closed:
                self._drop()
                return DROPPED
            if size > self.budget or (limit is not None and size > limit):
                self._drop("too_large")
                if self.stats["too_large"] == 1:  # once: the same chunk size comes again and again
                    log.warning("%s: dropped %s: %d bytes exceed what the store holds (%s) or its "
                                "write queue (%d); further such puts are only counted (too_large)",
                                self.name, key, size, limit, self.budget)
                return DROPPED
            if present(key) or key in self.pending:
                self.stats["duplicates"] += 1
                return DUPLICATE
            if self.queued_bytes + size > self.budget:
                self._drop("queue_full")
                return DROPPED
            self.queued_bytes += size
            return QUEUED

    def unreserve(self, size: int) -> None:
        with self.cv:
            self.queued_bytes -= size

    def push(self, item: Any, payload_bytes: int) -> bool:
        """Queue ``item`` (its room reserved); False if the store closed meanwhile (dropped,
        the reservation released: the caller frees the item's memory)."""
        with self.cv:
            if self.closed:
                self.queued_bytes -= item.size
                self._drop()
                return False
            self.items.append(item)
            self.pending[item.key] = item
            self.stats["puts"] += 1
            self.stats["put_bytes"] += payload_bytes
            self.cv.notify()
        return True

    def _drop(self, why: str = "") -> None:
        self.stats["dropped"] += 1
        if why:
            self.stats[why] += 1

    # -- writer side -----------------------------------------------------------------------
    def take(self, more: Callable[[list[Any], Any], bool] | None = None) -> tuple[int, list[Any]] | None:
        """Wait for items: (the batch's number in take order, the batch), the batch being the
        first item and those after it while ``more(batch, next)`` says so; None when the store
        is stopping. Call ``finish_locked`` (lock held) when the batch is written or failed."""
        with self.cv:
            while not self.items and not self.stopping:
                self.cv.wait()
            if self.stopping:
                return None
            batch = [self.items.popleft()]
            while self.items and more is not None and more(batch, self.items[0]):
                batch.append(self.items.popleft())
            self.writing += 1
            self.taken += 1
            return self.taken - 1, batch

    def finish_locked(self, batch: list[Any]) -> None:
        for item in batch:
            self.queued_bytes -= item.size
            if self.pending.get(item.key) is item:
                del self.pending[item.key]
        self.writing -= 1
        self.cv.notify_all()

    # -- flush and close -------------------------------------------------------------------
    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued item is written (or failed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while self.items or self.writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cv.wait(left)
        return True

    def close(self, threads: list[threading.Thread], timeout_s: float = 5.0) -> list[Any] | None:
        """Refuse new puts, flush for ``timeout_s``, stop ``threads``; the items never written
        (their reservations released), or None if the queue was closed already."""
        with self.cv:
            if self.closed:
                return None
            self.closed = True
        if not self.flush(timeout_s):
            log.warning("%s: closing with %d puts not written", self.name, len(self.items))
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        for t in threads:
            t.join(timeout=timeout_s)
        with self.cv:
            left = list(self.items)
            self.items.clear()
            for item in left:
                self.pending.pop(item.key, None)
                self.queued_bytes -= item.size
        return left
