"""Loads from the store alone (prefix reuse): the reads of one batch overlap the scatter of the last.

An 8192-token prefix of an 8B model is 1 GB. Read from page-cached files (about 8 GB/s with
``connector.store.read_threads`` 4) and then copied to the GPU and scattered (about 25 GB/s),
one batch after the other, the two add up; here a helper thread reads batch k+1 into its own
staging slabs while this thread scatters batch k from its slabs.

Safety, as in ``pd.connector.load``'s batches: a load waits for slabs only when it holds none
(the next batch's are taken only if free at once, else that batch is read after the scatter, as
before), so loads and saves sharing the pool cannot deadlock, and each batch's slabs go back as
soon as it is scattered; a scatter synchronizes its copy before it returns; the load stops at
the first chunk that fails (``st.error`` says why), and before the slabs go back the batch still
being read is waited for and its in-place reads (the store's DRAM tier) are released, also when
the scatter raises.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

Span = tuple[int, int, int, int]  # Chunking.spans: (chunk, first block, blocks, tokens)


@dataclass
class Batch:
    """Chunks of one load read at once: where each one's bytes are and whether they are good."""

    spans: list[Span]
    sizes: list[int]
    xkeys: list[str]  # transport keys
    reads: list  # zero-copy reads still held (None: none)
    views: list = field(default_factory=list)  # each chunk's bytes: a transport slot, a staging slab or the store's DRAM
    store_reads: list = field(default_factory=list)  # the store's in-place reads still to release (None: none)
    why: list[str] = field(default_factory=list)  # "" = good, else why not
    source: list[str] = field(default_factory=list)  # where a good chunk came from: transport, store


def load_from_store(loads: Any, st: Any, spans: list, blocks: torch.Tensor, deadline: float,
                    part: Any, prefetch: ThreadPoolExecutor) -> None:
    """Load ``spans`` (chunks of ``st``) from its store into ``blocks``, reads overlapped with
    scatters; on a failure ``st.error`` is set and the chunks before it stay loaded."""
    m = max(1, loads.pool.n_slabs // 4)  # a batch: a quarter of the pool (two loads, two batches each)
    batches = [spans[i : i + m] for i in range(0, len(spans), m)]
    held: list = [loads.pool.take(len(batches[0]))]  # [this batch's slabs, the next one's]
    fut: Future | None = None
    try:
        b = _read(loads, st, batches[0], held[0], part)
        for k in range(len(batches)):
            if k + 1 < len(batches):  # the next batch's slabs only if free now: never wait holding some
                nxt = loads.pool.take(len(batches[k + 1]), wait=False)
                if nxt is not None:
                    held.append(nxt)
                    fut = _submit(prefetch, loads, st, batches[k + 1], nxt, part)
            try:
                ok = _scatter_all(loads, st, b, blocks, deadline, part)
            finally:
                release_held(st, b)
            if not ok or k + 1 == len(batches):
                return
            loads.pool.give(held.pop(0))
            if fut is not None:
                b, fut = fut.result(), None
            else:  # no slabs were free: read it now, as the old loop did
                held.append(loads.pool.take(len(batches[k + 1])))
                b = _read(loads, st, batches[k + 1], held[-1], part)
    finally:
        try:
            if fut is not None:  # the slabs go back only once no thread reads into them
                release_held(st, _settled(fut))
        finally:
            for slabs in held:
                loads.pool.give(slabs)


def _submit(prefetch: ThreadPoolExecutor, *args: Any) -> Future:
    """The read on the helper thread; where that is shut down (the worker is stopping), done here."""
    try:
        return prefetch.submit(_read, *args)
    except RuntimeError:
        f: Future = Future()
        try:
            f.set_result(_read(*args))
        except BaseException as e:
            f.set_exception(e)
        return f


def release_held(st: Any, b: Batch | None) -> None:
    """Give back the store's in-place reads of ``b`` not scattered (and released) yet."""
    if b is None or not b.store_reads:
        return
    held = [r for r in b.store_reads if r is not None]
    b.store_reads = [None] * len(b.store_reads)
    if held and st.store is not None:
        st.store.release(held)


def _settled(fut: Future) -> Batch | None:
    """The batch a read produced, once it is over; None if it failed (the load is failing already)."""
    try:
        return fut.result()
    except BaseException:  # (the load is failing already: its first error is the one raised)
        return None


def _read(loads: Any, st: Any, spans: list, slabs: list, part: Any) -> Batch:
    """Read one batch from the store: in place where the store offers it, else into ``slabs``."""
    t = time.perf_counter()
    n = len(spans)
    b = Batch(spans, [loads.codec.chunk_bytes(nb) for _, _, nb, _ in spans], [""] * n, [None] * n,
              store_reads=[None] * n)
    b.views = [memoryview(s.numpy())[:size] for s, size in zip(slabs, b.sizes)]
    b.why, b.source = ["not read"] * n, [""] * n
    try:
        with ExitStack() as stack:
            loads._read_store(st, b, False, False, stack)
    except BaseException:
        release_held(st, b)  # the in-place reads it took before it failed
        raise
    part.store_ms += (time.perf_counter() - t) * 1e3
    return b


def _scatter_all(loads: Any, st: Any, b: Batch, blocks: torch.Tensor, deadline: float,
                 part: Any) -> bool:
    t = time.perf_counter()
    try:
        return all(loads._scatter(st, b, j, blocks, deadline) for j in range(len(b.spans)))
    finally:
        part.scatter_ms += (time.perf_counter() - t) * 1e3
