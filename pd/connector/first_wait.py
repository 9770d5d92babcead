"""Token 1 between the schedulers (``pd.coordinator.first``): the decode's wait and the prefill's send.

vLLM's scheduler asks the connector about a waiting request once per engine step and must never
block. **FirstWaiter** (decode): an early decode flagged ``kv_transfer_params.handoff`` is looked
up until its hand-off is settled; ``poll`` registers it the first time and answers ``PENDING``
until the coordinator settled it. One thread with one socket asks for every waiting pd_id at
once (AWAIT_FIRST in slices of ``poll_s``, each answered with the pd_id it is about, so replies
need no order; a call that got no answer is asked again after ``poll_s`` + 1 s, so a restarted
coordinator or a refused call costs a slice, never a busy loop). Past ``deadline_s`` it gives up
through the coordinator, which settles -1 unless the token is already there (then it must be
used). A coordinator that answers no give-up within ``give_up_s`` leaves the decode computing
token 1 (logged): by then any registration it made has lapsed at the coordinator, which settles
-1 for a FIRST that comes later (a coordinator that stalled counts each AWAIT_FIRST's slice from
the earliest it can have been sent, so a stale one registers nothing).

**FirstSender** (prefill): FIRST for each finished request that carried the flag, from a thread
(the scheduler never waits for the coordinator).
"""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass

import zmq

from pd.coordinator.client import WAIT_MARGIN_S, _dealer
from pd.coordinator.first import REGISTERED_MARGIN_S
from pd.coordinator.protocol import Aborted, AwaitFirst, FirstToken, ProtocolError, WaitTimeout, decode_reply, encode

logger = logging.getLogger("pd.connector")

PENDING = object()  # poll's answer while the hand-off is not settled
RECOMPUTE = -1  # settled: the decode computes token 1 itself
SEND_RETRY_S = 0.05  # a call that could not leave (no connection yet) is tried again this soon


@dataclass
class _Wait:
    deadline: float  # then give up
    resend_at: float = 0.0  # ask (again) from then on
    give_ups: int = 0  # give-ups sent


class FirstWaiter:
    """The decode scheduler's waits for token 1; ``keys``: CurveZMQ ``ClientKeys`` or None."""

    def __init__(self, address: str, deadline_s: float, keys=None, poll_s: float = 2.0, clock=time.monotonic):
        self.address, self.keys, self.deadline_s, self.poll_s, self.clock = address, keys, deadline_s, poll_s, clock
        # Past the deadline, how long give-ups are tried before the waiter settles on its own: longer
        # than a slice plus the coordinator's REGISTERED_MARGIN_S (pd.coordinator.first).
        self.give_up_s = poll_s + REGISTERED_MARGIN_S + 1.0
        self._lock = threading.Lock()
        self._results: dict[str, object] = {}  # pd_id -> PENDING or the settled token
        self._waits: dict[str, _Wait] = {}  # pd_ids the thread asks about
        self._closed = False
        self._wake_rx, self._wake_tx = socket.socketpair()
        self._wake_tx.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="pd-first-wait", daemon=True)
        self._thread.start()

    def poll(self, pd_id: str, give_up: bool = False) -> object:
        """The token for ``pd_id`` (``RECOMPUTE``: none), or ``PENDING``; the first call registers the
        wait (``give_up``: gives it up at once: the decode cannot wait for the token)."""
        with self._lock:
            r = self._results.get(pd_id)
            if r is not None:
                return r
            if self._closed or not self._thread.is_alive():  # nobody to ask: never registered, so consistent
                return RECOMPUTE
            self._results[pd_id] = PENDING
            self._waits[pd_id] = _Wait(self.clock() + (0.0 if give_up else self.deadline_s))
        self._wake()
        return PENDING

    def forget(self, pd_id: str) -> None:
        with self._lock:
            self._results.pop(pd_id, None)
            self._waits.pop(pd_id, None)

    def close(self) -> None:
        self._closed = True
        self._wake()
        self._thread.join(5)

    def _wake(self) -> None:
        try:
            self._wake_tx.send(b"w")
        except OSError:  # full (the thread has wake-ups to read already) or closed
            pass

    def _settle(self, pd_id: str, token: int) -> None:
        with self._lock:
            if self._waits.pop(pd_id, None) is not None:
                self._results[pd_id] = token

    def _run(self) -> None:
        sock = None
        try:
            # IMMEDIATE: nothing is queued for a coordinator that is not connected (a restarted
            # one must not get a backlog of stale AWAIT_FIRSTs that would register the decode again).
            sock = _dealer(zmq.Context.instance(), self.address, keys=self.keys, immediate=True)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(self._wake_rx, zmq.POLLIN)
            while not self._closed:
                try:
                    self._send_due(sock)
                    for s, _ in poller.poll(200):
                        if s is sock:
                            self._on_reply(sock.recv_multipart())
                        else:
                            self._wake_rx.recv(4096)
                except (zmq.ZMQError, OSError) as e:  # the loop goes on: requests must not wait for ever
                    logger.warning("token 1's waits: %s", e)
                    time.sleep(0.1)
        except Exception as e:
            logger.error("token 1's waits stopped (%r): waiting requests compute token 1 themselves", e)
        finally:
            if sock is not None:
                sock.close(0)
            self._wake_rx.close()
            self._wake_tx.close()
            for pd_id in list(self._waits):  # closed while waiting: the decode computes token 1
                self._settle(pd_id, RECOMPUTE)

    def _send_due(self, sock) -> None:
        now = self.clock()
        with self._lock:
            due = [(p, w) for p, w in self._waits.items() if w.resend_at <= now]
        for pd_id, w in due:
            left = w.deadline - now
            if left <= -self.give_up_s:
                # No give-up answered: every registration this waiter made has lapsed at the coordinator
                # (a slice and REGISTERED_MARGIN_S after it was sent), so a FIRST now settles -1 there too.
                logger.warning("pd_id=%s: the coordinator answered no give-up of token 1's wait (%d sent); the "
                               "decode computes token 1 itself", pd_id, w.give_ups)
                self._settle(pd_id, RECOMPUTE)
                continue
            slice_s = 0.0 if left <= 0 else min(left, self.poll_s)
            w.resend_at = now + slice_s + WAIT_MARGIN_S
            try:
                sock.send_multipart(encode(AwaitFirst(pd_id, slice_s, give_up=left <= 0)), zmq.NOBLOCK)
            except zmq.ZMQError as e:  # not connected (yet), or the queue full: tried again shortly
                logger.debug("pd_id=%s: AWAIT_FIRST not sent: %s", pd_id, e)
                w.resend_at = now + SEND_RETRY_S
                continue
            w.give_ups += left <= 0  # only give-ups that left count

    def _on_reply(self, frames) -> None:
        try:
            reply = decode_reply(frames)
        except ProtocolError as e:
            logger.warning("coordinator %s: unreadable reply to AWAIT_FIRST: %s", self.address, e)
            return
        if isinstance(reply, FirstToken):
            self._settle(reply.pd_id, reply.token_id)
        elif isinstance(reply, Aborted):
            self._settle(reply.pd_id, RECOMPUTE)
        elif isinstance(reply, WaitTimeout):  # the slice ended unsettled: ask again now
            with self._lock:
                w = self._waits.get(reply.pd_id)
                if w is not None:
                    w.resend_at = 0.0
        else:  # an Error (refused: rate, identity, an older coordinator): asked again at resend_at
            logger.debug("coordinator %s: AWAIT_FIRST answered %r", self.address, reply)


class FirstSender:
    """The prefill scheduler's FIRSTs, sent from a thread; ``client``: a ``CoordinatorClient``. One
    older than ``stale_s`` is dropped (the proxy settles -1 once it waited a second for it: a backlog
    after an outage would only be refused), and each call waits ``timeout_s`` at most."""

    def __init__(self, client, stale_s: float = 1.0, timeout_s: float = 1.0, clock=time.monotonic):
        self.client, self.stale_s, self.timeout_s, self.clock = client, stale_s, timeout_s, clock
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pd-first-send", daemon=True)
        self._thread.start()

    def send(self, pd_id: str, token: int) -> None:
        self._q.put((pd_id, token, self.clock()))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            pd_id, token, at = item
            if self.clock() - at > self.stale_s:
                logger.info("pd_id=%s: token 1 not sent (%.1f s old: its hand-off is settled without it)",
                            pd_id, self.clock() - at)
                continue
            handed = self.client.first(pd_id, token, self.timeout_s)
            logger.debug("pd_id=%s: token 1 (%d) %s", pd_id, token, "handed over" if handed else "not handed over")
