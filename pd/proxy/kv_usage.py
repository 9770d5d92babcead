"""How full each instance's KV cache is, read from its Prometheus ``/metrics`` (vLLM's
``vllm:kv_cache_usage_perc``, 1.0 = full), for choosing decode instances by load.

``KVUsage.watch`` scrapes every instance once per ``interval_s``, all at once, each scrape
bounded in time (``interval_s``, at most 2 s) and size (``MAX_BODY``); an instance that does not
answer, answers without the series or has not answered for ``STALE_SCRAPES`` intervals has no
known usage (``None``), and the proxy then goes by its in-flight count alone. See docs/design.md
("Routing").
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Callable

import aiohttp

logger = logging.getLogger("pd.proxy")
MAX_BODY = 8 << 20  # vLLM's /metrics is tens of KB; more than this is not read
STALE_SCRAPES = 3
# One sample line: name{labels} value; several engines (data parallel) give several lines.
_USAGE = re.compile(rb"^vllm:(?:kv_cache_usage_perc|gpu_cache_usage_perc)(?:\{[^}\n]*\})?[ \t]+(\S+)", re.M)


def parse_usage(text: bytes) -> float | None:
    """The fullest engine's KV-cache usage (0..1) in a /metrics body; None if it has none."""
    values = []
    for m in _USAGE.finditer(text):
        try:
            v = float(m.group(1))
        except ValueError:
            continue
        if 0.0 <= v <= 1.0:  # NaN fails both
            values.append(v)
    return max(values) if values else None


class KVUsage:
    """The last KV-cache usage read from each instance and when."""

    def __init__(self, interval_s: float):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self._seen: dict[str, tuple[float, float]] = {}  # url -> (usage, monotonic time read)

    def get(self, url: str) -> float | None:
        """``url``'s KV-cache usage, None when unknown or stale."""
        seen = self._seen.get(url)
        if seen is None or time.monotonic() - seen[1] > STALE_SCRAPES * self.interval_s:
            return None
        return seen[0]

    def set(self, url: str, usage: float | None) -> None:
        if usage is None:
            self._seen.pop(url, None)
        else:
            self._seen[url] = (usage, time.monotonic())

    def keep(self, urls: list[str]) -> None:
        """Forget every instance but ``urls`` (those removed from the pools through /pd/pools)."""
        for url in set(self._seen) - set(urls):
            del self._seen[url]

    async def scrape(self, session: aiohttp.ClientSession, url: str) -> None:
        """Read ``url``'s /metrics once (any failure: usage unknown)."""
        timeout = aiohttp.ClientTimeout(total=min(self.interval_s, 2.0))
        try:
            async with session.get(url + "/metrics", timeout=timeout) as r:
                body = bytearray()
                if r.status == 200:
                    async for piece in r.content.iter_chunked(1 << 16):
                        body += piece
                        if len(body) >= MAX_BODY:
                            break
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as e:
            logger.debug("kv usage: %s/metrics unreadable: %r", url, e)
            body = bytearray()
        self.set(url, parse_usage(bytes(body)))

    async def watch(self, session: aiohttp.ClientSession, urls: Callable[[], list[str]]) -> None:
        """Scrape every instance of ``urls()`` each ``interval_s`` until cancelled."""
        while True:
            started = time.monotonic()
            now = urls()
            self.keep(now)
            await asyncio.gather(*(self.scrape(session, u) for u in now))
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))
