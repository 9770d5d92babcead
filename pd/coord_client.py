"""Clients of the coordinator: synchronous (connector threads), agent (heartbeats), async (proxy).

No call ever raises to its caller or hangs: with the coordinator down, calls return
False/None/WaitTimeout after their timeout, and a socket whose reply did not come in time is
closed and replaced, so a late reply is never taken for the answer to a later call.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Callable

import zmq
import zmq.asyncio

from pd.protocol import (
    Abort, Ack, Aborted, Done, Free, Heartbeat, ProtocolError, Query, QueryReply, Ready, Register, Wait,
    WaitTimeout, decode_reply, encode,
)

logger = logging.getLogger("pd.coord_client")


def _dealer(ctx: zmq.Context, address: str, identity: bytes | None = None) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity:
        s.setsockopt(zmq.IDENTITY, identity)
    s.connect(address)
    return s


class CoordinatorClient:
    """Request/reply calls; thread-safe (one DEALER socket per calling thread)."""

    def __init__(self, address: str, timeout_s: float = 5.0):
        self.address = address
        self.timeout_s = timeout_s
        self._ctx = zmq.Context.instance()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()
        self._warned = False

    def _socket(self) -> zmq.Socket:
        s = getattr(self._local, "sock", None)
        if s is None:
            s = _dealer(self._ctx, self.address)
            self._local.sock = s
            with self._lock:
                self._sockets.append(s)
        return s

    def _reset(self) -> None:
        s = getattr(self._local, "sock", None)
        if s is not None:
            with self._lock:
                if s in self._sockets:
                    self._sockets.remove(s)
            s.close(0)
            self._local.sock = None

    def call(self, msg, timeout_s: float | None = None):
        """Send ``msg`` and return the reply, or None if none came in time."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        s = self._socket()
        try:
            s.send_multipart(encode(msg))
            if s.poll(int(timeout * 1000)):
                return decode_reply(s.recv_multipart())
        except (zmq.ZMQError, ProtocolError) as e:
            logger.warning("coordinator %s: %s", self.address, e)
        if not self._warned:
            logger.warning("coordinator %s did not answer within %.1fs", self.address, timeout)
            self._warned = True
        self._reset()
        return None

    def register(self, instance_id: str, role: str, url: str = "", pid: int = 0) -> bool:
        return isinstance(self.call(Register(instance_id, role, url, pid or os.getpid())), Ack)

    def heartbeat(self, instance_id: str) -> bool:
        return isinstance(self.call(Heartbeat(instance_id)), Ack)

    def ready(self, msg: Ready) -> bool:
        return isinstance(self.call(msg), Ack)

    def wait(self, pd_id: str, rank: int, timeout_s: float) -> Ready | WaitTimeout | Aborted:
        reply = self.call(Wait(pd_id, rank, timeout_s), timeout_s + self.timeout_s)
        if isinstance(reply, (Ready, Aborted, WaitTimeout)):
            return reply
        return WaitTimeout(pd_id)

    def done(self, msg: Done) -> bool:
        return isinstance(self.call(msg), Ack)

    def abort(self, pd_id: str, reason: str = "") -> bool:
        return isinstance(self.call(Abort(pd_id, reason)), Ack)

    def query(self, pd_id: str = "") -> QueryReply | None:
        reply = self.call(Query(pd_id))
        return reply if isinstance(reply, QueryReply) else None

    def close(self) -> None:
        with self._lock:
            for s in self._sockets:
                s.close(0)
            self._sockets.clear()


class InstanceAgent:
    """Registers an instance, heartbeats, and hands unsolicited Free messages to ``on_free``."""

    def __init__(self, address: str, instance_id: str, role: str, url: str = "", interval_s: float = 2.0,
                 on_free: Callable[[Free], None] | None = None):
        self.address, self.instance_id, self.role, self.url = address, instance_id, role, url
        self.interval_s = interval_s
        self.on_free = on_free
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pd-agent-{instance_id}", daemon=True)
        self.freed = 0

    def start(self) -> "InstanceAgent":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        identity = f"{self.instance_id}#{uuid.uuid4().hex[:8]}".encode()
        sock = _dealer(zmq.Context.instance(), self.address, identity)
        try:
            sock.send_multipart(encode(Register(self.instance_id, self.role, self.url, os.getpid())))
            next_beat = time.monotonic() + self.interval_s
            while not self._stop.is_set():
                if sock.poll(int(max(0.0, min(0.2, next_beat - time.monotonic())) * 1000)):
                    self._handle(sock.recv_multipart())
                if time.monotonic() >= next_beat:
                    sock.send_multipart(encode(Heartbeat(self.instance_id)))
                    next_beat = time.monotonic() + self.interval_s
        except zmq.ZMQError as e:
            logger.warning("instance agent %s stopped: %s", self.instance_id, e)
        finally:
            sock.close(0)

    def _handle(self, frames) -> None:
        try:
            msg = decode_reply(frames)
        except ProtocolError as e:
            logger.warning("instance agent %s: %s", self.instance_id, e)
            return
        if isinstance(msg, Free) and self.on_free is not None:
            try:
                self.on_free(msg)
                self.freed += len(msg.keys)
            except Exception:
                logger.exception("pd_id=%s: freeing %d keys failed", msg.pd_id, len(msg.keys))


class AsyncCoordinatorClient:
    """asyncio client for the proxy: abort and query, never raising."""

    def __init__(self, address: str, timeout_s: float = 2.0):
        self.address = address
        self.timeout_s = timeout_s
        self._ctx = zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._lock = None

    async def _call(self, msg):
        import asyncio

        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one request in flight per socket keeps replies in order
            if self._sock is None:
                self._sock = self._ctx.socket(zmq.DEALER)
                self._sock.setsockopt(zmq.LINGER, 0)
                self._sock.connect(self.address)
            try:
                await self._sock.send_multipart(encode(msg))
                if await self._sock.poll(int(self.timeout_s * 1000)):
                    return decode_reply(await self._sock.recv_multipart())
            except (zmq.ZMQError, ProtocolError) as e:
                logger.warning("coordinator %s: %s", self.address, e)
            self._sock.close(0)
            self._sock = None
            return None

    async def abort(self, pd_id: str, reason: str = "") -> bool:
        return isinstance(await self._call(Abort(pd_id, reason)), Ack)

    async def query(self, pd_id: str = "") -> QueryReply | None:
        reply = await self._call(Query(pd_id))
        return reply if isinstance(reply, QueryReply) else None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
