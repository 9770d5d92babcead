"""The proxy's Prometheus metrics, in a registry of its own (several proxies may share a process)."""
from __future__ import annotations

import re
from typing import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pd.proxy.routing import Pool

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ProxyMetrics:
    """Counters and histograms of one proxy; ``render`` adds the coordinator's counters as gauges."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pdkv_proxy_requests", "client requests by endpoint and status "
                                "(499: the client went away)", ["endpoint", "status"], registry=r)
        self.upstream_errors = Counter("pdkv_proxy_upstream_errors", "error answers, unreachable instances and "
                                       "timeouts by upstream role", ["role"], registry=r)
        self.upstream_retries = Counter("pdkv_proxy_upstream_retries", "requests sent again on a new connection "
                                        "because the instance dropped the first before answering", ["role"],
                                        registry=r)
        self.inflight = Gauge("pdkv_proxy_inflight", "requests in flight per upstream instance", ["role", "url"],
                              registry=r)
        self.latency = Histogram("pdkv_proxy_request_latency_seconds", "time to the end of a successful answer",
                                 registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.paths = Counter("pdkv_proxy_first_token_path", "P/D requests by where their first token came "
                             "from (prefill, prefill_only: token 1 ended the answer, decode: the old flow, "
                             "decode_only: several sequences, answered by a decode instance alone) and "
                             "why (the reason for the last two)", ["path", "why"], registry=r)
        self.early_decodes = Counter("pdkv_proxy_early_decode", "greedy first-token requests whose decode half "
                                     "went out with the prefill half, by outcome: handed (its answer from token 2, "
                                     "handed token 1), used (its token 1 was the prefill's), differed or failed "
                                     "(a decode request after the prefill answered instead), unshown (token 1 "
                                     "had no text: the client's request went to the decode)", ["outcome"],
                                     registry=r)
        self.prefix_routes = Gauge("pdkv_proxy_prefix_routes", "prefix-policy choices since start, by pool and "
                                   "outcome: hit (to an instance with the longest prefix match), spill (a longer "
                                   "match was too loaded), miss (no instance matched)", ["role", "outcome"],
                                   registry=r)
        self.ttft_s = Histogram("pdkv_proxy_ttft_seconds", "time to the first streamed bytes of the answer",
                                registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status < 400:
            self.latency.observe(seconds)

    def upstream_error(self, role: str) -> None:
        self.upstream_errors.labels(role).inc()

    def upstream_retry(self, role: str) -> None:
        self.upstream_retries.labels(role).inc()

    def early(self, outcome: str) -> None:
        self.early_decodes.labels(outcome).inc()

    def path(self, path: str, why: str = "") -> None:
        self.paths.labels(path, why).inc()

    def ttft(self, seconds: float) -> None:
        self.ttft_s.observe(seconds)

    def render(self, pools: Iterable[Pool], coordinator_counters: dict[str, float] | None) -> bytes:
        """The Prometheus text exposition, in-flight gauges refreshed from ``pools``."""
        for pool in pools:
            for url, n in pool.outstanding.items():
                self.inflight.labels(pool.role, url).set(n)
            if pool.index is not None:
                for outcome, n in pool.routes.items():
                    self.prefix_routes.labels(pool.role, outcome).set(n)
        text = generate_latest(self.registry)
        if coordinator_counters:
            lines = []
            for k, v in sorted(coordinator_counters.items()):
                name = "pdkv_coordinator_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)
                lines.append(f"# HELP {name} coordinator counter {k} (at scrape time)\n"
                             f"# TYPE {name} gauge\n{name} {float(v)!r}\n")
            text += "".join(lines).encode()
        return text
