"""The proxy's listening socket and the client connections it keeps, bounded (issue 18).

Each client connection costs a file descriptor, and each request up to two more upstream. So:
the soft descriptor limit is raised to the hard one at start; at most ``limit`` client
connections are open at once (by default a third of the descriptors, less a reserve): one more
is closed as soon as it is accepted, counted, and logged at most once a minute (before, 1,100 idle
connections used up 1,024 descriptors and the proxy logged 52k "Too many open files" lines in
10 s); and a connection that sends nothing, or nothing more after its last answer, is closed after
``CLIENT_KEEPALIVE_S`` (aiohttp's default keeps it about an hour).
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
FD_RESERVE = 64  # descriptors kept for everything but connections (logs, the coordinator, ...)


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


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # closed at once: the descriptor is back before the next accept


class Limiter:
    """The protocol factory of the listening socket: aiohttp's server while fewer than
    ``limit`` connections are open, else a connection closed at once."""

    def __init__(self, server: web.Server, limit: int) -> None:
        self.server, self.limit = server, limit
        self.refused = 0
        self._logged_at = float("-inf")

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.server.connections) < self.limit:
            return self.server()
        self.refused += 1
        now = time.monotonic()
        if now - self._logged_at >= 60:
            self._logged_at = now
            log.warning("%d client connections are open, the most allowed: new ones are closed at once "
                        "(%d so far; this is logged once a minute)", self.limit, self.refused)
        return _Refused()


class LimitedSite(web.SockSite):
    """A listening socket whose connections go through a ``Limiter``."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, limit: int) -> None:
        super().__init__(runner, sock)
        self.limiter: Limiter | None = None
        self._limit = limit

    async def start(self) -> None:
        await web.BaseSite.start(self)
        assert self._runner.server is not None
        self.limiter = Limiter(self._runner.server, self._limit)
        self._server = await asyncio.get_running_loop().create_server(self.limiter, sock=self._sock)


def make_runner(app: web.Application, keepalive_s: float = CLIENT_KEEPALIVE_S) -> web.AppRunner:
    return web.AppRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=keepalive_s)
