"""The coordinator: matches prefill READY with decode WAIT by pd_id, tracks instances, frees chunks.

A single-threaded ZMQ ROUTER loop. State is small and in memory: READY entries (expire after
``entry_ttl_s``; their chunks are then freed through the producer's agent), parked waiters
(answered at READY or at their deadline), aborted pd_ids (so a late READY is freed at once),
instances with their last heartbeat, counters, and a bounded record of recent transfers.
Nothing a peer sends can crash it: malformed input is logged, counted and answered with Error.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections import OrderedDict, defaultdict

import zmq

from pd.config import ConfigError, CoordinatorConfig, load_yaml
from pd.protocol import (
    Abort, Ack, Aborted, Done, Error, Free, Heartbeat, InstanceInfo, ProtocolError, Query, QueryReply, Ready,
    Register, TransferRecord, Wait, WaitTimeout, decode_client, encode,
)

logger = logging.getLogger("pd.coordinator")
MAX_RECORDS = 10000
COUNTERS = ("registered", "heartbeats", "ready", "waits", "wait_hits_immediate", "wait_timeouts", "done_ok",
            "done_failed", "aborts", "expired", "freed_keys", "malformed", "internal_errors", "chunks_loaded",
            "bytes_loaded", "load_ms_sum", "instances_alive")


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig):
        self.cfg = cfg
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self._entries: dict[tuple[str, int], tuple[Ready, float]] = {}
        self._waiters: dict[tuple[str, int], list[tuple[bytes, float]]] = defaultdict(list)
        self._aborted: dict[str, float] = {}
        self._instances: dict[str, dict] = {}
        self._records: OrderedDict[str, TransferRecord] = OrderedDict()
        self._ready_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._warned: set[str] = set()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(cfg.address)  # raises zmq.ZMQError (EADDRINUSE) if the port is taken
        self._thread: threading.Thread | None = None

    # ---- loop --------------------------------------------------------------------------

    def serve_forever(self) -> None:
        next_sweep = 0.0
        try:
            while not self._stop.is_set():
                if self._sock.poll(100):
                    frames = self._sock.recv_multipart()
                    self._dispatch(frames)
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + 0.1
        finally:
            self._sock.close(0)
            self._ctx.term()

    def start_in_thread(self) -> "Coordinator":
        self._thread = threading.Thread(target=self.serve_forever, name="pd-coordinator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _send(self, ident: bytes, msg) -> None:
        try:
            self._sock.send_multipart([ident, *encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.debug("send to %r failed: %s", ident, e)

    def _warn_once(self, kind: str, text: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("%s (further ones of this kind are only counted)", text)

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self.counters["malformed"] += 1
            self._warn_once("noident", f"message without routing identity: {len(frames)} frames")
            return
        ident, body = frames[0], frames[1:]
        try:
            msg = decode_client(body)
        except ProtocolError as e:
            self.counters["malformed"] += 1
            self._warn_once(str(e)[:40], f"malformed message from {ident!r}: {e}")
            self._send(ident, Error(str(e)))
            return
        try:
            self._handle(ident, msg)
        except Exception as e:  # a bug must not take the coordinator down
            self.counters["internal_errors"] += 1
            logger.exception("error handling %s", type(msg).__name__)
            self._send(ident, Error(f"internal error: {e}"))

    # ---- handlers ----------------------------------------------------------------------

    def _handle(self, ident: bytes, msg) -> None:
        now = time.monotonic()
        if isinstance(msg, Register):
            self._instances[msg.instance_id] = {"role": msg.role, "url": msg.url, "pid": msg.pid, "ident": ident,
                                                "seen": now, "alive": True}
            self.counters["registered"] += 1
            logger.info("instance %s registered (%s %s)", msg.instance_id, msg.role, msg.url)
            self._send(ident, Ack())
        elif isinstance(msg, Heartbeat):
            inst = self._instances.setdefault(msg.instance_id, {"role": "unknown", "url": "", "pid": 0})
            inst.update(ident=ident, seen=now)
            if not inst.get("alive", False):
                logger.info("instance %s is alive", msg.instance_id)
            inst["alive"] = True
            self.counters["heartbeats"] += 1
            self._send(ident, Ack())
        elif isinstance(msg, Ready):
            self._on_ready(ident, msg, now)
        elif isinstance(msg, Wait):
            self._on_wait(ident, msg, now)
        elif isinstance(msg, Done):
            self._on_done(ident, msg)
        elif isinstance(msg, Abort):
            self._on_abort(ident, msg, now)
        elif isinstance(msg, Query):
            self._send(ident, self._query(msg.pd_id, now))

    def _record(self, pd_id: str) -> TransferRecord:
        rec = self._records.get(pd_id)
        if rec is None:
            rec = self._records[pd_id] = TransferRecord(pd_id=pd_id)
            while len(self._records) > MAX_RECORDS:
                self._records.popitem(last=False)
        return rec

    def _free(self, ready: Ready, why: str) -> None:
        inst = self._instances.get(ready.instance_id)
        if ready.keys and inst and inst.get("ident"):
            self._send(inst["ident"], Free(ready.pd_id, ready.keys))
            self.counters["freed_keys"] += len(ready.keys)
        logger.info("pd_id=%s: freeing %d chunks (%s)", ready.pd_id, len(ready.keys), why)

    def _on_ready(self, ident: bytes, msg: Ready, now: float) -> None:
        self.counters["ready"] += 1
        self._send(ident, Ack())
        if msg.pd_id in self._aborted:
            self._free(msg, "request was aborted")
            return
        rec = self._record(msg.pd_id)
        rec.ready, rec.n_tokens, rec.producer = True, msg.n_tokens, msg.instance_id
        self._ready_at[msg.pd_id] = now
        key = (msg.pd_id, msg.rank)
        for wident, _ in self._waiters.pop(key, []):
            self._send(wident, msg)
        self._entries[key] = (msg, now + self.cfg.entry_ttl_s)

    def _on_wait(self, ident: bytes, msg: Wait, now: float) -> None:
        self.counters["waits"] += 1
        key = (msg.pd_id, msg.rank)
        if key in self._entries:
            self.counters["wait_hits_immediate"] += 1
            self._send(ident, self._entries[key][0])
        elif msg.pd_id in self._aborted:
            self._send(ident, Aborted(msg.pd_id, "aborted"))
        else:
            self._waiters[key].append((ident, now + max(0.0, msg.timeout_s)))

    def _on_done(self, ident: bytes, msg: Done) -> None:
        entry = self._entries.pop((msg.pd_id, msg.rank), None)
        self.counters["done_ok" if msg.ok else "done_failed"] += 1
        self.counters["chunks_loaded"] += msg.n_chunks
        self.counters["bytes_loaded"] += msg.n_bytes
        self.counters["load_ms_sum"] += msg.load_ms
        rec = self._record(msg.pd_id)
        rec.done, rec.ok, rec.n_chunks, rec.n_bytes = True, msg.ok, msg.n_chunks, msg.n_bytes
        rec.load_ms, rec.error, rec.consumer = msg.load_ms, msg.error, msg.instance_id
        if not msg.ok and entry is not None:
            self._free(entry[0], f"load failed: {msg.error}")
        self._send(ident, Ack())

    def _on_abort(self, ident: bytes, msg: Abort, now: float) -> None:
        self.counters["aborts"] += 1
        self._aborted[msg.pd_id] = now + self.cfg.entry_ttl_s
        for key in [k for k in self._waiters if k[0] == msg.pd_id]:
            for wident, _ in self._waiters.pop(key):
                self._send(wident, Aborted(msg.pd_id, msg.reason))
        for key in [k for k in self._entries if k[0] == msg.pd_id]:
            self._free(self._entries.pop(key)[0], f"aborted: {msg.reason}")
        self._send(ident, Ack())

    def _query(self, pd_id: str, now: float) -> QueryReply:
        instances = [InstanceInfo(iid, i.get("role", ""), i.get("url", ""), i.get("pid", 0), i.get("alive", False),
                                  round(now - i.get("seen", now), 3)) for iid, i in sorted(self._instances.items())]
        self.counters["instances_alive"] = sum(1 for i in instances if i.alive)
        return QueryReply(counters=dict(self.counters), instances=instances,
                          transfer=self._records.get(pd_id) if pd_id else None)

    def _sweep(self, now: float) -> None:
        for key, waiters in list(self._waiters.items()):
            keep = []
            for wident, deadline in waiters:
                if deadline <= now:
                    self.counters["wait_timeouts"] += 1
                    self._send(wident, WaitTimeout(key[0]))
                else:
                    keep.append((wident, deadline))
            if keep:
                self._waiters[key] = keep
            else:
                del self._waiters[key]
        for key, (ready, expires) in list(self._entries.items()):
            if expires <= now:
                del self._entries[key]
                self.counters["expired"] += 1
                self._free(ready, "expired unconsumed")
        for pd_id, until in list(self._aborted.items()):
            if until <= now:
                del self._aborted[pd_id]
        for iid, inst in self._instances.items():
            if inst.get("alive") and now - inst.get("seen", now) > self.cfg.instance_ttl_s:
                inst["alive"] = False
                logger.warning("instance %s missed heartbeats for %.0fs: marked down", iid, now - inst["seen"])


# ---- CLI ---------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="deployment YAML; its `coordinator` section is used")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--entry-ttl-s", type=float)
    p.add_argument("--instance-ttl-s", type=float)


def run(args) -> int:
    from pd.config import merge

    cfg = load_yaml(args.config).coordinator if args.config else CoordinatorConfig()
    over = {k: v for k, v in {"host": args.host, "port": args.port, "entry_ttl_s": args.entry_ttl_s,
                              "instance_ttl_s": args.instance_ttl_s}.items() if v is not None}
    cfg = merge(cfg, over, "coordinator.")
    try:
        coord = Coordinator(cfg)
    except zmq.ZMQError as e:
        if e.errno == zmq.EADDRINUSE:
            raise ConfigError(f"port {cfg.port} on {cfg.host} is already in use") from None
        raise ConfigError(f"cannot listen on {cfg.address}: {e}") from None
    signal.signal(signal.SIGTERM, lambda *_: coord._stop.set())
    signal.signal(signal.SIGINT, lambda *_: coord._stop.set())
    print(f"pd coordinator listening on {cfg.address}", file=sys.stderr, flush=True)
    coord.serve_forever()
    return 0
