"""The proxy's pools changed while it serves: ``GET/PUT /pd/pools`` for a launcher that adds,
removes and restarts instances (``pd launch --ray``, launch/ray_launch.py).

Only with ``pd proxy --admin-token-file FILE``: the requests must carry the header
``X-PD-Admin-Token: <token>`` (the client API key, if any, still goes in ``Authorization``).
``PUT`` sets a pool's URLs: new requests go to the new list at once, requests in flight on a
removed instance finish there. Both answer the pools with each URL's requests in flight, the
proxy's clock (``now``) and when the oldest request in flight began (``oldest``, same clock):
a request begun before a removal has ended once ``oldest`` is later than that removal's
``now`` (how a launcher drains an instance before stopping it; docs/design.md).
A request that finds a pool empty (its only instance is being restarted) answers 503.
"""
from __future__ import annotations

import hmac
import itertools
import time
from typing import Any

from aiohttp import web

from pd.proxy.routing import json_error, parse_urls

ADMIN_HEADER = "X-PD-Admin-Token"
POOLS_PATH = "/pd/pools"


class PoolAdmin:
    """The admin routes and the in-flight record of one ``pd.proxy.server.Proxy``."""

    def __init__(self, proxy: Any, token: str):
        self.proxy = proxy
        self.token = token
        self.inflight: dict[int, float] = {}  # request number -> when it began (monotonic)
        self._ids = itertools.count()

    def install(self, app: web.Application) -> None:
        app.middlewares.append(self._track)
        app.router.add_get(POOLS_PATH, self.handle_get)
        app.router.add_put(POOLS_PATH, self.handle_put)

    def _pools(self) -> dict:
        p = self.proxy
        pools = {pool.role: pool for pool in (p.prefill, p.decode)}
        return {"pools": {role: {"urls": list(pool.urls), "outstanding": dict(pool.outstanding)}
                          for role, pool in pools.items()},
                "now": time.monotonic(), "oldest": min(self.inflight.values(), default=None)}

    @web.middleware
    async def _track(self, request: web.Request, handler) -> web.StreamResponse:
        """Remember when each generate request began; an empty pool answers 503."""
        if request.method != "POST" or not request.path.startswith("/v1/"):
            return await handler(request)
        n = next(self._ids)
        self.inflight[n] = time.monotonic()
        try:
            return await handler(request)
        except LookupError as e:  # Pool.pick: no instance in a pool right now
            return json_error(f"{e}: an instance is being restarted or added; try again shortly", 503, "unavailable")
        finally:
            del self.inflight[n]

    def _refused(self, request: web.Request) -> web.Response | None:
        got = request.headers.get(ADMIN_HEADER, "")
        if hmac.compare_digest(got.encode("utf-8", "surrogateescape"), self.token.encode()):
            return None
        return json_error(f"missing or wrong {ADMIN_HEADER} header (the token of --admin-token-file)", 401,
                          "authentication_error")

    async def handle_get(self, request: web.Request) -> web.Response:
        """GET /pd/pools: each pool's URLs and requests in flight."""
        return self._refused(request) or web.json_response(self._pools())

    async def handle_put(self, request: web.Request) -> web.Response:
        """PUT /pd/pools {"prefill": [URL...], "decode": [URL...]}: route to these from now on."""
        refused = self._refused(request)
        if refused:
            return refused
        try:
            body = await request.json()
        except ValueError as e:
            return json_error(f"request body is not valid JSON: {e}", 400)
        pools = {pool.role: pool for pool in (self.proxy.prefill, self.proxy.decode)}
        if not isinstance(body, dict) or not body or set(body) - set(pools):
            return json_error(f"give a JSON object of URL lists with keys among {', '.join(pools)}", 400)
        try:
            new = {role: parse_urls(",".join(urls), role) for role, urls in body.items()
                   if isinstance(urls, list) and all(isinstance(u, str) for u in urls)}
        except ValueError as e:
            return json_error(str(e), 400)
        if len(new) != len(body):
            return json_error("each pool is a list of URL strings", 400)
        for role, urls in new.items():
            pools[role].set_urls(urls)
        return web.json_response(self._pools())
