"""`pd proxy`: an OpenAI-compatible HTTP front that splits each request into prefill and decode.

The aiohttp app (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``,
``/metrics``, ``/pd/transfers/{pd_id}``) and the CLI; how a request is split and its answer
relayed is ``relay``. Idle upstream connections are kept 4 s, under vLLM's 5 s keep-alive.

The app must run with ``handler_cancellation=True`` (as ``Proxy.start`` and ``pd proxy`` do) for
a client that goes away before the answer to be noticed.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import hmac
import logging
import signal
import socket
from typing import Any

import aiohttp
from aiohttp import web

from common.config import ConfigError, merge
from pd.config import ProxyConfig
from pd.coordinator.client import AsyncCoordinatorClient
from pd.coordinator.curve import load_client_keys, read_token
from pd.proxy.listen import (
    CLIENT_KEEPALIVE_S,
    Clock,
    LimitedSite,
    connection_limit,
    make_runner,
    raise_fd_limit,
)
from pd.coordinator.protocol import ID_RULE, valid_id
from pd.proxy.metrics import CONTENT_TYPE, ProxyMetrics
from pd.proxy.pools import PoolAdmin
from pd.proxy.relay import Relay
from pd.proxy.routing import POLICIES, json_error, make_pool, parse_urls
from pd.proxy.timeline import ProxyTimeline

logger = logging.getLogger("pd.proxy")
MODES = ("pd", "colocated")
GENERATE = ("/v1/completions", "/v1/chat/completions")
UPSTREAM_KEEPALIVE_S = 4.0
METRICS_COORDINATOR_WAIT_S = 1.0


class Proxy(Relay):
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
        self.prefill = make_pool("prefill", prefill_urls if mode == "pd" else [], self.cfg)
        self.decode = make_pool("decode" if mode == "pd" else "colocated", decode_urls, self.cfg)
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
        self.timeline = ProxyTimeline()  # each P/D request's events, the most recent ones
        self.session: aiohttp.ClientSession | None = None
        self.first_token = self.cfg.first_token
        self.chat_first_token = self.cfg.chat_first_token
        self.early_decode = self.cfg.early_decode
        self._tasks: set[asyncio.Task] = set()
        self.site: LimitedSite | None = None  # where it listens, once started
        self.clock = Clock(self.cfg.header_timeout_s)  # on each client's request headers
        self._counters: asyncio.Future | None = None  # the coordinator query /metrics scrapes share
        self.admin: PoolAdmin | None = None  # GET/PUT /pd/pools (--admin-token-file)

    # ---- app ---------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application (run it with ``handler_cancellation=True``)."""
        app = web.Application(client_max_size=64 << 20, middlewares=[self.clock.middleware, self._auth])
        for path in GENERATE:
            app.router.add_post(path, self.handle_generate)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/pd/transfers/{pd_id}", self.handle_transfer)
        if self.admin is not None:
            self.admin.install(app)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None,
                    limit: int | None = None, keepalive_s: float = CLIENT_KEEPALIVE_S) -> tuple[web.AppRunner, int]:
        """Serve on ``sock`` or ``host:port`` (0: a free port) in the running loop, at most
        ``limit`` client connections at once (default from the descriptor limit, raised to its
        hard value; pd/proxy/listen.py); returns the runner and the port."""
        if sock is None:
            sock = _listen(host, port)
        runner = make_runner(self.make_app(), keepalive_s)
        await runner.setup()
        self.site = LimitedSite(runner, sock, limit if limit is not None else connection_limit(raise_fd_limit()),
                                 self.clock)
        await self.site.start()
        return runner, sock.getsockname()[1]

    async def _startup(self, app: web.Application) -> None:
        t = self.cfg.upstream_timeout_s
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, t), sock_read=t)
        # Idle upstream connections are dropped before vLLM's own keep-alive (5 s,
        # VLLM_HTTP_TIMEOUT_KEEP_ALIVE) closes them under a request sent on one.
        connector = aiohttp.TCPConnector(limit=1024, keepalive_timeout=UPSTREAM_KEEPALIVE_S)
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        for pool in (self.prefill, self.decode):  # KV-cache usage for routing (prefix policy)
            self._spawn(pool.watch(self.session))
        if self.coordinator_address and self.coord is None:
            self.coord = AsyncCoordinatorClient(self.coordinator_address, keys=self.coordinator_keys)

    async def _cleanup(self, app: web.Application) -> None:
        if self._counters is not None:
            self._counters.cancel()
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
        if self.api_key is not None and request.path.startswith(("/v1", "/pd/")):
            got = request.headers.get("Authorization", "")
            # surrogateescape: a header of non-UTF-8 bytes is a wrong key, not a 500
            if not hmac.compare_digest(got.encode("utf-8", "surrogateescape"), f"Bearer {self.api_key}".encode()):
                if request.path in GENERATE:  # bounded label values only
                    self.metrics.request(request.path, 401, 0.0)
                return json_error("missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                  "with the key of proxy.api_key_file", 401, "authentication_error")
        return await handler(request)

    # ---- other routes ------------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        """GET /v1/models, from a decode (or colocated) instance; in P/D mode 503 until a prefill
        instance is up too (clients that wait for /v1/models would otherwise send requests that fail)."""
        if self.mode == "pd" and not any(await asyncio.gather(*(self._healthy(u) for u in self.prefill.urls))):
            return json_error("no prefill instance is up yet, so requests would fail (GET /health shows each "
                              "instance); try again shortly", 503, "unavailable")
        url = self.decode.pick()
        try:
            async with self.session.get(url + "/v1/models", headers=self._headers(request)) as r:
                return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)
        except asyncio.TimeoutError:
            return json_error(f"{self.decode.role} instance {url} timed out", 504, "upstream_error")
        except (aiohttp.ClientError, OSError) as e:
            return json_error(f"{self.decode.role} instance {url} unreachable: {e}", 502, "upstream_error")

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
        body = self.metrics.render((self.prefill, self.decode), await self._coordinator_counters())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _coordinator_counters(self) -> dict | None:
        """The coordinator's counters for /metrics: scrapes at the same time share one query, and
        none waits more than ``METRICS_COORDINATOR_WAIT_S`` (a hung coordinator once made every
        scrape queue behind the others' 2 s timeouts: no answer in 35 s); None without them."""
        if self.coord is None:
            return None
        if self._counters is None or self._counters.done():
            self._counters = asyncio.ensure_future(self.coord.query())
        try:
            reply = await asyncio.wait_for(asyncio.shield(self._counters), METRICS_COORDINATOR_WAIT_S)
        except asyncio.TimeoutError:
            return None
        return reply.counters if reply is not None else None

    async def handle_transfer(self, request: web.Request) -> web.Response:
        """GET /pd/transfers/{pd_id}: the coordinator's record of one transfer, with its timeline and
        spans (the proxy's events and the coordinator's, ``pd.proxy.timeline``)."""
        pd_id = request.match_info["pd_id"]
        if not valid_id(pd_id):
            return json_error(f"{pd_id[:64]!r} is not a pd_id: {ID_RULE}", 400, "invalid_request_error")
        if self.coord is None:
            return json_error("no coordinator configured", 503, "unavailable")
        reply = await self.coord.query(pd_id)
        if reply is None:
            return json_error("the coordinator did not answer", 503, "unavailable")
        if reply.transfer is None:
            return json_error(f"no transfer record for {pd_id}", 404, "not_found")
        return web.json_response(self.timeline.view(reply.transfer))


# ---- CLI ---------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pd proxy``."""
    p.add_argument("--prefill", help="prefill instance URLs, comma separated")
    p.add_argument("--decode", help="decode instance URLs, comma separated")
    p.add_argument("--colocated", help="colocated mode: plain instance URLs, comma separated")
    p.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    p.add_argument("--policy", choices=POLICIES, default=None,
                   help="instance choice (default prefix; docs/design.md, 'Routing')")
    p.add_argument("--prefix-block-tokens", type=int, default=None,
                   help="prefix policy: tokens per prompt block (text: 4x as many bytes; default 256)")
    p.add_argument("--prefix-load-slack", type=int, default=None,
                   help="prefix policy: requests in flight beyond the least loaded instance that the one holding "
                        "a prompt's prefix may have and still get it (default 2)")
    p.add_argument("--kv-usage-poll-s", type=float, default=None,
                   help="prefix policy: seconds between reads of decode instances' KV-cache usage (/metrics); "
                        "0 = not read (default 1)")
    p.add_argument("--coordinator", help="coordinator address, e.g. tcp://127.0.0.1:5570")
    p.add_argument("--coordinator-keys-dir", metavar="DIR",
                   help="CurveZMQ keys for the coordinator (coordinator.keys_dir; see pd keys)")
    p.add_argument("--coordinator-client-key", default="client", metavar="NAME",
                   help="this client's keypair in DIR (default %(default)s)")
    p.add_argument("--upstream-timeout-s", type=float, default=None,
                   help="longest wait for an upstream's next bytes (default 600)")
    p.add_argument("--header-timeout-s", type=float, default=None,
                   help="longest time a client may take to send a request's line and headers (default 10)")
    p.add_argument("--body-timeout-s", type=float, default=None,
                   help="longest time a client may take to send a request's body (default 30)")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="clients must send 'Authorization: Bearer <the token in FILE>' on /v1 routes "
                        "(proxy.api_key_file, like vLLM's --api-key)")
    p.add_argument("--first-token", choices=("prefill", "decode"), default=None,
                   help="where token 1 comes from (default prefill; see the README, 'The first token')")
    p.add_argument("--early-decode", choices=("greedy", "greedy_recompute", "never"), default=None,
                   help="greedy (default): a greedy request's decode half goes out with its prefill half and "
                        "is handed token 1 by the prefill (see the README, 'The first token'); greedy_recompute: "
                        "the same, computing token 1 itself; never: once the prefill has answered")
    p.add_argument("--no-chat-first-token", action="store_true",
                   help="chat requests take the old flow (the instances parse tool calls or reasoning)")
    p.add_argument("--admin-token-file", metavar="FILE",
                   help="serve GET/PUT /pd/pools (change the instances while serving) to requests with this token")
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
                              "prefix_block_tokens": getattr(args, "prefix_block_tokens", None),
                              "prefix_load_slack": getattr(args, "prefix_load_slack", None),
                              "kv_usage_poll_s": getattr(args, "kv_usage_poll_s", None),
                              "upstream_timeout_s": args.upstream_timeout_s,
                              "header_timeout_s": getattr(args, "header_timeout_s", None),
                              "body_timeout_s": getattr(args, "body_timeout_s", None),
                              "api_key_file": getattr(args, "api_key_file", None),
                              "first_token": getattr(args, "first_token", None),
                              "early_decode": getattr(args, "early_decode", None),
                              "chat_first_token": False if getattr(args, "no_chat_first_token", False) else None,
                              }.items() if v is not None}
    cfg = merge(ProxyConfig(), over, "proxy.")
    if args.colocated:
        if args.prefill or args.decode:
            raise ConfigError("--colocated cannot be combined with --prefill/--decode")
        proxy = Proxy([], parse_urls(args.colocated, "--colocated"), cfg, None, mode="colocated")
    else:
        keys = None
        if getattr(args, "coordinator_keys_dir", None):
            keys = load_client_keys(args.coordinator_keys_dir, args.coordinator_client_key, "--coordinator-keys-dir")
        proxy = Proxy(parse_urls(args.prefill, "--prefill"), parse_urls(args.decode, "--decode"), cfg,
                      args.coordinator, coordinator_keys=keys)
    if getattr(args, "upstream_api_key_file", None):
        proxy.upstream_token = read_token(args.upstream_api_key_file, "--upstream-api-key-file")
    if getattr(args, "admin_token_file", None):
        proxy.admin = PoolAdmin(proxy, read_token(args.admin_token_file, "--admin-token-file"))
    if cfg.api_key_file:
        proxy.api_key = read_token(cfg.api_key_file, "--api-key-file (proxy.api_key_file)")
    sock = _listen(cfg.host, cfg.port)
    asyncio.run(_serve(proxy, sock, f"pd proxy ({proxy.mode}) listening on http://{cfg.host}:{cfg.port}"))
    return 0


async def _serve(proxy: Proxy, sock: socket.socket, banner: str) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly (the coordinator client, the session)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner, _ = await proxy.start(sock=sock)
    print(banner, flush=True)
    try:
        await stop.wait()
    finally:
        await runner.shutdown()
        await runner.cleanup()
