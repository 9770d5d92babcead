"""The proxy's parts without I/O: choosing an instance, rewriting bodies, checking URLs, errors."""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlparse

from aiohttp import web

from common.config import ConfigError

POLICIES = ("least_outstanding", "round_robin")
# Keys that make no sense for a one-token, non-streamed prefill (or would stop it at one token).
DROP_FOR_PREFILL = ("stream_options", "min_tokens", "min_completion_tokens")


class Pool:
    """The instances of one role and how many requests each has in flight.

    ``least_outstanding`` picks the instance with the fewest requests in flight, breaking ties
    round-robin; ``round_robin`` ignores the load.
    """

    def __init__(self, role: str, urls: list[str], policy: str = "least_outstanding"):
        if policy not in POLICIES:
            raise ConfigError(f"policy {policy!r} is not allowed; choose one of {', '.join(POLICIES)}")
        self.role = role
        self.urls = list(urls)
        self.policy = policy
        self.outstanding: dict[str, int] = dict.fromkeys(self.urls, 0)
        self._rr = itertools.count()

    def pick(self) -> str:
        """The instance the next request should go to."""
        if not self.urls:
            raise LookupError(f"no {self.role} instances configured")
        start = next(self._rr) % len(self.urls)
        order = self.urls[start:] + self.urls[:start]
        if self.policy == "round_robin":
            return order[0]
        return min(order, key=self.outstanding.__getitem__)  # min keeps the first of equals

    @contextmanager
    def track(self, url: str) -> Iterator[None]:
        """Count one request in flight on ``url`` for the duration of the block."""
        self.outstanding[url] += 1
        try:
            yield
        finally:
            self.outstanding[url] -= 1


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
