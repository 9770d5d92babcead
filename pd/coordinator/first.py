"""Token 1 handed from the proxy to an early decode (FIRST, AWAIT_FIRST; docs/design.md "token 1
handed to the early decode").

An early decode's request leaves the proxy with its prefill's, before token 1 exists. When the
proxy asks for the hand-off, the decode's scheduler waits (AWAIT_FIRST) for the token the prefill
sampled; the proxy sends it (FIRST) once the prefill has answered. The decode then continues
from the prompt plus that token, and its answer starts at token 2: the proxy must know for sure
which of the two answers (from token 1 or from token 2) the decode gives. The coordinator is
where that is settled, one message at a time: a FIRST is acknowledged only while the decode
still waits or has not asked yet, and a decode that gives up (AWAIT_FIRST with ``give_up``)
either gets the token already there or makes every later FIRST an ``Error``.

Everything is bounded in time (``ttl_s``) and in count (``MAX_PD_IDS``).
"""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple

from pd.coordinator.protocol import Aborted, Ack, AwaitFirst, Error, First, FirstToken, WaitTimeout

logger = logging.getLogger("pd.coordinator")

MAX_PD_IDS = 65536  # tokens, waiters and give-ups kept at once (the oldest dropped first)
MAX_WAIT_S = 3600.0


class _Waiter(NamedTuple):
    ident: bytes
    deadline: float


class FirstTokens:
    """The hand-off's table; ``send(ident, msg)`` answers, ``aborted(pd_id)`` is the abort reason or None."""

    def __init__(self, send: Callable[[bytes, object], None], aborted: Callable[[str], str | None],
                 counters: dict[str, float], ttl_s: float):
        self._send, self._aborted, self.counters, self.ttl_s = send, aborted, counters, ttl_s
        self.tokens: dict[str, tuple[int, float]] = {}  # pd_id -> (token id, expires)
        self.given_up: dict[str, float] = {}  # pd_id -> expires
        self.waiters: dict[str, list[_Waiter]] = {}
        for name in ("firsts", "firsts_refused", "first_waits", "first_give_ups"):
            counters.setdefault(name, 0)

    def on_first(self, ident: bytes, msg: First, now: float) -> None:
        self.counters["firsts"] += 1
        why = self._aborted(msg.pd_id)
        if why is not None:
            why = f"pd_id={msg.pd_id} was aborted ({why})"
        elif msg.pd_id in self.given_up:
            why = f"pd_id={msg.pd_id}: the decode no longer waits for token 1 (it computes it itself)"
        elif msg.pd_id in self.tokens and self.tokens[msg.pd_id][0] != msg.token_id:
            why = f"pd_id={msg.pd_id}: token 1 was handed over already as {self.tokens[msg.pd_id][0]}"
        if why is not None:
            self.counters["firsts_refused"] += 1
            self._send(ident, Error(why[:300]))
            return
        self._bounded(self.tokens)
        self.tokens[msg.pd_id] = (msg.token_id, now + self.ttl_s)
        self._send(ident, Ack())
        for w in self.waiters.pop(msg.pd_id, ()):
            self._send(w.ident, FirstToken(msg.pd_id, msg.token_id))

    def on_await_first(self, ident: bytes, msg: AwaitFirst, now: float) -> None:
        self.counters["first_waits"] += 1
        token = self.tokens.get(msg.pd_id)
        why = self._aborted(msg.pd_id)
        if token is not None:
            self._send(ident, FirstToken(msg.pd_id, token[0]))
        elif why is not None:
            self._send(ident, Aborted(msg.pd_id, why))
        elif msg.pd_id in self.given_up:
            self._send(ident, WaitTimeout(msg.pd_id))
        elif msg.give_up:
            self.counters["first_give_ups"] += 1
            self._bounded(self.given_up)
            self.given_up[msg.pd_id] = now + self.ttl_s
            self._send(ident, WaitTimeout(msg.pd_id))
            for w in self.waiters.pop(msg.pd_id, ()):
                self._send(w.ident, WaitTimeout(msg.pd_id))
        else:
            if msg.pd_id not in self.waiters:
                self._bounded(self.waiters)
            deadline = now + min(msg.timeout_s, MAX_WAIT_S)
            self.waiters.setdefault(msg.pd_id, []).append(_Waiter(ident, deadline))

    def on_abort(self, pd_id: str, reason: str) -> None:
        for w in self.waiters.pop(pd_id, ()):
            self._send(w.ident, Aborted(pd_id, reason))

    def sweep(self, now: float) -> None:
        for pd_id, waiters in list(self.waiters.items()):
            keep = [w for w in waiters if w.deadline > now]
            for w in waiters:
                if w.deadline <= now:
                    self._send(w.ident, WaitTimeout(pd_id))
            if keep:
                self.waiters[pd_id] = keep
            else:
                del self.waiters[pd_id]
        for table in (self.tokens, self.given_up):
            for pd_id in [p for p, v in table.items() if (v[1] if isinstance(v, tuple) else v) <= now]:
                del table[pd_id]

    def gauges(self) -> int:
        """Parked AAWAIT_FIRSTs (for the ``waiters`` gauge)."""
        return sum(len(w) for w in self.waiters.values())

    @staticmethod
    def _bounded(table: dict) -> None:
        """Make room for one more pd_id: the oldest goes (a waiter dropped so is answered at no
        deadline: its decode asks again, or gives up after its own)."""
        while len(table) >= MAX_PD_IDS:
            table.pop(next(iter(table)))


__all__ = ["FirstTokens"]
