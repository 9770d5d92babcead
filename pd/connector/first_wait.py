"""The decode scheduler's wait for token 1 (``pd.coordinator.first``): threads that ask the coordinator.

vLLM's scheduler asks the connector about a waiting request once per engine step and must never
block. An early decode that the proxy offers token 1 to (``kv_transfer_params.handoff``) is
looked up until its token is settled: ``poll`` starts the wait on a worker thread the first time
and answers ``PENDING`` until the coordinator answered. A thread asks in slices of ``poll_s``
(a coordinator that restarted or lost the call is asked again) until ``deadline_s``, then gives
up through the coordinator (``give_up``), which either still hands over a token that came or
makes the proxy's later FIRST an error, so that the proxy and the decode never disagree about
where the decode's answer starts. A coordinator that never answers leaves the decode computing
token 1 itself (logged; the proxy, which gets no answer either, then does not use this decode).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from pd.coordinator.protocol import Aborted, FirstToken

logger = logging.getLogger("pd.connector")

PENDING = object()  # poll's answer while the token is not settled
RECOMPUTE = -1  # settled: the decode computes token 1 itself
GIVE_UP_TRIES = 3


class FirstWaiter:
    """``client``: a ``pd.coordinator.client.CoordinatorClient`` (thread-safe)."""

    def __init__(self, client, deadline_s: float, poll_s: float = 2.0, threads: int = 32, clock=time.monotonic):
        self.client, self.deadline_s, self.poll_s, self.clock = client, deadline_s, poll_s, clock
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pd-first")
        self._lock = threading.Lock()
        self._results: dict[str, object] = {}  # pd_id -> PENDING or the settled token id
        self._dropped: set[str] = set()  # forgotten while pending: the thread stops at its next answer

    def poll(self, pd_id: str, give_up: bool = False) -> object:
        """The token for ``pd_id`` (``RECOMPUTE``: none), or ``PENDING``; the first call starts the
        wait (``give_up``: at once: the decode cannot wait for it)."""
        with self._lock:
            r = self._results.get(pd_id)
            if r is None:
                self._results[pd_id] = PENDING
                self._dropped.discard(pd_id)
                self._pool.submit(self._wait, pd_id, 0.0 if give_up else self.deadline_s)
                return PENDING
            return r

    def forget(self, pd_id: str) -> None:
        with self._lock:
            if self._results.pop(pd_id, None) is PENDING:
                self._dropped.add(pd_id)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _settle(self, pd_id: str, token: int) -> None:
        with self._lock:
            if pd_id in self._dropped:
                self._dropped.discard(pd_id)
            elif self._results.get(pd_id) is PENDING:
                self._results[pd_id] = token

    def _wait(self, pd_id: str, deadline_s: float) -> None:
        try:
            self._settle(pd_id, self._ask(pd_id, deadline_s))
        except Exception as e:  # never leave a request pending for ever
            logger.warning("pd_id=%s: waiting for token 1 failed (%r); the decode computes it", pd_id, e)
            self._settle(pd_id, RECOMPUTE)

    def _ask(self, pd_id: str, deadline_s: float) -> int:
        end = self.clock() + deadline_s
        while True:
            with self._lock:
                if pd_id in self._dropped:
                    return RECOMPUTE
            left = end - self.clock()
            if left <= 0:
                break
            reply = self.client.await_first(pd_id, min(left, self.poll_s))
            if isinstance(reply, FirstToken):
                return reply.token_id
            if isinstance(reply, Aborted):
                return RECOMPUTE
        for _ in range(GIVE_UP_TRIES):
            reply = self.client.await_first(pd_id, 0.0, give_up=True)
            if isinstance(reply, FirstToken):
                return reply.token_id
            if reply is not None:  # WaitTimeout (given up) or Aborted
                return RECOMPUTE
        logger.warning("pd_id=%s: the coordinator did not answer the give-up of token 1's wait; the decode "
                       "computes token 1 itself", pd_id)
        return RECOMPUTE
