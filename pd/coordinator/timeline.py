"""A transfer's timeline at the coordinator: events where they happened, spans from one clock each.

The coordinator timestamps what it receives (each READY part, the final READY, the first WAIT,
DONE, ABORT) and keeps the events the workers put in READY (the prefill's gather/put per part)
and DONE (the decode's get/store/scatter per part) in the transfer's record; at its last DONE the
record gets its spans (named durations in ms). The proxy adds its own events and spans when it
serves the record (``pd.proxy.timeline``). ``summarize`` gives p50/p99 of each span over many
records (``pd stats``, the benchmarks). Which clock each span uses: docs/design.md, "The timeline".
"""
from __future__ import annotations

import math
import time
from typing import Iterable

from pd.coordinator.protocol import Done, Event, Ready, SpanSummary, TransferRecord

MAX_EVENTS = 64  # per record; further non-final READY parts are only counted (events_dropped)
SUMMARY_RECORDS = 1000  # pd stats: spans of at most this many of the most recent finished transfers
COORDINATOR = "coordinator"
READY_EVENTS = ("ready", "ready_final")

# Durations the workers report, summed over a transfer's parts (and head groups) into spans.
PREFILL_SUMS = ("gather", "put")
DECODE_SUMS = ("get", "store", "scatter")


def wall_ms() -> float:
    """This process's wall clock in ms: the time base of every event (spans never mix two processes')."""
    return time.time() * 1e3


def add(rec: TransferRecord, event: Event, keep: bool = False) -> None:
    """Append ``event``; past MAX_EVENTS only ``keep`` ones (final READY, DONE, ...) are listed."""
    if len(rec.timeline) >= MAX_EVENTS and not keep:
        rec.events_dropped += 1
        return
    rec.timeline.append(event)


def _sum(rec: TransferRecord, name: str, ms: float) -> None:
    rec.spans[name] = round(rec.spans.get(name, 0.0) + ms, 3)


def on_ready(rec: TransferRecord, msg: Ready, at_ms: float) -> None:
    """A READY part: the prefill's part (its clock, when it carries timings) and its arrival here."""
    keep = msg.final or rec.n_ready_parts <= 1  # the first and the final ones make the spans
    if msg.sent_ms:
        add(rec, Event("part_saved", msg.sent_ms, f"prefill {msg.rank}", chunks=msg.part_chunks,
                       gather_ms=msg.gather_ms, put_ms=msg.put_ms), keep)
    add(rec, Event(READY_EVENTS[msg.final], at_ms, COORDINATOR, chunks=msg.chunks_ready), keep)
    _sum(rec, "gather", msg.gather_ms)
    _sum(rec, "put", msg.put_ms)


def on_first_wait(rec: TransferRecord, at_ms: float) -> None:
    """Decode's first WAIT for this transfer (its load began): once per record."""
    if not any(e.name == "wait_first" for e in rec.timeline):
        add(rec, Event("wait_first", at_ms, COORDINATOR), keep=True)


def on_done(rec: TransferRecord, msg: Done, at_ms: float) -> None:
    """One group's DONE (after ``_add_done``): the decode's parts, its arrival, and the spans once done."""
    source = f"decode {msg.rank}"
    for p in msg.parts:
        add(rec, Event("part_loaded", p.at_ms, source, chunks=p.chunks, get_ms=p.get_ms, store_ms=p.store_ms,
                       scatter_ms=p.scatter_ms, store_chunks=p.store_chunks))
    add(rec, Event("done", at_ms, COORDINATOR, chunks=msg.n_chunks), keep=True)
    _sum(rec, "get", msg.get_ms)
    _sum(rec, "store", msg.store_ms)
    _sum(rec, "scatter", msg.scatter_ms)
    if rec.done:
        finish(rec)


def _times(rec: TransferRecord, *names: str) -> list[float]:
    return [e.t_ms for e in rec.timeline if e.source == COORDINATOR and e.name in names]


def finish(rec: TransferRecord) -> None:
    """The coordinator's spans of a finished transfer (its clock; the workers' sums from theirs):
    ready_first_to_final + tail = transfer (first READY part -> last DONE)."""
    ready, final, done = _times(rec, *READY_EVENTS), _times(rec, "ready_final"), _times(rec, "done")
    if ready and final and done:
        # (a load within the decode's step may read the published chunks before the final READY
        # comes: its DONE is then earlier, and the tail 0; called again when that READY comes)
        end = max(max(done), max(final))
        rec.spans["ready_first_to_final"] = round(max(final) - min(ready), 3)
        rec.spans["tail"] = round(end - max(final), 3)
        rec.spans["transfer"] = round(end - min(ready), 3)
    rec.spans["load"] = round(rec.load_ms, 3)
    rec.spans["wait_for_ready"] = rec.wait_ms


def summarize(spans: Iterable[dict[str, float]]) -> dict[str, SpanSummary]:
    """p50 and p99 of each span over ``spans`` (one dict per transfer), in name order."""
    values: dict[str, list[float]] = {}
    for one in spans:
        for name, ms in one.items():
            values.setdefault(name, []).append(ms)
    return {name: SpanSummary(len(xs), percentile(xs, 50), percentile(xs, 99))
            for name, xs in sorted(values.items())}


def percentile(xs: list[float], q: float) -> float:
    """The ``q``-th percentile, linear between the closest ranks (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return round(s[lo] + (s[hi] - s[lo]) * (pos - lo), 3)


def recent_spans(records: Iterable[TransferRecord]) -> list[dict[str, float]]:
    """The spans of the most recent finished transfers (``records`` newest first), at most SUMMARY_RECORDS."""
    out = []
    for rec in records:
        if rec.done and rec.spans:
            out.append(rec.spans)
            if len(out) >= SUMMARY_RECORDS:
                break
    return out
