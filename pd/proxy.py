"""`pd proxy`: an OpenAI-compatible HTTP front that splits each request into prefill and decode.

P/D mode: each request gets a ``pd_id``; the prefill half (``max_tokens=1``, not streamed) goes
to a prefill instance and the decode half to a decode instance, both at once (decode waits for
the KV at the coordinator). The client gets the decode instance's answer unchanged, streamed or
not, with header ``x-pd-id``. Upstream errors come back with their status and body; a client
that goes away cancels both halves and aborts the transfer at the coordinator.
Colocated mode: each request goes unchanged to one instance (the baseline).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import uuid
from urllib.parse import urlparse

import aiohttp
from aiohttp import web

from pd.config import ConfigError, ProxyConfig, merge
from pd.proxy_metrics import ProxyMetrics
from pd.proxy_routing import Pool

logger = logging.getLogger("pd.proxy")
DROP_FOR_PREFILL = ("stream_options", "min_tokens", "min_completion_tokens")


def error_body(message: str, status: int, typ: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": typ, "param": None, "code": status}}


def _json_error(message: str, status: int, typ: str = "invalid_request_error") -> web.Response:
    return web.json_response(error_body(message, status, typ), status=status)


class UpstreamError(Exception):
    def __init__(self, status: int, body: bytes, content_type: str):
        self.status, self.body, self.content_type = status, body, content_type


class Proxy:
    def __init__(self, prefill_urls: list[str], decode_urls: list[str], cfg: ProxyConfig | None = None,
                 coordinator: str | None = None, mode: str = "pd"):
        self.cfg = cfg or ProxyConfig()
        self.mode = mode
        if mode == "pd" and (not prefill_urls or not decode_urls):
            raise ConfigError("P/D mode needs at least one --prefill and one --decode URL")
        if mode == "colocated" and not decode_urls:
            raise ConfigError("colocated mode needs at least one instance URL")
        self.prefill = Pool("prefill", prefill_urls, self.cfg.policy)
        self.decode = Pool("decode", decode_urls, self.cfg.policy)
        self.coordinator_address = coordinator
        self.coord = None
        self.metrics = ProxyMetrics()
        self.session: aiohttp.ClientSession | None = None

    # ---- app ---------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/completions", self.handle_generate)
        app.router.add_post("/v1/chat/completions", self.handle_generate)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/pd/transfers/{pd_id}", self.handle_transfer)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app) -> None:
        timeout = aiohttp.ClientTimeout(total=self.cfg.upstream_timeout_s, sock_connect=10)
        self.session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1024))
        if self.coordinator_address:
            from pd.coord_client import AsyncCoordinatorClient

            self.coord = AsyncCoordinatorClient(self.coordinator_address)

    async def _cleanup(self, app) -> None:
        if self.session is not None:
            await self.session.close()
        if self.coord is not None:
            self.coord.close()

    def _headers(self, request: web.Request) -> dict:
        h = {"Content-Type": "application/json"}
        if "Authorization" in request.headers:
            h["Authorization"] = request.headers["Authorization"]
        return h

    # ---- generation --------------------------------------------------------------------

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.path
        t0 = request["t0"] = time.monotonic()
        try:
            body = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            self.metrics.request(endpoint, 400)
            return _json_error(f"request body is not valid JSON: {e}", 400)
        if not isinstance(body, dict):
            self.metrics.request(endpoint, 400)
            return _json_error("request body must be a JSON object", 400)
        if self.mode == "colocated":
            resp = await self._forward(request, endpoint, body, None)
        else:
            resp = await self._pd(request, endpoint, body)
        self.metrics.request(endpoint, resp.status, time.monotonic() - t0)
        return resp

    async def _pd(self, request: web.Request, endpoint: str, body: dict) -> web.StreamResponse:
        pd_id = uuid.uuid4().hex
        p_body = {k: v for k, v in body.items() if k not in DROP_FOR_PREFILL}
        p_body.update(stream=False, max_tokens=1)
        if "max_completion_tokens" in body:
            p_body["max_completion_tokens"] = 1
        p_body["kv_transfer_params"] = {"pd_id": pd_id, "do_remote_decode": True}
        d_body = dict(body, kv_transfer_params={"pd_id": pd_id, "do_remote_prefill": True})
        p_url = self.prefill.pick()
        prefill = asyncio.ensure_future(self._prefill(request, p_url, endpoint, p_body, pd_id))
        prefill.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
        try:
            resp = await self._forward(request, endpoint, d_body, pd_id, prefill)
        except BaseException:
            prefill.cancel()
            await self._abort(pd_id, "client went away")
            raise
        if resp.status >= 400:
            prefill.cancel()
            await self._abort(pd_id, f"decode answered {resp.status}")
        return resp

    async def _prefill(self, request, url: str, endpoint: str, body: dict, pd_id: str) -> None:
        """Run the prefill half; raise UpstreamError on an error answer."""
        with self.prefill.track(url):
            try:
                async with self.session.post(url + endpoint, json=body, headers=self._headers(request)) as r:
                    data = await r.read()
                    if r.status >= 400:
                        self.metrics.upstream_error("prefill")
                        logger.warning("pd_id=%s: prefill %s answered %d", pd_id, url, r.status)
                        raise UpstreamError(r.status, data, r.content_type)
            except aiohttp.ClientError as e:
                self.metrics.upstream_error("prefill")
                raise UpstreamError(502, json.dumps(error_body(f"prefill instance {url} unreachable: {e}", 502,
                                                               "upstream_error")).encode(), "application/json")
            except asyncio.TimeoutError:
                self.metrics.upstream_error("prefill")
                raise UpstreamError(504, json.dumps(error_body(f"prefill instance {url} timed out", 504,
                                                               "upstream_error")).encode(), "application/json")

    async def _forward(self, request: web.Request, endpoint: str, body: dict, pd_id: str | None,
                       prefill: asyncio.Future | None = None) -> web.StreamResponse:
        """Send ``body`` to a decode (or colocated) instance; relay the answer as it comes."""
        url = self.decode.pick()
        role = "decode" if self.mode == "pd" else "colocated"
        headers = {"x-pd-id": pd_id} if pd_id else {}
        with self.decode.track(url):
            upstream = asyncio.ensure_future(
                self.session.post(url + endpoint, json=body, headers=self._headers(request)))
            try:
                return await self._relay(request, url, role, headers, upstream, prefill, pd_id)
            except BaseException:
                upstream.cancel()
                raise

    async def _relay(self, request, url, role, headers, upstream, prefill, pd_id) -> web.StreamResponse:
        try:
            if prefill is not None:
                # Whichever comes first: a failed prefill cancels decode; otherwise wait on decode.
                await asyncio.wait([prefill, upstream], return_when=asyncio.FIRST_COMPLETED)
                if prefill.done() and prefill.exception() is not None:
                    upstream.cancel()
                    err = prefill.exception()
                    if isinstance(err, UpstreamError):
                        await self._abort(pd_id, f"prefill answered {err.status}")
                        return web.Response(status=err.status, body=err.body, content_type=err.content_type,
                                            headers=headers)
                    raise err
            r = await upstream
        except aiohttp.ClientError as e:
            self.metrics.upstream_error(role)
            return web.json_response(error_body(f"{role} instance {url} unreachable: {e}", 502, "upstream_error"),
                                     status=502, headers=headers)
        except asyncio.TimeoutError:
            self.metrics.upstream_error(role)
            return web.json_response(error_body(f"{role} instance {url} timed out", 504, "upstream_error"),
                                     status=504, headers=headers)
        async with r:
            if r.status >= 400:
                self.metrics.upstream_error(role)
                return web.Response(status=r.status, body=await r.read(), content_type=r.content_type,
                                    headers=headers)
            if r.content_type != "text/event-stream":
                return web.Response(status=r.status, body=await r.read(), content_type=r.content_type,
                                    headers=headers)
            resp = web.StreamResponse(status=r.status, headers={**headers, "Content-Type": "text/event-stream",
                                                                "Cache-Control": "no-cache"})
            await resp.prepare(request)
            first = True
            t0 = request.get("t0", time.monotonic())
            async for data in r.content.iter_any():
                if first:
                    self.metrics.ttft(time.monotonic() - t0)
                    first = False
                try:
                    await resp.write(data)
                except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                    logger.info("pd_id=%s: client went away mid-stream", pd_id)
                    await self._abort(pd_id, "client went away")
                    return resp
            await resp.write_eof()
            return resp

    async def _abort(self, pd_id: str | None, reason: str) -> None:
        if pd_id and self.coord is not None:
            logger.info("pd_id=%s: aborting (%s)", pd_id, reason)
            await self.coord.abort(pd_id, reason)

    # ---- other routes ------------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        url = self.decode.pick()
        try:
            async with self.session.get(url + "/v1/models", headers=self._headers(request)) as r:
                return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return _json_error(f"instance {url} unreachable: {e}", 502, "upstream_error")

    async def _healthy(self, url: str) -> bool:
        try:
            async with self.session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=3)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def handle_health(self, request: web.Request) -> web.Response:
        pools = [self.decode] + ([self.prefill] if self.mode == "pd" else [])
        checks = {p.role: dict(zip(p.urls, await asyncio.gather(*(self._healthy(u) for u in p.urls))))
                  for p in pools}
        ok = all(any(c.values()) for c in checks.values())
        return web.json_response({"status": "ok" if ok else "unavailable", "mode": self.mode, "upstreams": checks},
                                 status=200 if ok else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        counters = None
        if self.coord is not None:
            reply = await self.coord.query()
            counters = reply.counters if reply is not None else None
        self.metrics.set_inflight(self.prefill, self.decode)
        body = self.metrics.render(counters)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def handle_transfer(self, request: web.Request) -> web.Response:
        if self.coord is None:
            return _json_error("no coordinator configured", 503, "unavailable")
        reply = await self.coord.query(request.match_info["pd_id"])
        if reply is None:
            return _json_error("coordinator did not answer", 503, "unavailable")
        if reply.transfer is None:
            return _json_error(f"no transfer record for {request.match_info['pd_id']}", 404, "not_found")
        import msgspec

        return web.json_response(msgspec.to_builtins(reply.transfer))


# ---- CLI ---------------------------------------------------------------------------------


def _urls(value: str | None, flag: str) -> list[str]:
    urls = [u.strip().rstrip("/") for u in (value or "").split(",") if u.strip()]
    for u in urls:
        p = urlparse(u)
        if p.scheme not in ("http", "https") or not p.hostname or p.port is None and ":" in p.netloc:
            raise ConfigError(f"{flag}: {u!r} is not a URL like http://127.0.0.1:8100")
    return urls


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", help="prefill instance URLs, comma separated")
    p.add_argument("--decode", help="decode instance URLs, comma separated")
    p.add_argument("--colocated", help="colocated mode: plain instance URLs, comma separated")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--policy", choices=("least_outstanding", "round_robin"), default=None)
    p.add_argument("--coordinator", help="coordinator address, e.g. tcp://127.0.0.1:5570")
    p.add_argument("--upstream-timeout-s", type=float, default=None)


def run(args) -> int:
    import socket

    over = {k: v for k, v in {"host": args.host, "port": args.port, "policy": args.policy,
                              "upstream_timeout_s": args.upstream_timeout_s}.items() if v is not None}
    cfg = merge(ProxyConfig(), over, "proxy.")
    if args.colocated:
        proxy = Proxy([], _urls(args.colocated, "--colocated"), cfg, None, mode="colocated")
    else:
        proxy = Proxy(_urls(args.prefill, "--prefill"), _urls(args.decode, "--decode"), cfg, args.coordinator)
    try:
        sock = socket.create_server((cfg.host, cfg.port), reuse_port=False)
    except OSError as e:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: "
                          f"{'port is already in use' if e.errno == 98 else e}") from None
    print(f"pd proxy ({proxy.mode}) listening on http://{cfg.host}:{cfg.port}", flush=True)
    web.run_app(proxy.make_app(), sock=sock, print=None, handle_signals=True, access_log=None,
                handler_cancellation=True)
    return 0
