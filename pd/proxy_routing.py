"""Choosing an upstream instance: least outstanding requests (ties round-robin) or round-robin."""
from __future__ import annotations

import itertools
from contextlib import contextmanager


class Pool:
    def __init__(self, role: str, urls: list[str], policy: str = "least_outstanding"):
        if policy not in ("least_outstanding", "round_robin"):
            raise ValueError(f"policy {policy!r} is not allowed; choose least_outstanding or round_robin")
        self.role = role
        self.urls = list(urls)
        self.policy = policy
        self.outstanding = dict.fromkeys(self.urls, 0)
        self._rr = itertools.count()

    def pick(self) -> str:
        if not self.urls:
            raise LookupError(f"no {self.role} instances configured")
        start = next(self._rr) % len(self.urls)
        order = self.urls[start:] + self.urls[:start]
        if self.policy == "round_robin":
            return order[0]
        return min(order, key=lambda u: self.outstanding[u])  # min keeps the first of equals

    @contextmanager
    def track(self, url: str):
        self.outstanding[url] += 1
        try:
            yield
        finally:
            self.outstanding[url] -= 1
