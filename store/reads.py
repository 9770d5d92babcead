"""A batch of store reads run at once, by a few threads of the store's own.

A chunk read is a copy: from the page cache (``preadv``) or from the DRAM tier's shared memory
(``memmove``); both release the GIL, and one thread copies at a few GB/s. A decode's fallback or
a prefix load asks for a batch of chunks at a time; read one after another, a 1 GB prefix took
about as long as recomputing it on an H100 (docs/bench_gpu.md). ``Readers.map`` runs a batch's
reads on ``threads`` threads (``store.read_threads``), so they copy in parallel, up to the
memory's bandwidth; results keep the batch's order.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Sequence


class Readers:
    """``threads`` reader threads, started at the first batch of more than one read."""

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError(f"read threads: {threads}; at least 1")
        self.threads, self.name = threads, name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def map(self, read: Callable[..., int], args: Sequence[tuple[Any, ...]]) -> list[int]:
        """``[read(*a) for a in args]``, run on the reader threads when there are several."""
        if self.threads == 1 or len(args) < 2:
            return [read(*a) for a in args]
        pool, futures = self._get(), []
        for a in args if pool is not None else ():
            try:
                futures.append(pool.submit(read, *a))
            except RuntimeError:  # closed meanwhile: the caller's thread does the rest
                break
        # every read ends before any error is raised: none may still write into a buffer its
        # caller has given back
        wait(futures)
        rest = [read(*a) for a in args[len(futures):]]
        return [f.result() for f in futures] + rest

    def _get(self) -> ThreadPoolExecutor | None:
        with self._lock:
            if self._pool is None and not self._closed:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=self.name)
            return self._pool

    def close(self) -> None:
        """Stop the threads (reads in flight finish first); later batches run in the caller's thread."""
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.shutdown(wait=True)
