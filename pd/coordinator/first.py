"""Token 1 handed from the prefill to an early decode (FIRST, AWAIT_FIRST, FIRST_OUTCOME;
docs/design.md "Token 1 handed to the early decode").

An early decode's request leaves the proxy with its prefill's, before token 1 exists. Its
scheduler waits (AWAIT_FIRST) for the token the prefill samples; the prefill's scheduler sends it
(FIRST) as its request finishes; the decode then continues from the prompt plus that token and
its answer starts at token 2. The proxy must know for sure where the decode's answer starts, so
each pd_id's hand-off is **settled once**, here, one message at a time, as either the token
(handed over) or -1 (the decode computes token 1 itself):

- a FIRST while a decode is registered (its AWAIT_FIRST's slice, plus ``REGISTERED_MARGIN_S``, has
  not ended) settles the token; the slice counts from the earliest the decode can have sent the
  call (when the coordinator last found its socket empty), so a coordinator that stalled for
  seconds never registers a decode that has stopped waiting meanwhile (it computes token 1 after
  its wait, a slice and the margin: ``pd.connector.first_wait``), which would then get token 1
  twice;
  a FIRST with no decode registered settles -1 (and answers ``Error``);
- a decode that stops waiting (AWAIT_FIRST ``give_up``) settles -1 unless the token is there;
- the proxy's FIRST_OUTCOME is answered with the settlement; past its timeout unsettled (no
  FIRST came), it settles -1 itself. If no decode asked this coordinator either, the proxy hears
  ``Error`` (unknown) instead of -1: a decode handed the token by a coordinator that restarted
  since (the settlement lost with it) no longer asks, and its answer starts at token 2, which the
  proxy, told -1, would take for token 1 wherever token 2 is the same token (a token dropped).
  Told "unknown", the proxy does not use the early decode.

Every party then reads the same settlement. Everything is bounded in time (settlements ``ttl_s``)
and in count (``MAX_PD_IDS``).
"""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple

from pd.coordinator.protocol import Aborted, Ack, AwaitFirst, Error, First, FirstOutcome, FirstToken, WaitTimeout

logger = logging.getLogger("pd.coordinator")

MAX_PD_IDS = 65536  # settlements, registrations and parked askers kept at once (the oldest dropped first)
MAX_WAIT_S = 3600.0
NONE = -1  # the settlement "the decode computes token 1 itself"
# A decode is registered from its AWAIT_FIRST to the end of that call's slice plus this: a decode
# that stops asking (it gave up, on its own when the coordinator did not answer) is soon not
# registered, and a FIRST then settles -1, as the decode assumed.
REGISTERED_MARGIN_S = 0.5


class _Asker(NamedTuple):
    ident: bytes
    deadline: float
    proxy: bool  # a FIRST_OUTCOME (past its deadline: settles -1), else an AWAIT_FIRST (WaitTimeout)


class FirstTokens:
    """The hand-off's table; ``send(ident, msg)`` answers, ``aborted(pd_id)`` is the abort reason or None."""

    def __init__(self, send: Callable[[bytes, object], None], aborted: Callable[[str], str | None],
                 counters: dict[str, float], ttl_s: float):
        self._send, self._aborted, self.counters, self.ttl_s = send, aborted, counters, ttl_s
        self.settled: dict[str, tuple[int, float]] = {}  # pd_id -> (token or NONE, expires)
        self.registered: dict[str, float] = {}  # pd_id -> expires: a decode asks for its token
        self.askers: dict[str, list[_Asker]] = {}
        for name in ("firsts", "firsts_handed", "first_waits", "first_give_ups", "first_outcomes", "first_unknowns",
                     "first_waits_stale"):
            counters.setdefault(name, 0)

    def _settle(self, pd_id: str, token: int, now: float) -> None:
        _bounded(self.settled)
        self.settled[pd_id] = (token, now + self.ttl_s)
        self.registered.pop(pd_id, None)
        for a in self.askers.pop(pd_id, ()):
            self._send(a.ident, FirstToken(pd_id, token))

    def on_first(self, ident: bytes, msg: First, now: float) -> None:
        self.counters["firsts"] += 1
        why = self._aborted(msg.pd_id)
        if why is not None:
            self._send(ident, Error(f"pd_id={msg.pd_id} was aborted ({why})"[:300]))
            return
        if msg.pd_id not in self.settled:
            waits = self.registered.get(msg.pd_id, 0.0) > now
            self._settle(msg.pd_id, msg.token_id if waits else NONE, now)
        token = self.settled[msg.pd_id][0]
        if token == msg.token_id:
            self.counters["firsts_handed"] += 1
            self._send(ident, Ack())
        else:
            self._send(ident, Error(f"pd_id={msg.pd_id}: token 1 not handed over: "
                                    + ("no decode waits for it" if token == NONE else f"it was {token}")))

    def on_await_first(self, ident: bytes, msg: AwaitFirst, now: float, since: float | None = None) -> None:
        """``since``: the earliest the decode can have sent ``msg`` (its slice is counted from then)."""
        self.counters["first_waits"] += 1
        self._ask(ident, msg.pd_id, now, msg.timeout_s, proxy=False, give_up=msg.give_up,
                  sent=now if since is None else min(since, now))

    def on_outcome(self, ident: bytes, msg: FirstOutcome, now: float) -> None:
        self.counters["first_outcomes"] += 1
        self._ask(ident, msg.pd_id, now, msg.timeout_s, proxy=True)

    def _ask(self, ident: bytes, pd_id: str, now: float, timeout_s: float, proxy: bool, give_up: bool = False,
             sent: float | None = None) -> None:
        why = self._aborted(pd_id)
        sent = now if sent is None else sent
        if pd_id in self.settled:
            self._send(ident, FirstToken(pd_id, self.settled[pd_id][0]))
        elif why is not None:
            self._send(ident, Aborted(pd_id, why))
        elif give_up:
            self.counters["first_give_ups"] += 1
            self._settle(pd_id, NONE, now)
            self._send(ident, FirstToken(pd_id, NONE))
        elif proxy and timeout_s <= 0:
            self._proxy_timed_out(pd_id, now, ident)
        elif not proxy and sent + min(timeout_s, MAX_WAIT_S) + REGISTERED_MARGIN_S <= now:
            # Stale (the coordinator stalled while it waited): the decode may have stopped waiting and
            # computed token 1 itself by now, so it is not registered (a FIRST settles -1); if it
            # still waits, it asks again.
            self.counters["first_waits_stale"] += 1
            self._send(ident, WaitTimeout(pd_id))
        else:
            if not proxy:
                _bounded(self.registered)
                self.registered[pd_id] = sent + min(timeout_s, MAX_WAIT_S) + REGISTERED_MARGIN_S
            if pd_id not in self.askers:
                _bounded(self.askers)
            self.askers.setdefault(pd_id, []).append(_Asker(ident, sent + min(timeout_s, MAX_WAIT_S), proxy))

    def on_abort(self, pd_id: str, reason: str) -> None:
        self.registered.pop(pd_id, None)
        for a in self.askers.pop(pd_id, ()):
            self._send(a.ident, Aborted(pd_id, reason))

    def sweep(self, now: float) -> None:
        for pd_id, askers in list(self.askers.items()):
            due = [a for a in askers if a.deadline <= now]
            if not due:
                continue
            if any(a.proxy for a in due):  # the proxy waited long enough: no FIRST is coming
                self._proxy_timed_out(pd_id, now)
                continue
            for a in due:
                self._send(a.ident, WaitTimeout(pd_id))
            keep = [a for a in askers if a.deadline > now]
            if keep:
                self.askers[pd_id] = keep
            else:
                del self.askers[pd_id]
        for table in (self.settled, self.registered):
            for pd_id in [p for p, v in table.items() if (v[1] if isinstance(v, tuple) else v) <= now]:
                del table[pd_id]

    def _proxy_timed_out(self, pd_id: str, now: float, ident: bytes | None = None) -> None:
        """No FIRST came while the proxy waited (its parked FIRST_OUTCOMEs, and ``ident`` if one
        asked without waiting): settle -1. The proxy hears -1 only if a decode asks (or asked: it
        is still registered) here; else that the hand-off is unknown."""
        askers = self.askers.get(pd_id, [])
        if pd_id in self.registered or any(not a.proxy for a in askers):
            if ident is not None:
                self._send(ident, FirstToken(pd_id, NONE))
        else:
            self.counters["first_unknowns"] += 1
            unknown = Error(f"pd_id={pd_id}: no FIRST came and no decode asked for token 1 here (this "
                            "coordinator may have restarted since): its hand-off is unknown")
            for who in [a.ident for a in self.askers.pop(pd_id, ())] + ([ident] if ident is not None else []):
                self._send(who, unknown)
        self._settle(pd_id, NONE, now)

    def gauges(self) -> int:
        """Parked AWAIT_FIRSTs and FIRST_OUTCOMEs (for the ``waiters`` gauge)."""
        return sum(len(a) for a in self.askers.values())


def _bounded(table: dict) -> None:
    """Make room for one more pd_id: the oldest goes (only past MAX_PD_IDS hand-offs at once)."""
    while len(table) >= MAX_PD_IDS:
        table.pop(next(iter(table)))


__all__ = ["FirstTokens", "NONE"]
