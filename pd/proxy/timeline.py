"""The proxy's events of each P/D request, and the whole timeline it serves at ``/pd/transfers/{pd_id}``.

The relay marks when a request came in, when its prefill and decode halves went out, when the
prefill answered, when the decode's first bytes came back and when its answer ended, on this
process's wall clock. They are kept per pd_id in an LRU of the most recent ``max_requests``
requests, so memory stays bounded however long the proxy runs. ``view`` merges them with the
coordinator's record (its events and spans, ``pd.coordinator.timeline``) and adds the proxy's
spans and the two spans that cross from one process's clock to another's (docs/design.md,
"The timeline").
"""
from __future__ import annotations

from collections import OrderedDict

import msgspec

from pd.coordinator.protocol import Event, TransferRecord
from pd.coordinator.timeline import wall_ms

MAX_REQUESTS = 4096
PROXY = "proxy"
# Span -> (from, to) events, all on the proxy's clock: dispatch + decode_first_token + stream = total.
# On the first-token path, first_token + gap_1_2 = received to token 2 (token_2: the client's first
# chunk from the decode; its first bytes, decode_first_byte, are token 1's for an early decode).
PROXY_SPANS = {
    "first_token": ("received", "first_token"),
    "gap_1_2": ("first_token", "token_2"),
    # The early decode handed token 1: the coordinator took the FIRST (prefill_answered to first_handed).
    "hand_off": ("prefill_answered", "first_handed"),
    "dispatch": ("received", "decode_sent"),
    "prefill": ("prefill_sent", "prefill_answered"),
    "decode_first_token": ("decode_sent", "decode_first_byte"),
    "stream": ("decode_first_byte", "last_token"),
    "total": ("received", "last_token"),
}


class ProxyTimeline:
    """pd_id -> {event name: wall ms}, for the ``max_requests`` most recent requests."""

    def __init__(self, max_requests: int = MAX_REQUESTS):
        self.max_requests = max_requests
        self._events: OrderedDict[str, dict[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._events)

    def start(self, pd_id: str, received_ms: float) -> None:
        """A new request (``received_ms``: when it came in); the oldest one is forgotten past the bound."""
        self._events[pd_id] = {"received": received_ms}
        while len(self._events) > self.max_requests:
            self._events.popitem(last=False)

    def mark(self, pd_id: str | None, name: str) -> None:
        """``name`` happened now (only its first time counts: a retried send keeps the first)."""
        events = self._events.get(pd_id) if pd_id is not None else None
        if events is not None and name not in events:
            events[name] = wall_ms()

    def events(self, pd_id: str) -> dict[str, float]:
        return dict(self._events.get(pd_id, {}))

    def view(self, record: TransferRecord) -> dict:
        """The record as JSON, its ``timeline`` with the proxy's events (ordered by time; ``rel_ms``:
        ms since the first one), its ``spans`` with the proxy's, and ``cross_spans``."""
        mine = self.events(record.pd_id)
        events = [Event(name, t, PROXY) for name, t in mine.items()] + list(record.timeline)
        events.sort(key=lambda e: e.t_ms)
        out = msgspec.to_builtins(record)
        out["timeline"] = msgspec.to_builtins(events)
        for e in out["timeline"]:  # readable offsets beside the clocks' own times
            e["rel_ms"] = round(e["t_ms"] - events[0].t_ms, 3)
        out["spans"] = {**record.spans, **proxy_spans(mine)}
        out["cross_spans"] = cross_spans(mine, record)
        return out


def proxy_spans(events: dict[str, float]) -> dict[str, float]:
    """The spans whose two ends the proxy saw."""
    return {name: round(events[b] - events[a], 3) for name, (a, b) in PROXY_SPANS.items()
            if a in events and b in events}


def cross_spans(events: dict[str, float], record: TransferRecord) -> dict[str, float]:
    """Spans from a proxy event to a coordinator event or back: right only as far as the two
    hosts' clocks agree. decode_sent_to_wait: the decode instance's admission of the request (its
    first WAIT; a synchronous load has none); decode_sent_to_loaded: to the end of its last load
    part (admission, any wait for READY, the load; the decode worker's clock);
    done_to_first_token: from the load's DONE to the first token (decode's engine step)."""
    coord = {}
    for e in record.timeline:
        if e.source == "coordinator" and e.name in ("wait_first", "done"):
            coord[e.name] = max(coord.get(e.name, 0.0), e.t_ms)  # done: the last group's
        elif e.name == "part_loaded":
            coord["loaded"] = max(coord.get("loaded", 0.0), e.t_ms)
    out = {}
    if "decode_sent" in events and "wait_first" in coord:
        out["decode_sent_to_wait"] = round(coord["wait_first"] - events["decode_sent"], 3)
    if "decode_sent" in events and "loaded" in coord:
        out["decode_sent_to_loaded"] = round(coord["loaded"] - events["decode_sent"], 3)
    if "done" in coord and "decode_first_byte" in events:
        out["done_to_first_token"] = round(events["decode_first_byte"] - coord["done"], 3)
    return out
