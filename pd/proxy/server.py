"""`pd proxy`: an OpenAI-compatible HTTP front that splits each request into prefill and decode.

P/D mode: each request gets a ``pd_id``; the prefill half (``max_tokens=1``, not streamed) goes
to a prefill instance and the decode half to a decode instance, both at once (decode waits for
the KV at the coordinator). The client gets the decode instance's answer unchanged, streamed or
not, with header ``x-pd-id``. A prefill that fails before the decode answer has begun cancels
decode and its error is returned; a decode error is returned as is; either aborts the transfer at
the coordinator, and so does a client that goes away (both halves are cancelled: closing the
upstream connection makes vLLM abort the request).

Colocated mode: each request goes unchanged to one instance (the baseline for benchmarks).

A request whose connection an instance drops before any answer (it closed a kept-alive
connection under it, e.g. waking from a stall) is sent once more on a new connection; idle
upstream connections are kept 4 s, under vLLM's 5 s keep-alive.

``upstream_timeout_s`` bounds every wait for an upstream's next bytes (the whole answer when not
streamed); running past it gives 504. The app must run with ``handler_cancellation=True`` (as
``Proxy.start`` and ``pd proxy`` do) for a client that goes away before the answer to be noticed.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import hmac
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Coroutine

import aiohttp
import msgspec
from aiohttp import web

from common.config import ConfigError, merge
from pd.config import ProxyConfig
from pd.proxy.metrics import CONTENT_TYPE, ProxyMetrics
from pd.proxy.routing import (
    POLICIES,
    Pool,
    UpstreamError,
    client_transfer_params,
    decode_body,
    error_body,
    parse_urls,
    prefill_body,
)

logger = logging.getLogger("pd.proxy")
SSE = "text/event-stream"
MODES = ("pd", "colocated")
GENERATE = ("/v1/completions", "/v1/chat/completions")
DONE_EVENT = b"data: [DONE]"
UPSTREAM_KEEPALIVE_S = 4.0


def _json_error(message: str, status: int, typ: str = "invalid_request_error") -> web.Response:
    return web.json_response(error_body(message, status, typ), status=status)


# request key: the client had the whole answer before it went away
COMPLETE = web.RequestKey("pd_answer_complete", bool) if hasattr(web, "RequestKey") else "pd_answer_complete"


def _finished(task: asyncio.Task) -> bool:
    """``task`` (a decode start) gave an answer the client has had to its end."""
    return (task.done() and not task.cancelled() and task.exception() is None
            and isinstance(task.result(), _Started) and task.result().complete)


class _ClientGone(Exception):
    def __init__(self, response: web.StreamResponse):
        self.response = response


@dataclass
class _Started:
    """A decode (or colocated) answer that has begun: its response and first bytes (or whole body)."""

    resp: aiohttp.ClientResponse
    first: bytes
    stream: bool
    complete: bool = False  # the client has had the whole answer (its ``data: [DONE]``)


class Proxy:
    """The proxy in front of ``prefill_urls``/``decode_urls`` (colocated mode: ``decode_urls`` only).

    ``coordinator`` is the coordinator's address (``coordinator_keys``: CurveZMQ ``pd.coordinator.curve.ClientKeys``);
    without one, aborts are skipped, ``/pd/transfers`` answers 503 and ``/metrics`` has only the
    proxy's own series.
    """

    def __init__(self, prefill_urls: list[str], decode_urls: list[str], cfg: ProxyConfig | None = None,
                 coordinator: str | None = None, mode: str = "pd", coordinator_keys: Any = None):
        self.cfg = cfg or ProxyConfig()
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r} is not allowed; choose one of {', '.join(MODES)}")
        if self.cfg.policy not in POLICIES:
            raise ConfigError(f"policy {self.cfg.policy!r} is not allowed; choose one of {', '.join(POLICIES)}")
        if mode == "pd" and (not prefill_urls or not decode_urls):
            raise ConfigError("P/D mode needs at least one prefill and one decode instance URL")
        if mode == "colocated" and not decode_urls:
            raise ConfigError("colocated mode needs at least one instance URL")
        self.mode = mode
        self.prefill = Pool("prefill", prefill_urls if mode == "pd" else [], self.cfg.policy)
        self.decode = Pool("decode" if mode == "pd" else "colocated", decode_urls, self.cfg.policy)
        self.coordinator_address = coordinator
        self.coordinator_keys = coordinator_keys
        # Bearer token for the upstream instances (vllm.api_key_file); None: forward the client's.
        self.upstream_token: str | None = None
        # Bearer token clients must send on /v1 routes (proxy.api_key_file, like vLLM's --api-key);
        # None: no check.
        self.api_key: str | None = None
        # An AsyncCoordinatorClient (made at startup from ``coordinator``), or any object with its API.
        self.coord: Any = None
        self.metrics = ProxyMetrics()
        self.session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- app ---------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application (run it with ``handler_cancellation=True``)."""
        app = web.Application(client_max_size=64 << 20, middlewares=[self._auth])
        for path in GENERATE:
            app.router.add_post(path, self.handle_generate)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/pd/transfers/{pd_id}", self.handle_transfer)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
        """Serve on ``host:port`` (0: a free port) in the running loop; returns the runner and port."""
        runner = web.AppRunner(self.make_app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        return runner, runner.addresses[0][1]

    async def _startup(self, app: web.Application) -> None:
        t = self.cfg.upstream_timeout_s
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, t), sock_read=t)
        # Idle upstream connections are dropped before vLLM's own keep-alive (5 s,
        # VLLM_HTTP_TIMEOUT_KEEP_ALIVE) closes them under a request sent on one.
        connector = aiohttp.TCPConnector(limit=1024, keepalive_timeout=UPSTREAM_KEEPALIVE_S)
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        if self.coordinator_address and self.coord is None:
            from pd.coordinator.client import AsyncCoordinatorClient

            self.coord = AsyncCoordinatorClient(self.coordinator_address, keys=self.coordinator_keys)

    async def _cleanup(self, app: web.Application) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        if self.coord is not None:
            self.coord.close()

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        """With ``api_key``: /v1 routes answer 401 unless the client sends ``Authorization: Bearer <key>``
        (as vLLM's --api-key; /health and /metrics stay open)."""
        if self.api_key is not None and request.path.startswith("/v1"):
            got = request.headers.get("Authorization", "")
            # surrogateescape: a header of non-UTF-8 bytes is a wrong key, not a 500
            if not hmac.compare_digest(got.encode("utf-8", "surrogateescape"), f"Bearer {self.api_key}".encode()):
                if request.path in GENERATE:  # bounded label values only
                    self.metrics.request(request.path, 401, 0.0)
                return _json_error("missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                   "with the key of proxy.api_key_file", 401, "authentication_error")
        return await handler(request)

    def _spawn(self, coro: Coroutine) -> asyncio.Task:
        """A task kept alive until done, its exception always retrieved (no 'never retrieved' noise)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: (self._tasks.discard(t), t.cancelled() or t.exception()))
        return task

    def _headers(self, request: web.Request) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.upstream_token is not None:
            h["Authorization"] = f"Bearer {self.upstream_token}"
        elif "Authorization" in request.headers:
            h["Authorization"] = request.headers["Authorization"]
        return h

    def _abort(self, pd_id: str | None, reason: str) -> None:
        """Abort ``pd_id`` at the coordinator, in the background (it must survive our cancellation)."""
        if pd_id is None:
            return
        logger.info("pd_id=%s: aborting the transfer (%s)", pd_id, reason)
        if self.coord is not None:
            self._spawn(self.coord.abort(pd_id, reason))

    def _fail(self, role: str, url: str, pd_id: str | None, status: int, body: bytes | None = None,
              content_type: str = "application/json", why: str = "") -> UpstreamError:
        """Count and log an upstream failure; the error to relay (ours when ``body`` is None)."""
        self.metrics.upstream_error(role)
        logger.warning("pd_id=%s: %s %s %s", pd_id or "-", role, url, why or f"answered {status}")
        if body is None:
            body = json.dumps(error_body(f"{role} instance {url} {why}", status, "upstream_error")).encode()
        return UpstreamError(status, body, content_type)

    # ---- generation --------------------------------------------------------------------

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions and /v1/chat/completions."""
        endpoint, t0 = request.path, time.monotonic()
        status = 499  # stays so if we are cancelled (the client went away)
        try:
            try:
                body = await request.json(loads=json.loads)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                status = 400
                return _json_error(f"request body is not valid JSON: {e}", 400)
            except RecursionError:
                status = 400
                return _json_error("request body is not valid JSON: nested too deeply", 400)
            except web.HTTPRequestEntityTooLarge:
                status = 413
                return _json_error(f"request body is larger than the {request.client_max_size} bytes allowed", 413)
            if not isinstance(body, dict):
                status = 400
                return _json_error("request body must be a JSON object", 400)
            refused = client_transfer_params(body)
            if refused:
                status = 400
                return _json_error(refused, 400)
            try:
                if self.mode == "pd":
                    resp = await self._pd(request, endpoint, body, t0)
                else:
                    resp = await self._colocated(request, endpoint, body, t0)
            except _ClientGone as gone:  # mid-stream: the response had begun, status stays 499
                return gone.response
            status = resp.status
            return resp
        finally:
            self.metrics.request(endpoint, 200 if request.get(COMPLETE) else status, time.monotonic() - t0)

    async def _pd(self, request: web.Request, endpoint: str, body: dict, t0: float) -> web.StreamResponse:
        pd_id = uuid.uuid4().hex
        p_url, d_url = self.prefill.pick(), self.decode.pick()
        headers = {"x-pd-id": pd_id}
        logger.debug("pd_id=%s: %s prefill=%s decode=%s stream=%s", pd_id, endpoint, p_url, d_url,
                     bool(body.get("stream")))
        with self.decode.track(d_url):
            prefill = self._spawn(self._prefill(request, p_url, endpoint, prefill_body(body, pd_id), pd_id))
            decode = self._spawn(self._start(request, "decode", d_url, endpoint, decode_body(body, pd_id), pd_id))
            try:
                pending = {prefill, decode}
                while not decode.done():
                    _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    if prefill.done() and not decode.done() and prefill.exception() is not None:
                        err = prefill.exception()
                        if not isinstance(err, UpstreamError):
                            raise err
                        self._discard(decode)
                        self._abort(pd_id, "prefill failed before decode answered")
                        return err.response(headers)
                try:
                    started = decode.result()
                except UpstreamError as e:
                    prefill.cancel()
                    self._abort(pd_id, f"decode failed ({e.status})")
                    return e.response(headers)
                prefill.add_done_callback(lambda t: self._late_prefill(t, pd_id))
                return await self._relay(request, started, headers, pd_id, "decode", t0)
            except BaseException as e:  # the client went away (or a bug: aiohttp answers 500)
                if _finished(decode):  # it hung up after [DONE]: the answer was whole, the KV consumed
                    logger.debug("pd_id=%s: client closed after the end of the answer", pd_id)
                    request[COMPLETE] = True
                    raise
                gone = isinstance(e, (asyncio.CancelledError, _ClientGone))
                if not isinstance(e, _ClientGone):  # that one was logged where it was noticed
                    logger.info("pd_id=%s: %s", pd_id, "client went away" if gone else f"failed: {e!r}")
                self._discard(prefill, decode)
                self._abort(pd_id, "client went away" if gone else "proxy error")
                raise

    def _late_prefill(self, task: asyncio.Task, pd_id: str) -> None:
        """Prefill failed after decode began answering: decode must stop waiting for that KV."""
        if not task.cancelled() and task.exception() is not None:
            self._abort(pd_id, "prefill failed after decode began answering")

    @staticmethod
    def _discard(*tasks: asyncio.Task) -> None:
        """Cancel upstream tasks; close a decode answer that has already begun."""
        for t in tasks:
            if not t.done():
                t.cancel()
            elif not t.cancelled() and t.exception() is None and isinstance(t.result(), _Started):
                t.result().resp.close()

    async def _colocated(self, request: web.Request, endpoint: str, body: dict, t0: float) -> web.StreamResponse:
        url = self.decode.pick()
        with self.decode.track(url):
            try:
                started = await self._start(request, "colocated", url, endpoint, body, None)
            except UpstreamError as e:
                return e.response({})
            try:
                return await self._relay(request, started, {}, None, "colocated", t0)
            except BaseException:
                if started.complete:
                    request[COMPLETE] = True
                raise

    async def _post(self, request: web.Request, role: str, url: str, endpoint: str, body: dict,
                    pd_id: str | None) -> aiohttp.ClientResponse:
        """POST ``body``; once more on a new connection when the instance dropped the connection
        before any answer (a kept-alive connection it closed under the request, e.g. after a stall:
        vLLM never saw that request)."""
        try:
            return await self.session.post(url + endpoint, json=body, headers=self._headers(request))
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            if not (isinstance(e, aiohttp.ServerDisconnectedError) or e.errno in (errno.ECONNRESET, errno.EPIPE)):
                raise
            self.metrics.upstream_retry(role)
            logger.info("pd_id=%s: %s %s dropped the connection before answering (%s); sending again on a new "
                        "connection", pd_id or "-", role, url, e)
        return await self.session.post(url + endpoint, json=body, headers=self._headers(request))

    async def _prefill(self, request: web.Request, url: str, endpoint: str, body: dict, pd_id: str) -> None:
        """Run the prefill half to its end; raise UpstreamError if it fails."""
        with self.prefill.track(url):
            try:
                r = await self._post(request, "prefill", url, endpoint, body, pd_id)
                try:
                    data = await r.read()
                finally:
                    r.release()
            except asyncio.TimeoutError:
                raise self._fail("prefill", url, pd_id, 504, why="timed out") from None
            except (aiohttp.ClientError, OSError) as e:
                raise self._fail("prefill", url, pd_id, 502, why=f"unreachable: {e}") from None
            if r.status >= 400:
                raise self._fail("prefill", url, pd_id, r.status, data, r.content_type)
            logger.debug("pd_id=%s: prefill %s done", pd_id, url)

    async def _start(self, request: web.Request, role: str, url: str, endpoint: str, body: dict,
                     pd_id: str | None) -> _Started:
        """Send ``body`` to ``url`` and wait until its answer begins (SSE) or is complete (otherwise)."""
        r = None
        try:
            r = await self._post(request, role, url, endpoint, body, pd_id)
            if r.status >= 400 or r.content_type != SSE:
                data = await r.read()  # read to the end: the connection goes back to the pool
                if r.status >= 400:
                    raise self._fail(role, url, pd_id, r.status, data, r.content_type)
                return _Started(r, data, stream=False)
            return _Started(r, await r.content.readany(), stream=True)
        except UpstreamError:
            raise
        except BaseException as e:
            if r is not None:
                r.close()
            if isinstance(e, asyncio.TimeoutError):
                raise self._fail(role, url, pd_id, 504, why="timed out") from None
            if isinstance(e, (aiohttp.ClientError, OSError)):
                raise self._fail(role, url, pd_id, 502, why=f"unreachable: {e}") from None
            raise

    async def _relay(self, request: web.Request, st: _Started, headers: dict[str, str], pd_id: str | None,
                     role: str, t0: float) -> web.StreamResponse:
        """Give the client the answer that began in ``st``, streaming the rest as it arrives."""
        if not st.stream:
            return web.Response(status=st.resp.status, body=st.first, content_type=st.resp.content_type,
                                headers=headers)
        done = False
        try:
            out = web.StreamResponse(status=st.resp.status,
                                     headers={**headers, "Content-Type": SSE, "Cache-Control": "no-cache"})
            await out.prepare(request)
            self.metrics.ttft(time.monotonic() - t0)
            chunk, tail = st.first, b""
            while chunk:
                try:
                    await out.write(chunk)
                except ConnectionError:  # ConnectionResetError, aiohttp's ClientConnectionResetError
                    if st.complete:  # the client hung up after [DONE]: nothing was lost
                        return out
                    logger.info("pd_id=%s: client went away mid-stream", pd_id or "-")
                    raise _ClientGone(out) from None
                tail = (tail + chunk)[-len(DONE_EVENT) - 8:]  # [DONE] may straddle two reads
                st.complete = st.complete or DONE_EVENT in tail
                try:
                    chunk = await st.resp.content.readany()
                except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as e:
                    if st.complete:  # the upstream's connection ended badly after a whole answer
                        break
                    timeout = isinstance(e, asyncio.TimeoutError)
                    err = self._fail(role, str(st.resp.url.origin()), pd_id, 504 if timeout else 502,
                                     why="timed out mid-stream" if timeout else f"failed mid-stream: {e!r}")
                    self._abort(pd_id, f"{role} failed mid-stream")
                    await self._write_quietly(out, b"data: " + err.body + b"\n\n")
                    return out
            done = True
            try:
                await out.write_eof()
            except ConnectionError:
                if not st.complete:
                    raise _ClientGone(out) from None
            return out
        finally:
            st.resp.release() if done else st.resp.close()

    @staticmethod
    async def _write_quietly(out: web.StreamResponse, data: bytes) -> None:
        try:
            await out.write(data)
            await out.write_eof()
        except ConnectionError:
            pass

    # ---- other routes ------------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        """GET /v1/models, from a decode (or colocated) instance; in P/D mode 503 until a prefill
        instance is up too (clients that wait for /v1/models would otherwise send requests that fail)."""
        if self.mode == "pd" and not any(await asyncio.gather(*(self._healthy(u) for u in self.prefill.urls))):
            return _json_error("no prefill instance is up yet, so requests would fail (GET /health shows each "
                               "instance); try again shortly", 503, "unavailable")
        url = self.decode.pick()
        try:
            async with self.session.get(url + "/v1/models", headers=self._headers(request)) as r:
                return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)
        except asyncio.TimeoutError:
            return _json_error(f"{self.decode.role} instance {url} timed out", 504, "upstream_error")
        except (aiohttp.ClientError, OSError) as e:
            return _json_error(f"{self.decode.role} instance {url} unreachable: {e}", 502, "upstream_error")

    async def _healthy(self, url: str) -> bool:
        try:
            t = aiohttp.ClientTimeout(total=min(3.0, self.cfg.upstream_timeout_s))
            async with self.session.get(url + "/health", timeout=t) as r:
                return r.status == 200
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def handle_health(self, request: web.Request) -> web.Response:
        """GET /health: each upstream's /health; 503 unless every role has a healthy instance."""
        pools = [p for p in (self.prefill, self.decode) if p.urls]
        results = await asyncio.gather(*(asyncio.gather(*(self._healthy(u) for u in p.urls)) for p in pools))
        checks = {p.role: dict(zip(p.urls, ok)) for p, ok in zip(pools, results)}
        ok = all(any(c.values()) for c in checks.values())
        return web.json_response({"status": "ok" if ok else "unavailable", "mode": self.mode,
                                  "coordinator": self.coordinator_address, "upstreams": checks},
                                 status=200 if ok else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        """GET /metrics: the proxy's series, plus the coordinator's counters when it answers."""
        counters = None
        if self.coord is not None:
            reply = await self.coord.query()
            counters = reply.counters if reply is not None else None
        body = self.metrics.render((self.prefill, self.decode), counters)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def handle_transfer(self, request: web.Request) -> web.Response:
        """GET /pd/transfers/{pd_id}: the coordinator's record of one transfer."""
        pd_id = request.match_info["pd_id"]
        if self.coord is None:
            return _json_error("no coordinator configured", 503, "unavailable")
        reply = await self.coord.query(pd_id)
        if reply is None:
            return _json_error("the coordinator did not answer", 503, "unavailable")
        if reply.transfer is None:
            return _json_error(f"no transfer record for {pd_id}", 404, "not_found")
        return web.json_response(msgspec.to_builtins(reply.transfer))


# ---- CLI ---------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pd proxy``."""
    p.add_argument("--prefill", help="prefill instance URLs, comma separated")
    p.add_argument("--decode", help="decode instance URLs, comma separated")
    p.add_argument("--colocated", help="colocated mode: plain instance URLs, comma separated")
    p.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    p.add_argument("--policy", choices=POLICIES, default=None, help="instance choice (default least_outstanding)")
    p.add_argument("--coordinator", help="coordinator address, e.g. tcp://127.0.0.1:5570")
    p.add_argument("--coordinator-keys-dir", metavar="DIR",
                   help="CurveZMQ keys for the coordinator (coordinator.keys_dir; see pd keys)")
    p.add_argument("--coordinator-client-key", default="client", metavar="NAME",
                   help="this client's keypair in DIR (default %(default)s)")
    p.add_argument("--upstream-timeout-s", type=float, default=None,
                   help="longest wait for an upstream's next bytes (default 600)")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="clients must send 'Authorization: Bearer <the token in FILE>' on /v1 routes "
                        "(proxy.api_key_file, like vLLM's --api-key)")
    p.add_argument("--upstream-api-key-file", metavar="FILE",
                   help="send the bearer token in FILE to the instances (vllm.api_key_file) instead of the client's")


def _listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port))
    except OSError as e:
        why = "the port is already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None


def run(args: argparse.Namespace) -> int:
    """``pd proxy``: serve until interrupted. Bad options raise ConfigError (the CLI exits 2)."""
    over = {k: v for k, v in {"host": args.host, "port": args.port, "policy": args.policy,
                              "upstream_timeout_s": args.upstream_timeout_s,
                              "api_key_file": getattr(args, "api_key_file", None)}.items() if v is not None}
    cfg = merge(ProxyConfig(), over, "proxy.")
    if args.colocated:
        if args.prefill or args.decode:
            raise ConfigError("--colocated cannot be combined with --prefill/--decode")
        proxy = Proxy([], parse_urls(args.colocated, "--colocated"), cfg, None, mode="colocated")
    else:
        keys = None
        if getattr(args, "coordinator_keys_dir", None):
            from pd.coordinator.curve import load_client_keys

            keys = load_client_keys(args.coordinator_keys_dir, args.coordinator_client_key, "--coordinator-keys-dir")
        proxy = Proxy(parse_urls(args.prefill, "--prefill"), parse_urls(args.decode, "--decode"), cfg,
                      args.coordinator, coordinator_keys=keys)
    if getattr(args, "upstream_api_key_file", None):
        from pd.coordinator.curve import read_token

        proxy.upstream_token = read_token(args.upstream_api_key_file, "--upstream-api-key-file")
    if cfg.api_key_file:
        from pd.coordinator.curve import read_token

        proxy.api_key = read_token(cfg.api_key_file, "--api-key-file (proxy.api_key_file)")
    sock = _listen(cfg.host, cfg.port)
    print(f"pd proxy ({proxy.mode}) listening on http://{cfg.host}:{cfg.port}", flush=True)
    web.run_app(proxy.make_app(), sock=sock, print=None, access_log=None, handler_cancellation=True,
                shutdown_timeout=5)
    return 0
