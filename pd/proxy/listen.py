"""The proxy's listening socket and the client connections it keeps, bounded (issue 18).

Each client connection costs a file descriptor, and each request up to two more upstream. So:
the soft descriptor limit is raised to the hard one at start; at most ``limit`` client
connections are open at once (by default a third of the descriptors, less a reserve): one more
is closed as soon as it is accepted, counted, and logged at most once a minute (before, 1,100 idle
connections used up 1,024 descriptors and the proxy logged 52k "Too many open files" lines in
10 s); a connection that sends nothing, or nothing more after its last answer, is closed after
``CLIENT_KEEPALIVE_S`` (aiohttp's default keeps it about an hour); and a request's line and
headers must all have come ``header_timeout_s`` after the connection opened (the first request)
or after their first byte (the next ones), else the connection is closed before the API key is
looked at (``Clock``; aiohttp has no such limit of its own). How long a body may take is the
generation route's (``relay.read_json``).
"""
from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time

from aiohttp import web

log = logging.getLogger("pd.proxy")

CLIENT_KEEPALIVE_S = 15.0
HEADER_TIMEOUT_S = 10.0
FD_RESERVE = 64  # descriptors kept for everything but connections (logs, the coordinator, ...)
LOG_EVERY_S = 60.0


def raise_fd_limit() -> int:
    """Raise this process's soft descriptor limit to its hard one; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, e)
    return soft


def connection_limit(fds: int) -> int:
    """Client connections to keep at most with ``fds`` descriptors (each request may hold two
    upstream connections beside its own)."""
    return max(16, (fds - FD_RESERVE) // 3)


class _Once:
    """A count, and a warning about it at most once a minute."""

    def __init__(self, what: str) -> None:
        self.what, self.count = what, 0
        self._logged_at = float("-inf")

    def __call__(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.warning("%s (%d so far; this is logged once a minute)", self.what, self.count)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # closed at once: the descriptor is back before the next accept


class _Guarded(asyncio.Protocol):
    """One client connection: aiohttp's handler behind the clock on its request headers."""

    def __init__(self, inner: asyncio.Protocol, clock: "Clock") -> None:
        self.inner, self.clock = inner, clock
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a request's headers are in (its handler runs)
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.clock.guards[self.inner] = self
        self._arm()  # the first request's headers are due this long after connecting
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy and self._timer is None:  # the first bytes of the next request
            self._arm()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.clock.guards.pop(self.inner, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.clock.header_timeout_s, self._expired)

    def _expired(self) -> None:
        self._timer = None
        self.clock.slow()
        if self.transport is not None:
            self.transport.abort()

    def started(self) -> None:
        """A request's headers are in: its clock stops."""
        self.busy = True
        self._disarm()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Clock:
    """How long a client may take to send a request's line and headers (``header_timeout_s``):
    wraps each connection's protocol (``guard``) and, as the app's first middleware, hears when a
    request's headers are in."""

    def __init__(self, header_timeout_s: float = HEADER_TIMEOUT_S) -> None:
        self.header_timeout_s = header_timeout_s
        self.guards: dict[asyncio.Protocol, _Guarded] = {}
        self.slow = _Once(f"a client sent a request's headers too slowly (more than {header_timeout_s:g} s, "
                          "proxy.header_timeout_s): its connection was closed")

    def guard(self, inner: asyncio.Protocol) -> asyncio.Protocol:
        return _Guarded(inner, self)

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        guard = self.guards.get(request.protocol)
        if guard is None:  # served without the clock (a plain aiohttp runner)
            return await handler(request)
        guard.started()
        try:
            return await handler(request)
        finally:
            guard.busy = False  # the next request's first bytes start its clock


class Limiter:
    """The protocol factory of the listening socket: aiohttp's server (on the ``clock``) while
    fewer than ``limit`` connections are open, else a connection closed at once."""

    def __init__(self, server: web.Server, limit: int, clock: Clock) -> None:
        self.server, self.limit, self.clock = server, limit, clock
        self.refused = _Once(f"{limit} client connections are open, the most allowed: new ones are closed at once")

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.server.connections) < self.limit:
            return self.clock.guard(self.server())
        self.refused()
        return _Refused()


class LimitedSite(web.SockSite):
    """A listening socket whose connections go through a ``Limiter``."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, limit: int, clock: Clock) -> None:
        super().__init__(runner, sock)
        self.limiter: Limiter | None = None
        self._limit, self._clock = limit, clock

    async def start(self) -> None:
        await web.BaseSite.start(self)
        assert self._runner.server is not None
        self.limiter = Limiter(self._runner.server, self._limit, self._clock)
        self._server = await asyncio.get_running_loop().create_server(self.limiter, sock=self._sock)


def make_runner(app: web.Application, keepalive_s: float = CLIENT_KEEPALIVE_S) -> web.AppRunner:
    return web.AppRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=keepalive_s)


async def answer_and_close(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """Send ``resp`` and close the connection at once (no lingering read of the unread body)."""
    resp.force_close()
    await resp.prepare(request)
    await resp.write_eof()
    request.protocol.force_close()
    return resp
