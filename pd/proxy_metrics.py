"""The proxy's Prometheus metrics, in a registry of its own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ProxyMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pdkv_proxy_requests", "requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.upstream_errors = Counter("pdkv_proxy_upstream_errors", "upstream errors by role", ["role"], registry=r)
        self.inflight = Gauge("pdkv_proxy_inflight", "requests in flight per upstream", ["role", "url"], registry=r)
        self.latency = Histogram("pdkv_proxy_request_latency_seconds", "time to the end of the answer", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.ttft_s = Histogram("pdkv_proxy_ttft_seconds", "time to the first streamed bytes from decode",
                                registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

    def request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if seconds is not None:
            self.latency.observe(seconds)

    def upstream_error(self, role: str) -> None:
        self.upstream_errors.labels(role).inc()

    def ttft(self, seconds: float) -> None:
        self.ttft_s.observe(seconds)

    def set_inflight(self, *pools) -> None:
        for pool in pools:
            for url, n in pool.outstanding.items():
                self.inflight.labels(pool.role, url).set(n)

    def render(self, coordinator_counters: dict | None) -> bytes:
        text = generate_latest(self.registry)
        if coordinator_counters:
            lines = [f"# TYPE pdkv_coordinator_{k} gauge\npdkv_coordinator_{k} {float(v)}"
                     for k, v in sorted(coordinator_counters.items())]
            text += ("\n".join(lines) + "\n").encode()
        return text
