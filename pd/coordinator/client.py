"""Clients of the coordinator: synchronous (connector threads), agent (heartbeats), async (proxy).

No call ever raises to its caller or hangs: with the coordinator down, calls return
False/None/WaitTimeout after their timeout, and a socket whose reply did not come in time is
closed and replaced, so a late reply is never taken for the answer to a later call.
Unsolicited ``Free`` messages are only acted on by the ``InstanceAgent``; a request socket that
happens to receive one skips it.

``keys`` (a ``pd.coordinator.curve.ClientKeys``) makes every socket a CurveZMQ client. A coordinator that
refuses the keys sends nothing back: the calls time out exactly as with the coordinator down, and
the first miss is logged with a hint about the keys. ``probe()`` tells the cases apart (refused
keys, failed handshake, nothing listening, no answer) for ``pd stats`` and ``pd launch``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING, Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from pd.coordinator.protocol import (
    Abort,
    Aborted,
    Ack,
    Done,
    First,
    FirstOutcome,
    FirstToken,
    Free,
    Heartbeat,
    Query,
    QueryReply,
    Ready,
    Register,
    ReplyMsg,
    Wait,
    AwaitFirst,
    WaitTimeout,
    decode_reply,
    encode,
)

if TYPE_CHECKING:
    from pd.coordinator.curve import ClientKeys

logger = logging.getLogger("pd.coordinator.client")
WAIT_MARGIN_S = 1.0  # a WAIT's client-side deadline is its timeout plus at most this


def _dealer(ctx: zmq.Context, address: str, identity: bytes | None = None, sndhwm: int = 0,
            keys: "ClientKeys | None" = None, immediate: bool = False) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if immediate:
        s.setsockopt(zmq.IMMEDIATE, 1)
    if "[" in address:  # an IPv6 literal
        s.setsockopt(zmq.IPV6, 1)
    if keys is not None:
        keys.apply(s)
    if identity:
        s.setsockopt(zmq.IDENTITY, identity)
    if sndhwm:
        s.setsockopt(zmq.SNDHWM, sndhwm)
    s.connect(address)
    return s


class _Health:
    """Logs the first unanswered call (warning) and the first answer after that (info)."""

    def __init__(self, address: str, keys: "ClientKeys | None" = None):
        self.address = address
        self.down = False
        self.hint = "" if keys is None else (
            f"; with CurveZMQ, also check the keys: the coordinator logs 'rejected a client' when this "
            f"client's public key ({keys.public.decode()}, from {keys.source}) is not in its authorized/ "
            f"directory, and 'failed the CURVE handshake' when this host's server.key is not the coordinator's")

    def note(self, answered: bool, what: str, timeout_s: float) -> None:
        if not answered and not self.down:
            self.down = True
            logger.warning("coordinator %s did not answer %s within %.1fs (further misses are not logged "
                           "until it answers again)%s", self.address, what, timeout_s, self.hint)
        elif answered and self.down:
            self.down = False
            logger.info("coordinator %s answers again", self.address)


class CoordinatorClient:
    """Request/reply calls to the coordinator; thread-safe (one DEALER socket per calling thread)."""

    def __init__(self, address: str, timeout_s: float = 5.0, keys: "ClientKeys | None" = None):
        self.address = address
        self.timeout_s = timeout_s
        self.keys = keys
        self._ctx = zmq.Context.instance()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._socks: set[zmq.Socket] = set()
        self._busy: set[zmq.Socket] = set()
        self._closed = False
        self._health = _Health(address, keys)

    def _acquire(self) -> zmq.Socket | None:
        with self._lock:
            if self._closed:
                return None
            s = getattr(self._local, "sock", None)
            if s is None:
                s = self._local.sock = _dealer(self._ctx, self.address, keys=self.keys)
                self._socks.add(s)
            self._busy.add(s)
            return s

    def _release(self, s: zmq.Socket, keep: bool) -> None:
        with self._lock:
            self._busy.discard(s)
            if keep and not self._closed:
                return
            self._socks.discard(s)
            s.close(0)
            if getattr(self._local, "sock", None) is s:
                self._local.sock = None

    def call(self, msg, timeout_s: float | None = None) -> ReplyMsg | None:
        """Send ``msg`` and return the reply, or None if none came within the timeout."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        s = self._acquire()
        if s is None:
            return None
        reply = None
        try:
            s.send_multipart(encode(msg), zmq.NOBLOCK)
            deadline = time.monotonic() + timeout
            while reply is None:
                left = deadline - time.monotonic()
                if left <= 0 or not s.poll(left * 1000):
                    break
                reply = decode_reply(s.recv_multipart())
                if isinstance(reply, Free):  # meant for an agent; not the answer to this call
                    reply = None
        except Exception as e:  # ZMQError, ProtocolError, anything: never raise to the caller
            logger.warning("coordinator %s: %s failed: %s", self.address, type(msg).__name__, e)
            reply = None
        finally:
            self._release(s, keep=reply is not None)
        self._health.note(reply is not None, type(msg).__name__, timeout)
        return reply

    def register(self, instance_id: str, role: str, url: str = "", pid: int = 0) -> bool:
        """Register an instance (pid 0: this process); True when acknowledged."""
        return isinstance(self.call(Register(instance_id, role, url, pid or os.getpid())), Ack)

    def heartbeat(self, instance_id: str) -> bool:
        """One heartbeat; True when acknowledged."""
        return isinstance(self.call(Heartbeat(instance_id)), Ack)

    def ready(self, msg: Ready) -> bool:
        """Publish READY; True when acknowledged."""
        return isinstance(self.call(msg), Ack)

    def wait(self, pd_id: str, rank: int, timeout_s: float, have: int = 0) -> Ready | WaitTimeout | Aborted:
        """Wait up to ``timeout_s`` for READY of ``pd_id``/``rank`` with more than ``have`` chunks
        (or the final one); WaitTimeout on any failure."""
        reply = self.call(Wait(pd_id, rank, timeout_s, have), timeout_s + min(self.timeout_s, WAIT_MARGIN_S))
        if isinstance(reply, (Ready, Aborted, WaitTimeout)):
            return reply
        return WaitTimeout(pd_id)

    def first(self, pd_id: str, token_id: int, timeout_s: float | None = None) -> bool:
        """Hand token 1 of ``pd_id`` to its early decode (``pd.coordinator.first``); True when handed over."""
        return isinstance(self.call(First(pd_id, token_id), timeout_s), Ack)

    def done(self, msg: Done) -> bool:
        """Report DONE; True when acknowledged."""
        return isinstance(self.call(msg), Ack)

    def abort(self, pd_id: str, reason: str = "") -> bool:
        """Abort ``pd_id`` (release waiters, free chunks); True when acknowledged."""
        return isinstance(self.call(Abort(pd_id, reason)), Ack)

    def query(self, pd_id: str = "", spans: bool = False) -> QueryReply | None:
        """Counters, instances, the record of ``pd_id`` (if given) and with ``spans`` the p50/p99 of
        each span over recent transfers; None without an answer."""
        reply = self.call(Query(pd_id, spans))
        return reply if isinstance(reply, QueryReply) else None

    def close(self) -> None:
        """Close all sockets (one in use by another thread is closed when its call returns)."""
        with self._lock:
            self._closed = True
            for s in [s for s in self._socks if s not in self._busy]:
                s.close(0)
                self._socks.discard(s)


class InstanceAgent:
    """A daemon thread that registers an instance, heartbeats, and hands ``Free`` to ``on_free``.

    Its DEALER identity is ``instance_id`` plus a random suffix; the coordinator pushes Free to the
    identity that last registered or heartbeated. Heartbeats carry role/url/pid, so a restarted
    coordinator re-registers the instance from the next heartbeat.
    """

    def __init__(self, address: str, instance_id: str, role: str, url: str = "", interval_s: float = 2.0,
                 on_free: Callable[[Free], None] | None = None, keys: "ClientKeys | None" = None,
                 stats: Callable[[], dict[str, float]] | None = None):
        self.address, self.instance_id, self.role, self.url = address, instance_id, role, url
        self.stats = stats  # the counters each heartbeat carries
        self.keys = keys
        self.interval_s = interval_s
        self.on_free = on_free
        self.freed = 0  # keys handed to on_free
        self.last_ack: float | None = None  # time.monotonic() of the last Ack
        self._acked = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pd-agent-{instance_id}", daemon=True)

    def start(self) -> "InstanceAgent":
        """Start the thread; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and close its socket."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def wait_registered(self, timeout_s: float) -> bool:
        """Block until the coordinator acknowledged this agent once (True) or ``timeout_s`` passed."""
        return self._acked.wait(timeout_s)

    def _send(self, sock: zmq.Socket, msg) -> None:
        try:
            sock.send_multipart(encode(msg), zmq.NOBLOCK)
        except zmq.Again:  # coordinator unreachable and the small queue full: skip this beat
            pass

    def _run(self) -> None:
        identity = f"{self.instance_id}#{uuid.uuid4().hex[:8]}".encode()
        pid = os.getpid()
        try:
            sock = _dealer(zmq.Context.instance(), self.address, identity, sndhwm=4, keys=self.keys)
        except zmq.ZMQError as e:
            logger.error("instance agent %s: cannot connect to %s: %s", self.instance_id, self.address, e)
            return
        try:
            self._send(sock, Register(self.instance_id, self.role, self.url, pid))
            next_beat = time.monotonic() + self.interval_s
            while not self._stop.is_set():
                left = min(0.1, max(0.0, next_beat - time.monotonic()))
                if sock.poll(left * 1000):
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames)
                if time.monotonic() >= next_beat:
                    self._send(sock, Heartbeat(self.instance_id, self.role, self.url, pid, self._stats()))
                    next_beat = time.monotonic() + self.interval_s
        except Exception:
            logger.exception("instance agent %s stopped", self.instance_id)
        finally:
            sock.close(0)

    def _stats(self) -> dict[str, float]:
        if self.stats is None:
            return {}
        try:
            return {str(k): float(v) for k, v in self.stats().items()}
        except Exception:  # a counter source that fails must not stop the heartbeats
            logger.debug("instance agent %s: no stats this beat", self.instance_id, exc_info=True)
            return {}

    def _handle(self, frames: list[bytes]) -> None:
        try:
            msg = decode_reply(frames)
        except Exception as e:
            logger.warning("instance agent %s: bad message from the coordinator: %s", self.instance_id, e)
            return
        if isinstance(msg, Ack):
            self.last_ack = time.monotonic()
            self._acked.set()
        elif isinstance(msg, Free):
            if self.on_free is None:
                return
            try:
                self.on_free(msg)
                self.freed += len(msg.keys)
            except Exception:
                logger.exception("pd_id=%s: freeing %d keys failed", msg.pd_id, len(msg.keys))
        else:
            logger.debug("instance agent %s: ignoring %s", self.instance_id, type(msg).__name__)


class AsyncCoordinatorClient:
    """asyncio client for the proxy: abort, query and token 1's outcome; never raises (except the
    caller's cancellation). Each call has a socket to itself (one request in flight per socket
    keeps replies in order), from a pool of up to ``max_sockets``: a call parked at the coordinator
    (FIRST_OUTCOME) or a slow one does not hold the others up."""

    def __init__(self, address: str, timeout_s: float = 2.0, keys: "ClientKeys | None" = None,
                 max_sockets: int = 16):
        self.address = address
        self.timeout_s = timeout_s
        self.keys = keys
        self._ctx = zmq.asyncio.Context.instance()
        self._idle: list[zmq.asyncio.Socket] = []
        self._slots: asyncio.Semaphore | None = None
        self.max_sockets = max_sockets
        self._closed = False
        self._health = _Health(address, keys)

    async def _call(self, msg, timeout_s: float | None = None) -> ReplyMsg | None:
        if self._closed:
            return None
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_sockets)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout)  # every socket busy for that long: no answer
            try:
                reply = await self._exchange(msg, timeout)
            finally:
                self._slots.release()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.warning("coordinator %s: %s failed: %s", self.address, type(msg).__name__, e)
            reply = None
        self._health.note(reply is not None, type(msg).__name__, timeout)
        return reply

    async def _exchange(self, msg, timeout_s: float) -> ReplyMsg | None:
        if self._closed:
            return None
        sock = self._idle.pop() if self._idle else _dealer(self._ctx, self.address, keys=self.keys)
        reply = None
        try:
            await sock.send_multipart(encode(msg))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while reply is None:
                left = deadline - loop.time()
                if left <= 0 or not await sock.poll(left * 1000):
                    break
                reply = decode_reply(await sock.recv_multipart())
                if isinstance(reply, Free):
                    reply = None
            return reply
        finally:  # no answer (timeout, error, cancellation): a late one must not reach the next call
            if reply is None or self._closed:
                sock.close(0)
            else:
                self._idle.append(sock)

    async def abort(self, pd_id: str, reason: str = "") -> bool:
        """Abort ``pd_id``; True when acknowledged."""
        return isinstance(await self._call(Abort(pd_id, reason)), Ack)

    async def first_outcome(self, pd_id: str, timeout_s: float) -> int | None:
        """How token 1 of ``pd_id`` was handed over (``pd.coordinator.first``): the token, -1 (the
        decode computes it), or None without an answer (unknown). Waits up to ``timeout_s`` for the
        prefill's FIRST, on a socket of its own (other calls do not queue behind it)."""
        reply = await self._call(FirstOutcome(pd_id, timeout_s), timeout_s + WAIT_MARGIN_S)
        return reply.token_id if isinstance(reply, FirstToken) and reply.pd_id == pd_id else None

    async def query(self, pd_id: str = "", spans: bool = False) -> QueryReply | None:
        """As ``CoordinatorClient.query``."""
        reply = await self._call(Query(pd_id, spans))
        return reply if isinstance(reply, QueryReply) else None

    def close(self) -> None:
        """Close the sockets; later calls return False/None at once."""
        self._closed = True
        for sock in self._idle:
            sock.close(0)
        self._idle.clear()


# ---- diagnosis ---------------------------------------------------------------------------

PROBE_OK, PROBE_REFUSED, PROBE_HANDSHAKE, PROBE_UNREACHABLE, PROBE_SILENT = (
    "ok", "keys refused", "handshake failed", "unreachable", "no answer")


def probe(address: str, keys: "ClientKeys | None" = None, timeout_s: float = 3.0) -> tuple[str, str]:
    """Ask the coordinator at ``address`` for its counters and say what happened: (status, message).

    status: ``ok``; ``keys refused`` (CURVE: our public key is not authorized); ``handshake failed``
    (a client without keys at a CURVE coordinator, or with a wrong server key, or keys at a
    coordinator without auth); ``unreachable`` (no connection: nothing listens, or no route);
    ``no answer`` (connected, then silence).
    """
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if "[" in address:
        sock.setsockopt(zmq.IPV6, 1)
    if keys is not None:
        keys.apply(sock)
    mon = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    seen: set[int] = set()
    try:
        try:
            sock.connect(address)
        except zmq.ZMQError as e:
            return PROBE_UNREACHABLE, f"cannot connect to {address!r}: {e}"
        sock.send_multipart(encode(Query("")), zmq.NOBLOCK)
        deadline = time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(left * 1000))
            if mon in ready:
                while mon.poll(0):
                    seen.add(recv_monitor_message(mon)["event"])
                if zmq.EVENT_HANDSHAKE_FAILED_AUTH in seen:
                    return PROBE_REFUSED, (f"the coordinator at {address} refused this client's key"
                                           f"{' from ' + keys.source if keys else ''}: add its public key to the "
                                           "coordinator's authorized/ directory (pd keys DIR --client NAME makes one)")
                if seen & {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL} \
                        and zmq.EVENT_HANDSHAKE_SUCCEEDED not in seen:
                    why = ("this client has no CurveZMQ keys and the coordinator may require them "
                           "(coordinator.auth: curve + coordinator.keys_dir)" if keys is None else
                           "the coordinator may not use CurveZMQ, or this host's server.key is not its public key")
                    return PROBE_HANDSHAKE, f"the handshake with the coordinator at {address} failed: {why}"
            if sock in ready:
                reply = decode_reply(sock.recv_multipart())
                if isinstance(reply, QueryReply):
                    return PROBE_OK, f"the coordinator at {address} answers"
        if zmq.EVENT_CONNECTED not in seen:
            return PROBE_UNREACHABLE, (f"no connection to the coordinator at {address} within {timeout_s:g}s "
                                       "(not started yet, wrong address or port, or no route)")
        return PROBE_SILENT, f"the coordinator at {address} accepted the connection but did not answer in {timeout_s:g}s"
    finally:
        sock.disable_monitor()
        mon.close(0)
        sock.close(0)
