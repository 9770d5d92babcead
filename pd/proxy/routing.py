"""The proxy's parts without I/O: choosing an instance, rewriting bodies, checking URLs, errors."""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlparse

from aiohttp import web

from common.config import ConfigError
from pd.proxy.kv_usage import KVUsage
from pd.proxy.prefix import PrefixIndex, prompt_blocks

POLICIES = ("prefix", "least_outstanding", "round_robin")
AFFINITY_ROLES = ("prefill", "colocated")  # the roles that compute prompts (prefix policy)
INDEX_ENTRIES = 1 << 16  # block hashes remembered per pool (under 25 MB, 8 owners each)
INDEX_OWNERS = 8  # instances remembered per block hash
KV_FULL = 0.95  # KV-cache usage from which an instance is avoided while another has room
ROUTE_OUTCOMES = ("hit", "spill", "miss")
# Keys that make no sense for a one-token, non-streamed prefill (or would stop it at one token).
DROP_FOR_PREFILL = ("stream_options", "min_tokens", "min_completion_tokens")


class Pool:
    """The instances of one role and how many requests each has in flight.

    ``least_outstanding`` picks the instance with the fewest requests in flight, breaking ties
    round-robin; ``round_robin`` ignores the load. ``prefix`` (docs/design.md, "Routing"): a
    pool that computes prompts (prefill, colocated) sends a prompt to the instance that was sent
    the longest run of its leading blocks (``pd.proxy.prefix``), among those with at most
    ``slack`` more requests in flight than the least loaded, else (no match) to the least
    loaded; every pool avoids an instance whose KV cache is ``KV_FULL`` while another has room,
    and breaks ties in load by KV-cache usage (read from /metrics every ``kv_poll_s``; 0: not
    read) before round-robin. ``routes`` counts the prefix choices: hit (to an instance with
    the longest match), spill (a longer match was too loaded), miss (no instance matched).
    """

    def __init__(self, role: str, urls: list[str], policy: str = "least_outstanding", *,
                 block_tokens: int = 256, slack: int = 2, kv_poll_s: float = 0.0):
        if policy not in POLICIES:
            raise ConfigError(f"policy {policy!r} is not allowed; choose one of {', '.join(POLICIES)}")
        self.role = role
        self.urls = list(urls)
        self.policy = policy
        self.outstanding: dict[str, int] = dict.fromkeys(self.urls, 0)
        self._rr = itertools.count()
        self.block_tokens, self.slack = block_tokens, slack
        prefix = policy == "prefix"
        self.index = PrefixIndex(INDEX_ENTRIES, INDEX_OWNERS) if prefix and role in AFFINITY_ROLES else None
        self.kv = KVUsage(kv_poll_s) if prefix and role != "prefill" and kv_poll_s > 0 else None
        self.routes: dict[str, int] = dict.fromkeys(ROUTE_OUTCOMES, 0)

    def pick(self, body: Any = None) -> str:
        """The instance the next request (its JSON ``body``, for prefix affinity) should go to."""
        if not self.urls:
            raise LookupError(f"no {self.role} instance is in the pool now")
        start = next(self._rr) % len(self.urls)
        order = self.urls[start:] + self.urls[:start]
        if self.policy == "round_robin":
            return order[0]
        if self.policy == "least_outstanding":
            return min(order, key=self.outstanding.__getitem__)  # min keeps the first of equals
        blocks = prompt_blocks(body, self.block_tokens) if self.index is not None and body is not None else []
        matched = self.index.match(blocks, self.urls) if blocks else {}
        least = min(self.outstanding[u] for u in self.urls)
        near = [u for u in order if self.outstanding[u] <= least + self.slack] if matched else order
        url = min(near, key=lambda u: (self._full(u), -matched.get(u, 0), self.outstanding[u], self._tenths(u)))
        if blocks:
            best = max((matched.get(u, 0) for u in self.urls), default=0)
            self.routes["miss" if not best else "hit" if matched.get(url, 0) == best else "spill"] += 1
            self.index.record(blocks, url)
        return url

    def _full(self, url: str) -> bool:
        usage = self.kv.get(url) if self.kv is not None else None
        return usage is not None and usage >= KV_FULL

    def _tenths(self, url: str) -> int:
        usage = self.kv.get(url) if self.kv is not None else None
        return int(usage * 10) if usage is not None else 0

    async def watch(self, session: Any) -> None:
        """Read the instances' KV-cache usage until cancelled (returns at once if not needed)."""
        if self.kv is not None:
            await self.kv.watch(session, lambda: self.urls)

    def set_urls(self, urls: list[str]) -> None:
        """Route to ``urls`` from now on; requests in flight on a removed instance finish there
        (its count stays until they have)."""
        self.urls = list(urls)
        for u in self.urls:
            self.outstanding.setdefault(u, 0)
        for u in [u for u, n in self.outstanding.items() if n == 0 and u not in self.urls]:
            del self.outstanding[u]

    @contextmanager
    def track(self, url: str) -> Iterator[None]:
        """Count one request in flight on ``url`` for the duration of the block."""
        self.outstanding[url] = self.outstanding.get(url, 0) + 1
        try:
            yield
        finally:
            self.outstanding[url] -= 1
            if not self.outstanding[url] and url not in self.urls:
                del self.outstanding[url]


def make_pool(role: str, urls: list[str], cfg: Any) -> Pool:
    """The pool of ``role`` as ``cfg`` (a ``pd.config.ProxyConfig``) sets its routing."""
    return Pool(role, urls, cfg.policy, block_tokens=cfg.prefix_block_tokens, slack=cfg.prefix_load_slack,
                kv_poll_s=cfg.kv_usage_poll_s)


def client_transfer_params(body: dict[str, Any]) -> str:
    """Why ``body`` is refused for naming a KV transfer itself ("" if it does not): only the proxy
    sets ``kv_transfer_params`` (vLLM also takes them from ``vllm_xargs``), or a client could make
    an instance publish or load KV under a pd_id of its choosing."""
    if body.get("kv_transfer_params") is not None:
        return "kv_transfer_params is set by the proxy; a client may not send it (leave it out)"
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict) and "kv_transfer_params" in xargs:
        return "vllm_xargs.kv_transfer_params is set by the proxy; a client may not send it (leave it out)"
    return ""


def prefill_body(body: dict[str, Any], pd_id: str) -> dict[str, Any]:
    """The prefill half: one token, not streamed, KV sent on as ``pd_id``."""
    out = {k: v for k, v in body.items() if k not in DROP_FOR_PREFILL}
    out["stream"] = False
    out["max_tokens"] = 1
    if "max_completion_tokens" in body:
        out["max_completion_tokens"] = 1
    out["kv_transfer_params"] = {"pd_id": pd_id, "do_remote_decode": True}
    return out


def decode_body(body: dict[str, Any], pd_id: str) -> dict[str, Any]:
    """The decode half: the client's request, its KV to be fetched as ``pd_id``."""
    return {**body, "kv_transfer_params": {"pd_id": pd_id, "do_remote_prefill": True}}


def parse_urls(value: str | None, flag: str) -> list[str]:
    """Split a comma-separated list of instance URLs, refusing anything but ``http(s)://host[:port]``."""
    urls = [u.strip().rstrip("/") for u in (value or "").split(",") if u.strip()]
    for u in urls:
        p = urlparse(u)
        try:
            p.port  # noqa: B018  raises ValueError on a bad port
            bad_port = False
        except ValueError:
            bad_port = True
        if p.scheme not in ("http", "https") or not p.hostname or bad_port or p.path or p.query or p.fragment:
            raise ConfigError(f"{flag}: {u!r} is not an instance URL like http://127.0.0.1:8100")
    dups = {u for u in urls if urls.count(u) > 1}
    if dups:
        raise ConfigError(f"{flag}: {sorted(dups)[0]!r} is listed more than once")
    return urls


def error_body(message: str, status: int, typ: str = "invalid_request_error") -> dict[str, Any]:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": typ, "param": None, "code": status}}


class UpstreamError(Exception):
    """An answer to relay instead of the decode stream: an upstream's error, or ours (502/504)."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json"):
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type

    def response(self, headers: dict[str, str]) -> web.Response:
        return web.Response(status=self.status, body=self.body, content_type=self.content_type, headers=headers)


def json_error(message: str, status: int, typ: str = "invalid_request_error") -> web.Response:
    """An OpenAI-style error answer."""
    return web.json_response(error_body(message, status, typ), status=status)
