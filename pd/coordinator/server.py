"""The coordinator: matches prefill READY with decode WAIT by pd_id, tracks instances, frees chunks.

A single-threaded ZMQ ROUTER loop. State is small and in memory: READY entries (expire after
``entry_ttl_s``; their chunks are then freed through the producer's agent), parked waiters
(answered at READY or at their deadline), aborted pd_ids (so a late READY is freed at once),
instances with their last heartbeat, counters, and a bounded record of recent transfers.
Nothing a peer sends can crash it: malformed input is logged, counted and answered with Error.

With ``auth: curve`` the socket is a CurveZMQ server that admits only the clients whose public
keys are in ``<keys_dir>/authorized`` (``pd.coordinator.curve``); a refused key is logged (with the peer's
address) and counted as ``auth_rejected``, a connection that fails the handshake (a client without
keys, or with another server key) as ``handshake_failed``. Listening beyond loopback without
auth is refused at start unless ``allow_insecure``.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import zmq

from common.config import ConfigError, merge, url_host
from pd.config import CoordinatorConfig, load_yaml
from pd.coordinator.protocol import (
    Abort,
    Aborted,
    Ack,
    Done,
    Error,
    Free,
    Heartbeat,
    InstanceInfo,
    ProtocolError,
    Query,
    QueryReply,
    Ready,
    Register,
    TransferRecord,
    Wait,
    WaitTimeout,
    decode_client,
    encode,
)

logger = logging.getLogger("pd.coordinator")

COUNTERS = ("registered", "heartbeats", "ready", "waits", "wait_hits_immediate", "wait_timeouts", "done_ok",
            "done_failed", "aborts", "expired", "freed_keys", "malformed", "internal_errors", "chunks_loaded",
            "bytes_loaded", "load_ms_sum", "instances_alive", "store_chunks_loaded", "auth_rejected",
            "handshake_failed", "ready_conflicts", "entries", "waiters")  # the last two: gauges, set at each query
MAX_RECORDS = 10000          # transfer records kept (oldest dropped first)
RECORD_TTL_S = 3600.0        # ... and for at most this long
DEAD_INSTANCE_TTL_S = 3600.0  # an instance down this long is forgotten
MAX_WAIT_S = 3600.0          # a WAIT never parks longer than this
SWEEP_INTERVAL_S = 0.05      # expiry resolution; also how fast stop() is noticed
MAX_MESSAGE_BYTES = 64 << 20  # a READY of 100,000 keys is ~10 MB
MAX_INSTANCE_STATS = 256     # counters kept per instance (from its heartbeats)
LOG_EVERY_S = 60.0           # repeated warnings of one kind are logged at most this often

Key = tuple[str, int]


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


@dataclass
class _Instance:
    role: str
    url: str
    pid: int
    ident: bytes
    seen: float
    alive: bool = True
    stats: dict | None = None  # its counters, from its latest heartbeat


def _malformed_kind(reason: str) -> str:
    for prefix, kind in (("expected", "frames"), ("unsupported protocol tag", "tag")):
        if reason.startswith(prefix):
            return kind
    return "decode"


class Coordinator:
    """The coordinator server; binds ``cfg.address`` at construction (port 0: any free port).

    ``address``/``port`` are the bound endpoint. Run it with ``serve_forever()`` (blocking) or
    ``start_in_thread()``; ``stop()`` ends the loop and closes the socket.
    """

    def __init__(self, cfg: CoordinatorConfig):
        from pd.coordinator.curve import CurveServer, check_bind, effective_auth

        check_bind(cfg)  # ConfigError: beyond loopback without auth
        self.cfg = cfg
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self._entries: dict[Key, tuple[Ready, float]] = {}  # -> (ready, expires)
        self._waiters: dict[Key, list[_Waiter]] = {}
        self._aborted: dict[str, tuple[float, str]] = {}  # pd_id -> (until, reason)
        self._abandoned: dict[Key, float] = {}  # failed DONE before READY: a late READY is freed at once
        self._wait_since: dict[str, float] = {}  # pd_id -> first unanswered WAIT (for wait_ms)
        self._final_at: dict[str, float] = {}  # pd_id -> its (latest) final READY (for tail_ms)
        self._instances: dict[str, _Instance] = {}
        self._records: OrderedDict[str, tuple[TransferRecord, float]] = OrderedDict()
        self._log_state: dict[str, list[float]] = {}  # kind -> [last logged, suppressed since]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._serving = False
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting agent keeps its identity
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # a larger frame: the peer is disconnected
        self._curve: CurveServer | None = None
        self._monitor: zmq.Socket | None = None
        try:
            if effective_auth(cfg) == "curve":
                self._curve = CurveServer(self._ctx, cfg.keys_dir)  # ConfigError for missing key files
                self._curve.apply(self._sock)
                self._monitor = self._sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            if ":" in cfg.host:
                self._sock.setsockopt(zmq.IPV6, 1)
            self._sock.bind(f"tcp://{url_host(cfg.host or '*')}:{cfg.port or '*'}")  # EADDRINUSE if taken
        except (zmq.ZMQError, ConfigError):
            self._close()
            raise
        self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.port: int = int(self.address.rsplit(":", 1)[1])

    # ---- loop --------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until ``stop()`` is called (or a signal handler sets it); then close the socket."""
        self._serving = True
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        next_sweep = time.monotonic()
        try:
            while not self._stop.is_set():
                wait_ms = max(0.0, next_sweep - time.monotonic()) * 1000
                events = dict(poller.poll(wait_ms))
                if self._monitor is not None and self._monitor in events:
                    self._on_monitor()
                if self._sock in events:
                    for _ in range(1000):  # drain, but bounded so the sweep stays on time
                        try:
                            frames = self._sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._dispatch(frames)
                now = time.monotonic()
                if now >= next_sweep:
                    try:
                        self._sweep(now)
                    except Exception:
                        self.counters["internal_errors"] += 1
                        self._log("sweep", logging.ERROR, "expiry sweep failed", exc_info=True)
                    next_sweep = now + SWEEP_INTERVAL_S
        finally:
            self._close()

    def start_in_thread(self) -> "Coordinator":
        """Run ``serve_forever`` in a daemon thread (tests, embedding); returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="pd-coordinator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the loop to end; joins the thread started by ``start_in_thread``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        elif not self._serving:
            self._close()

    def _close(self) -> None:
        if not self._sock.closed:
            if self._monitor is not None:
                try:
                    self._sock.disable_monitor()
                except zmq.ZMQError:
                    pass
                self._monitor.close(0)
            self._sock.close(0)
            if self._curve is not None:
                self._curve.stop()
            self._ctx.term()

    def _on_monitor(self) -> None:
        """Count and log connections that failed the CURVE handshake (keys refused: see pd.coordinator.curve)."""
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                continue
            self.counters["handshake_failed"] += 1
            code = event["value"]
            why = ("the client does not use CURVE (no keys configured?)"
                   if code == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH else
                   "the client's server key is not this coordinator's public key"
                   if code == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC else f"ZMTP protocol error {code:#x}")
            self._log("handshake", logging.WARNING,
                      f"a connection failed the CURVE handshake: {why} ({int(self.counters['handshake_failed'])} "
                      "so far)")

    def _sync_auth_counters(self) -> None:
        if self._curve is not None:
            self.counters["auth_rejected"] = self._curve.rejected

    def _send(self, ident: bytes, msg) -> None:
        try:
            self._sock.send_multipart([ident, *encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # peer gone or its queue full: the message is dropped
            logger.debug("send %s to %r failed: %s", type(msg).__name__, ident[:32], e)

    def _log(self, kind: str, level: int, text: str, exc_info: bool = False) -> None:
        """Log ``text``; further ones of ``kind`` at most every LOG_EVERY_S (with a count)."""
        now = time.monotonic()
        state = self._log_state.get(kind)
        if state is not None and now - state[0] < LOG_EVERY_S:
            state[1] += 1
            return
        more = f" ({int(state[1])} more of this kind since the last report)" if state and state[1] else ""
        self._log_state[kind] = [now, 0]
        logger.log(level, "%s%s", text, more, exc_info=exc_info)

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) < 2:  # a ROUTER always prefixes the routing identity
            self.counters["malformed"] += 1
            self._log("empty", logging.WARNING, f"malformed message: {len(frames)} frames")
            return
        ident, body = frames[0], frames[1:]
        msg = None
        try:
            msg = decode_client(body)
            self._handle(ident, msg, time.monotonic())
        except ProtocolError as e:
            reason = str(e)[:300]
            self.counters["malformed"] += 1
            self._log("malformed-" + _malformed_kind(reason), logging.WARNING,
                      f"malformed message from {bytes(ident[:32])!r}: {reason}")
            self._send(ident, Error(reason))
        except Exception as e:  # a bug must not take the coordinator down
            self.counters["internal_errors"] += 1
            what = type(msg).__name__ if msg is not None else "message"
            self._log("internal", logging.ERROR, f"internal error handling {what}: {e!r}", exc_info=True)
            self._send(ident, Error(f"internal error handling {what}: {e}"[:300]))

    # ---- handlers ----------------------------------------------------------------------

    def _handle(self, ident: bytes, msg, now: float) -> None:
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
            self._send(ident, self._query(msg.pd_id, now))
        else:  # decode_client only yields the types above
            raise TypeError(f"no handler for {type(msg).__name__}")

    def _on_register(self, ident: bytes, msg: Register, now: float) -> None:
        again = msg.instance_id in self._instances
        self._instances[msg.instance_id] = _Instance(msg.role, msg.url, msg.pid, ident, now)
        self.counters["registered"] += 1
        logger.info("instance %s %sregistered (role %s, url %s, pid %d)", msg.instance_id, "re-" if again else "",
                    msg.role, msg.url or "-", msg.pid)
        self._send(ident, Ack())

    def _on_heartbeat(self, ident: bytes, msg: Heartbeat, now: float) -> None:
        self.counters["heartbeats"] += 1
        inst = self._instances.get(msg.instance_id)
        stats = dict(list(msg.stats.items())[:MAX_INSTANCE_STATS])
        if inst is not None:
            inst.stats = stats
        if inst is None:
            inst = _Instance(msg.role or "unknown", msg.url, msg.pid, ident, now, stats=stats)
            self._instances[msg.instance_id] = inst
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
        item = self._records.get(pd_id)
        if item is None:
            item = self._records[pd_id] = (TransferRecord(pd_id=pd_id), now)
            while len(self._records) > MAX_RECORDS:
                self._records.popitem(last=False)
        return item[0]

    def _free(self, ready: Ready, why: str) -> None:
        """Tell the producer of ``ready`` to delete its chunks (through its agent's socket)."""
        if not ready.keys:
            return
        inst = self._instances.get(ready.instance_id)
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
        first = self._entries.get(key)
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
        if msg.final and rec.ready:
            self._final_at[msg.pd_id] = now
        if msg.pd_id in self._aborted:
            self._free(msg, "request was aborted")
            return
        if key in self._abandoned:
            self._free(msg, "the consumer already gave up")
            return
        old = self._entries.get(key)
        if old is not None and not old[0].final:  # the next part of a streamed transfer
            msg = _merge(old[0], msg)
        elif old is not None:  # a repeated READY replaces the entry; chunks no longer named are freed
            new_keys = set(msg.keys)
            stale = [k for k in old[0].keys if k not in new_keys]
            if stale:
                self._free(Ready(old[0].pd_id, old[0].rank, stale, 0, instance_id=old[0].instance_id), "replaced")
        self._entries[key] = (msg, now + self.cfg.entry_ttl_s)
        waiters = self._waiters.pop(key, [])
        answered = [w for w in waiters if _answers(msg, w.have)]
        if len(answered) < len(waiters):
            self._waiters[key] = [w for w in waiters if not _answers(msg, w.have)]
        for w in answered:
            self._send(w.ident, msg)
        if answered:
            self._waited(rec, now)

    def _waited(self, rec: TransferRecord, now: float) -> None:
        since = self._wait_since.pop(rec.pd_id, None)
        if since is not None:
            rec.wait_ms = round((now - since) * 1000, 3)

    def _on_wait(self, ident: bytes, msg: Wait, now: float) -> None:
        self.counters["waits"] += 1
        key = (msg.pd_id, msg.rank)
        entry = self._entries.get(key)
        if entry is not None and _answers(entry[0], msg.have):
            self.counters["wait_hits_immediate"] += 1
            self._waited(self._record(msg.pd_id, now), now)
            self._send(ident, entry[0])
        elif msg.pd_id in self._aborted:
            self._send(ident, Aborted(msg.pd_id, self._aborted[msg.pd_id][1]))
        else:
            self._wait_since.setdefault(msg.pd_id, now)
            deadline = now + min(max(0.0, msg.timeout_s), MAX_WAIT_S)
            self._waiters.setdefault(key, []).append(_Waiter(ident, deadline, msg.have))

    def _on_done(self, ident: bytes, msg: Done, now: float) -> None:
        key = (msg.pd_id, msg.rank)
        entry = self._entries.pop(key, None)
        self.counters["done_ok" if msg.ok else "done_failed"] += 1
        self.counters["chunks_loaded"] += msg.n_chunks
        self.counters["bytes_loaded"] += msg.n_bytes
        self.counters["load_ms_sum"] += msg.load_ms
        rec = self._record(msg.pd_id, now)
        _add_done(rec, msg)
        final_at = self._final_at.pop(msg.pd_id, None) if rec.done else None
        if final_at is not None:
            rec.tail_ms = round((now - final_at) * 1000, 3)
        self.counters["store_chunks_loaded"] += msg.n_store_chunks
        if not msg.ok:
            if entry is not None:
                self._free(entry[0], f"load failed: {msg.error or 'no reason given'}")
            # READYs still to come (a late prefill, the rest of a stream) are freed on arrival.
            self._abandoned[key] = now + self.cfg.entry_ttl_s
        self._send(ident, Ack())

    def _on_abort(self, ident: bytes, msg: Abort, now: float) -> None:
        self.counters["aborts"] += 1
        reason = msg.reason or "aborted"
        self._aborted[msg.pd_id] = (now + self.cfg.entry_ttl_s, reason)
        self._wait_since.pop(msg.pd_id, None)
        for key in [k for k in self._waiters if k[0] == msg.pd_id]:
            for w in self._waiters.pop(key):
                self._send(w.ident, Aborted(msg.pd_id, reason))
        for key in [k for k in self._entries if k[0] == msg.pd_id]:
            self._free(self._entries.pop(key)[0], f"aborted: {reason}")
        rec = self._record(msg.pd_id, now)
        if not rec.done:
            rec.error = f"aborted: {reason}"
        logger.info("pd_id=%s: aborted (%s)", msg.pd_id, reason)
        self._send(ident, Ack())

    def _query(self, pd_id: str, now: float) -> QueryReply:
        instances = [InstanceInfo(iid, i.role, i.url, i.pid, i.alive, round(now - i.seen, 3))
                     for iid, i in sorted(self._instances.items())]
        self.counters["instances_alive"] = sum(1 for i in instances if i.alive)
        self.counters["entries"] = len(self._entries)  # READYs held for a consumer
        self.counters["waiters"] = sum(len(w) for w in self._waiters.values())  # parked WAITs
        self._sync_auth_counters()
        item = self._records.get(pd_id) if pd_id else None
        return QueryReply(counters={**self.counters, **self._instance_counters()}, instances=instances,
                          transfer=item[0] if item else None)

    def _instance_counters(self) -> dict[str, float]:
        """``<role>.<counter>``: the instances' own counters (from their heartbeats) summed per role;
        an instance that died keeps its last ones until it is forgotten."""
        out: dict[str, float] = {}
        for inst in self._instances.values():
            for k, v in (inst.stats or {}).items():
                name = f"{inst.role}.{k}"
                out[name] = out.get(name, 0.0) + v
        return out

    def _sweep(self, now: float) -> None:
        for key, waiters in list(self._waiters.items()):
            keep = [w for w in waiters if w.deadline > now]
            for w in waiters:
                if w.deadline <= now:
                    self.counters["wait_timeouts"] += 1
                    self._send(w.ident, WaitTimeout(key[0]))
            if keep:
                self._waiters[key] = keep
            else:
                del self._waiters[key]
        for key, (ready, expires) in list(self._entries.items()):
            if expires <= now:
                del self._entries[key]
                self.counters["expired"] += 1
                item = self._records.get(key[0])
                if item is not None and not item[0].done:
                    item[0].error = "expired unconsumed"
                self._free(ready, f"not consumed within {self.cfg.entry_ttl_s:g}s")
        for pd_id in [p for p, (until, _) in self._aborted.items() if until <= now]:
            del self._aborted[pd_id]
        for key in [k for k, until in self._abandoned.items() if until <= now]:
            del self._abandoned[key]
        horizon = max(self.cfg.entry_ttl_s, MAX_WAIT_S)
        for pd_id in [p for p, since in self._wait_since.items() if now - since > horizon]:
            del self._wait_since[pd_id]
        for pd_id in [p for p, at in self._final_at.items() if now - at > horizon]:
            del self._final_at[pd_id]
        while self._records and (len(self._records) > MAX_RECORDS
                                 or now - next(iter(self._records.values()))[1] > RECORD_TTL_S):
            self._records.popitem(last=False)
        alive = 0
        for iid, inst in list(self._instances.items()):
            if inst.alive and now - inst.seen > self.cfg.instance_ttl_s:
                inst.alive = False
                logger.warning("instance %s (%s) sent no heartbeat for %.1fs: marked down", iid, inst.role,
                               now - inst.seen)
            elif not inst.alive and now - inst.seen > DEAD_INSTANCE_TTL_S:
                del self._instances[iid]
                continue
            alive += inst.alive
        self.counters["instances_alive"] = alive


# ---- CLI ---------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``pd coordinator`` options to ``p``."""
    p.add_argument("--config", help="deployment YAML; its `coordinator` section is used (flags override it)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 5570)")
    p.add_argument("--entry-ttl-s", type=float, help="drop and free READY entries not consumed in this time")
    p.add_argument("--instance-ttl-s", type=float, help="mark instances down after this long without heartbeat")
    p.add_argument("--auth", choices=("auto", "none", "curve"),
                   help="curve: CurveZMQ, clients in KEYS_DIR/authorized only; auto (default): curve when --keys-dir is given")
    p.add_argument("--keys-dir", help="the directory `pd keys` made (coordinator.keys_dir)")
    p.add_argument("--allow-insecure", action="store_true", default=None,
                   help="listen beyond loopback without auth anyway (coordinator.allow_insecure)")


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    """The config ``args`` describe: defaults, then ``--config``'s coordinator section, then flags."""
    cfg = load_yaml(args.config).coordinator if getattr(args, "config", None) else CoordinatorConfig()
    over = {k: v for k, v in {"host": args.host, "port": args.port, "entry_ttl_s": args.entry_ttl_s,
                              "instance_ttl_s": args.instance_ttl_s, "auth": getattr(args, "auth", None),
                              "keys_dir": getattr(args, "keys_dir", None),
                              "allow_insecure": getattr(args, "allow_insecure", None)}.items() if v is not None}
    return merge(cfg, over, "coordinator.") if over else cfg


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (exit 0); bad config or a busy port: one line on stderr, exit 2."""
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"coordinator: {e}", file=sys.stderr)
        return 2
    try:
        coord = Coordinator(cfg)
    except ConfigError as e:
        print(f"coordinator: {e}", file=sys.stderr)
        return 2
    except zmq.ZMQError as e:
        if e.errno == zmq.EADDRINUSE:
            print(f"coordinator: port {cfg.port} on {cfg.host} is already in use", file=sys.stderr)
        else:
            print(f"coordinator: cannot listen on {cfg.bind_address}: {e}", file=sys.stderr)
        return 2
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: coord._stop.set())
    logger.info("listening on %s (entry ttl %gs, instance ttl %gs, auth %s)", coord.address, cfg.entry_ttl_s,
                cfg.instance_ttl_s, "curve: keys in " + cfg.keys_dir if coord._curve is not None else "none")
    coord.serve_forever()
    logger.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pd.coordinator``: the same as ``pd coordinator``."""
    parser = argparse.ArgumentParser(prog="pd coordinator", description="the pdkv ZMQ coordinator")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
