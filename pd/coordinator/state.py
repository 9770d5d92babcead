"""The coordinator's state and what each message does to it; no socket (the loop is in ``server``).

Small and in memory: READY entries (expire after ``entry_ttl_s``; their chunks are then freed
through the producer's agent), parked waiters (answered at READY or at their deadline), aborted
pd_ids (so a late READY is freed at once), instances with their last heartbeat, counters, and a
bounded record of recent transfers. See docs/design.md.
"""
from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, NamedTuple

from pd.config import CoordinatorConfig
from pd.coordinator import timeline
from pd.coordinator.first import FirstTokens
from pd.coordinator.identity import Identity, Peer
from pd.coordinator.protocol import (
    Abort,
    Aborted,
    Ack,
    Done,
    Error,
    Event,
    First,
    FirstOutcome,
    Free,
    Heartbeat,
    InstanceInfo,
    Query,
    QueryReply,
    Ready,
    Register,
    TransferRecord,
    Wait,
    AwaitFirst,
    WaitTimeout,
)

logger = logging.getLogger("pd.coordinator")

COUNTERS = ("registered", "heartbeats", "ready", "waits", "wait_hits_immediate", "wait_timeouts", "done_ok",
            "done_failed", "aborts", "expired", "freed_keys", "malformed", "internal_errors", "chunks_loaded",
            "bytes_loaded", "load_ms_sum", "instances_alive", "store_chunks_loaded", "auth_rejected",
            "handshake_failed", "ready_conflicts", "identity_refused", "rate_limited", "instances_refused",
            "stats_dropped", "entries", "waiters")  # the last two: gauges, set at each query
MAX_RECORDS = 10000          # transfer records kept (oldest dropped first)
RECORD_TTL_S = 3600.0        # ... and for at most this long
DEAD_INSTANCE_TTL_S = 3600.0  # an instance down this long is forgotten
MAX_WAIT_S = 3600.0          # a WAIT never parks longer than this
MAX_INSTANCE_STATS = 256     # counters kept per instance (from its heartbeats)
MAX_STAT_NAMES = 512         # distinct counter names over all instances: the /metrics series per role
MAX_INSTANCES = 4096         # instance ids known at once (a new one beyond: an Error)
_STAT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
LOG_EVERY_S = 60.0           # repeated warnings of one kind are logged at most this often

Key = tuple[str, int]
Send = Callable[[bytes, object], None]


class ThrottledLog:
    """``log(kind, level, text)``: logs ``text``; further ones of ``kind`` at most every LOG_EVERY_S
    (with a count), so a peer that keeps sending garbage cannot flood the log."""

    def __init__(self) -> None:
        self._state: dict[str, list[float]] = {}  # kind -> [last logged, suppressed since]

    def __call__(self, kind: str, level: int, text: str, exc_info: bool = False) -> None:
        now = time.monotonic()
        state = self._state.get(kind)
        if state is not None and now - state[0] < LOG_EVERY_S:
            state[1] += 1
            return
        more = f" ({int(state[1])} more of this kind since the last report)" if state and state[1] else ""
        self._state[kind] = [now, 0]
        logger.log(level, "%s%s", text, more, exc_info=exc_info)


class _Waiter(NamedTuple):
    ident: bytes
    deadline: float
    have: int = 0  # chunks the waiter has loaded: answer it when more (or the final READY) are out


def _answers(ready: Ready, have: int) -> bool:
    return ready.final or ready.chunks_ready > have


def _merge(old: Ready, new: Ready) -> Ready:
    """A streamed READY added to the ones before it: every key so far, the newest counts."""
    seen = set(old.keys)
    keys = list(old.keys) + [k for k in new.keys if k not in seen]
    return Ready(new.pd_id, new.rank, keys, new.n_tokens, old.n_bytes + new.n_bytes, new.location,
                 new.instance_id, max(old.chunks_ready, new.chunks_ready), new.final)


def _add_done(rec: TransferRecord, msg: Done) -> None:
    """One KV-head group's DONE into the record (done when every group's is in)."""
    first = rec.groups_done == 0
    rec.groups_done += 1
    rec.done = rec.groups_done >= msg.groups
    rec.ok = msg.ok if first else rec.ok and msg.ok
    rec.n_chunks = msg.n_chunks if first else min(rec.n_chunks, msg.n_chunks)
    rec.n_bytes = msg.n_bytes + (0 if first else rec.n_bytes)
    rec.n_store_chunks = msg.n_store_chunks + (0 if first else rec.n_store_chunks)
    rec.load_ms = msg.load_ms if first else max(rec.load_ms, msg.load_ms)
    rec.error = rec.error if not first and rec.error else msg.error
    rec.consumer = msg.instance_id
    rec.sync_load = msg.sync if first else rec.sync_load and msg.sync


@dataclass
class _Instance:
    role: str
    url: str
    pid: int
    ident: bytes
    seen: float
    alive: bool = True
    stats: dict | None = None  # its counters, from its latest heartbeat


class State:
    """The coordinator's tables. ``handle`` applies one decoded message (answers go out through
    ``send(ident, msg)``), ``sweep`` expires what is due; both take the current monotonic time."""

    def __init__(self, cfg: CoordinatorConfig, send: Send, log: ThrottledLog):
        self.cfg = cfg
        self._send = send
        self._log = log
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.entries: dict[Key, tuple[Ready, float]] = {}  # -> (ready, expires)
        self.waiters: dict[Key, list[_Waiter]] = {}
        self.aborted: dict[str, tuple[float, str]] = {}  # pd_id -> (until, reason)
        self.abandoned: dict[Key, float] = {}  # failed DONE before READY: a late READY is freed at once
        # ok DONE: a READY still to come (a synchronous load read the published chunks before the
        # final READY arrived) is freed at once and adds no entry
        self.consumed: dict[Key, float] = {}
        self.wait_since: dict[str, float] = {}  # pd_id -> first unanswered WAIT (for wait_ms)
        self.final_at: dict[str, float] = {}  # pd_id -> its (latest) final READY (for tail_ms)
        self.instances: dict[str, _Instance] = {}
        self.records: OrderedDict[str, tuple[TransferRecord, float]] = OrderedDict()
        self.identity = Identity(cfg.instance_ttl_s)  # under CurveZMQ: who may say what (pd.coordinator.identity)
        self._stat_names: set[str] = set()
        # Token 1 handed from the prefill to early decodes (pd.coordinator.first).
        self.first = FirstTokens(send, lambda p: self.aborted[p][1] if p in self.aborted else None, self.counters,
                                 cfg.entry_ttl_s)

    def handle(self, ident: bytes, msg, now: float, peer: Peer | None = None, since: float | None = None) -> None:
        """Apply ``msg``; ``peer``: the CurveZMQ key that sent it (None without auth); ``since``: the
        earliest it can have been sent (the socket was empty then; None: ``now``)."""
        if peer is not None:
            refused = self.identity.check(peer, msg, now)
            if refused is not None:
                self._refuse(ident, msg, *refused)
                return
        if isinstance(msg, (Register, Heartbeat)) and msg.instance_id not in self.instances \
                and len(self.instances) >= MAX_INSTANCES:
            self.counters["instances_refused"] += 1
            self._log("instances-full", logging.WARNING, f"instance {msg.instance_id!r} refused: {MAX_INSTANCES} are "
                      "known already")
            self._send(ident, Error(f"the coordinator knows {MAX_INSTANCES} instances already (the most it keeps)"))
            return
        if isinstance(msg, Register):
            self._on_register(ident, msg, now)
        elif isinstance(msg, Heartbeat):
            self._on_heartbeat(ident, msg, now)
        elif isinstance(msg, Ready):
            self._on_ready(ident, msg, now)
        elif isinstance(msg, Wait):
            self._on_wait(ident, msg, now)
        elif isinstance(msg, Done):
            self._on_done(ident, msg, now)
        elif isinstance(msg, Abort):
            self._on_abort(ident, msg, now)
        elif isinstance(msg, Query):
            self._send(ident, self.query(msg.pd_id, now, msg.spans))
        elif isinstance(msg, First):
            self.first.on_first(ident, msg, now)
        elif isinstance(msg, AwaitFirst):
            self.first.on_await_first(ident, msg, now, since)
        elif isinstance(msg, FirstOutcome):
            self.first.on_outcome(ident, msg, now)
        else:  # decode_client only yields the types above
            raise TypeError(f"no handler for {type(msg).__name__}")

    def _refuse(self, ident: bytes, msg, kind: str, why: str) -> None:
        """A message its key may not send (``Identity.check``): an Error, counted, logged once a minute."""
        self.counters["rate_limited" if kind == "rate" else "identity_refused"] += 1
        self._log(f"refused-{kind}", logging.WARNING, f"refused a {type(msg).__name__}: {why}")
        if kind == "pd":  # a READY of the sender's own instance for a pd_id another key publishes
            self.counters["ready_conflicts"] += 1
            self._free(msg, "another key published this pd_id first")
        self._send(ident, Error(why[:300]))

    def _stats(self, stats: dict[str, float]) -> dict[str, float]:
        """An instance's counters as exported (summed per role): plain names only, and at most
        MAX_STAT_NAMES distinct names over all instances, so /metrics stays small whatever peers send."""
        out = {}
        self.counters["stats_dropped"] += max(0, len(stats) - MAX_INSTANCE_STATS)
        for k, v in list(stats.items())[:MAX_INSTANCE_STATS]:
            if k not in self._stat_names and (len(self._stat_names) >= MAX_STAT_NAMES or not _STAT_NAME.fullmatch(k)):
                self.counters["stats_dropped"] += 1
                continue
            self._stat_names.add(k)
            out[k] = v
        return out

    def _on_register(self, ident: bytes, msg: Register, now: float) -> None:
        again = msg.instance_id in self.instances
        self.instances[msg.instance_id] = _Instance(msg.role, msg.url, msg.pid, ident, now)
        self.counters["registered"] += 1
        logger.info("instance %s %sregistered (role %s, url %s, pid %d)", msg.instance_id, "re-" if again else "",
                    msg.role, msg.url or "-", msg.pid)
        self._send(ident, Ack())

    def _on_heartbeat(self, ident: bytes, msg: Heartbeat, now: float) -> None:
        self.counters["heartbeats"] += 1
        inst = self.instances.get(msg.instance_id)
        stats = self._stats(msg.stats)
        if inst is not None:
            inst.stats = stats
        if inst is None:
            inst = _Instance(msg.role or "unknown", msg.url, msg.pid, ident, now, stats=stats)
            self.instances[msg.instance_id] = inst
            self.counters["registered"] += 1
            logger.info("instance %s registered by its heartbeat (role %s)", msg.instance_id, inst.role)
        else:
            if not inst.alive:
                logger.info("instance %s is alive again", msg.instance_id)
            inst.ident, inst.seen, inst.alive = ident, now, True
            if inst.role == "unknown" and msg.role:
                inst.role, inst.url, inst.pid = msg.role, msg.url, msg.pid
        self._send(ident, Ack())

    def _record(self, pd_id: str, now: float) -> TransferRecord:
        item = self.records.get(pd_id)
        if item is None:
            item = self.records[pd_id] = (TransferRecord(pd_id=pd_id), now)
            while len(self.records) > MAX_RECORDS:
                self.records.popitem(last=False)
        return item[0]

    def _free(self, ready: Ready, why: str) -> None:
        """Tell the producer of ``ready`` to delete its chunks (through its agent's socket)."""
        if not ready.keys:
            return
        inst = self.instances.get(ready.instance_id)
        if inst is None:
            self._log("unroutable-free", logging.WARNING,
                      f"pd_id={ready.pd_id}: cannot free {len(ready.keys)} chunks ({why}): producer instance "
                      f"{ready.instance_id!r} is not registered")
            return
        self._send(inst.ident, Free(ready.pd_id, list(ready.keys)))
        self.counters["freed_keys"] += len(ready.keys)
        logger.info("pd_id=%s: freeing %d chunks at %s (%s)", ready.pd_id, len(ready.keys), ready.instance_id, why)

    def _on_ready(self, ident: bytes, msg: Ready, now: float) -> None:
        self.counters["ready"] += 1
        self._send(ident, Ack())
        key = (msg.pd_id, msg.rank)
        first = self.entries.get(key)
        if first is not None and first[0].instance_id != msg.instance_id:
            # One producer per pd_id and rank: merging would send the first one's keys to the
            # second when freed (the first would never free them) and mix two locations.
            self.counters["ready_conflicts"] += 1
            self._log("ready-conflict", logging.WARNING,
                      f"pd_id={msg.pd_id} rank {msg.rank}: READY from {msg.instance_id!r} refused, "
                      f"{first[0].instance_id!r} published it first")
            self._free(msg, "another instance published this pd_id first")
            return
        rec = self._record(msg.pd_id, now)
        rec.groups_ready += msg.final
        rec.ready, rec.n_tokens, rec.producer = rec.groups_ready >= msg.groups, msg.n_tokens, msg.instance_id
        rec.n_ready_parts += 1
        timeline.on_ready(rec, msg, timeline.wall_ms())
        if msg.final and rec.ready:
            self.final_at[msg.pd_id] = now
        if msg.pd_id in self.aborted:
            self._free(msg, "request was aborted")
            return
        if key in self.consumed:
            self.final_at.pop(msg.pd_id, None)
            if rec.done:
                timeline.finish(rec)
            self._free(msg, "the consumer already loaded them")
            return
        if key in self.abandoned:
            self._free(msg, "the consumer already gave up")
            return
        old = self.entries.get(key)
        if old is not None and not old[0].final:  # the next part of a streamed transfer
            msg = _merge(old[0], msg)
        elif old is not None:  # a repeated READY replaces the entry; chunks no longer named are freed
            new_keys = set(msg.keys)
            stale = [k for k in old[0].keys if k not in new_keys]
            if stale:
                self._free(Ready(old[0].pd_id, old[0].rank, stale, 0, instance_id=old[0].instance_id), "replaced")
        self.entries[key] = (msg, now + self.cfg.entry_ttl_s)
        waiters = self.waiters.pop(key, [])
        answered = [w for w in waiters if _answers(msg, w.have)]
        if len(answered) < len(waiters):
            self.waiters[key] = [w for w in waiters if not _answers(msg, w.have)]
        for w in answered:
            self._send(w.ident, msg)
        if answered:
            self._waited(rec, now)

    def _waited(self, rec: TransferRecord, now: float) -> None:
        since = self.wait_since.pop(rec.pd_id, None)
        if since is not None:
            rec.wait_ms = round((now - since) * 1000, 3)
        timeline.on_first_wait(rec, timeline.wall_ms() - (now - since) * 1000 if since is not None
                               else timeline.wall_ms())

    def _on_wait(self, ident: bytes, msg: Wait, now: float) -> None:
        self.counters["waits"] += 1
        key = (msg.pd_id, msg.rank)
        entry = self.entries.get(key)
        if entry is not None and _answers(entry[0], msg.have):
            self.counters["wait_hits_immediate"] += 1
            self._waited(self._record(msg.pd_id, now), now)
            self._send(ident, entry[0])
        elif msg.pd_id in self.aborted:
            self._send(ident, Aborted(msg.pd_id, self.aborted[msg.pd_id][1]))
        else:
            self.wait_since.setdefault(msg.pd_id, now)
            deadline = now + min(max(0.0, msg.timeout_s), MAX_WAIT_S)
            self.waiters.setdefault(key, []).append(_Waiter(ident, deadline, msg.have))

    def _on_done(self, ident: bytes, msg: Done, now: float) -> None:
        key = (msg.pd_id, msg.rank)
        entry = self.entries.pop(key, None)
        self.counters["done_ok" if msg.ok else "done_failed"] += 1
        self.counters["chunks_loaded"] += msg.n_chunks
        self.counters["bytes_loaded"] += msg.n_bytes
        self.counters["load_ms_sum"] += msg.load_ms
        rec = self._record(msg.pd_id, now)
        _add_done(rec, msg)
        final_at = self.final_at.pop(msg.pd_id, None) if rec.done else None
        if final_at is not None:
            rec.tail_ms = round((now - final_at) * 1000, 3)
        timeline.on_done(rec, msg, timeline.wall_ms())
        self.counters["store_chunks_loaded"] += msg.n_store_chunks
        if not msg.ok:
            if entry is not None:
                self._free(entry[0], f"load failed: {msg.error or 'no reason given'}")
            # READYs still to come (a late prefill, the rest of a stream) are freed on arrival.
            self.abandoned[key] = now + self.cfg.entry_ttl_s
        elif entry is None or not entry[0].final:
            self.consumed[key] = now + self.cfg.entry_ttl_s
        self._send(ident, Ack())

    def _on_abort(self, ident: bytes, msg: Abort, now: float) -> None:
        self.counters["aborts"] += 1
        reason = msg.reason or "aborted"
        self.aborted[msg.pd_id] = (now + self.cfg.entry_ttl_s, reason)
        self.wait_since.pop(msg.pd_id, None)
        for key in [k for k in self.waiters if k[0] == msg.pd_id]:
            for w in self.waiters.pop(key):
                self._send(w.ident, Aborted(msg.pd_id, reason))
        self.first.on_abort(msg.pd_id, reason)
        for key in [k for k in self.entries if k[0] == msg.pd_id]:
            self._free(self.entries.pop(key)[0], f"aborted: {reason}")
        rec = self._record(msg.pd_id, now)
        if not rec.done:
            rec.error = f"aborted: {reason}"
        timeline.add(rec, Event("abort", timeline.wall_ms(), timeline.COORDINATOR), keep=True)
        logger.info("pd_id=%s: aborted (%s)", msg.pd_id, reason)
        self._send(ident, Ack())

    def query(self, pd_id: str, now: float, spans: bool = False) -> QueryReply:
        instances = [InstanceInfo(iid, i.role, i.url, i.pid, i.alive, round(now - i.seen, 3))
                     for iid, i in sorted(self.instances.items())]
        self.counters["instances_alive"] = sum(1 for i in instances if i.alive)
        self.counters["entries"] = len(self.entries)  # READYs held for a consumer
        self.counters["waiters"] = sum(len(w) for w in self.waiters.values()) + self.first.gauges()  # parked WAITs
        item = self.records.get(pd_id) if pd_id else None
        summary = (timeline.summarize(timeline.recent_spans(r for r, _ in reversed(self.records.values())))
                   if spans else {})
        return QueryReply(counters={**self.counters, **self._instance_counters()}, instances=instances,
                          transfer=item[0] if item else None, spans=summary)

    def _instance_counters(self) -> dict[str, float]:
        """``<role>.<counter>``: the instances' own counters (from their heartbeats) summed per role;
        an instance that died keeps its last ones until it is forgotten."""
        out: dict[str, float] = {}
        for inst in self.instances.values():
            for k, v in (inst.stats or {}).items():
                name = f"{inst.role}.{k}"
                out[name] = out.get(name, 0.0) + v
        return out

    def sweep(self, now: float) -> None:
        self.identity.sweep(now)
        self.first.sweep(now)
        for key, waiters in list(self.waiters.items()):
            keep = [w for w in waiters if w.deadline > now]
            for w in waiters:
                if w.deadline <= now:
                    self.counters["wait_timeouts"] += 1
                    self._send(w.ident, WaitTimeout(key[0]))
            if keep:
                self.waiters[key] = keep
            else:
                del self.waiters[key]
        for key, (ready, expires) in list(self.entries.items()):
            if expires <= now:
                del self.entries[key]
                self.counters["expired"] += 1
                item = self.records.get(key[0])
                if item is not None and not item[0].done:
                    item[0].error = "expired unconsumed"
                self._free(ready, f"not consumed within {self.cfg.entry_ttl_s:g}s")
        for pd_id in [p for p, (until, _) in self.aborted.items() if until <= now]:
            del self.aborted[pd_id]
        for key in [k for k, until in self.abandoned.items() if until <= now]:
            del self.abandoned[key]
        for key in [k for k, until in self.consumed.items() if until <= now]:
            del self.consumed[key]
        horizon = max(self.cfg.entry_ttl_s, MAX_WAIT_S)
        for pd_id in [p for p, since in self.wait_since.items() if now - since > horizon]:
            del self.wait_since[pd_id]
        for pd_id in [p for p, at in self.final_at.items() if now - at > horizon]:
            del self.final_at[pd_id]
        while self.records and (len(self.records) > MAX_RECORDS
                                or now - next(iter(self.records.values()))[1] > RECORD_TTL_S):
            self.records.popitem(last=False)
        alive = 0
        for iid, inst in list(self.instances.items()):
            if inst.alive and now - inst.seen > self.cfg.instance_ttl_s:
                inst.alive = False
                logger.warning("instance %s (%s) sent no heartbeat for %.1fs: marked down", iid, inst.role,
                               now - inst.seen)
            elif not inst.alive and now - inst.seen > DEAD_INSTANCE_TTL_S:
                del self.instances[iid]
                continue
            alive += inst.alive
        self.counters["instances_alive"] = alive
