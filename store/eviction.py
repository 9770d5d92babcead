"""Eviction policies of store/local (``StoreConfig.eviction``): which stored key goes first.

A policy only orders keys; the store owns the index and the bytes and calls the policy under
its lock. store/hf3fs keeps LRU order in its index itself (see store/hf3fs.py).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from common.config import ConfigError


class EvictionPolicy(Protocol):
    def add(self, key: str) -> None:
        """``key`` was stored (again): it starts afresh."""
        ...

    def touch(self, key: str) -> None:
        """``key`` was read."""
        ...

    def remove(self, key: str) -> None:
        """``key`` is gone (evicted, deleted, found corrupt); unknown keys are ignored."""
        ...

    def victim(self) -> str | None:
        """The key to evict next (None: none left); it stays until ``remove``."""
        ...


class OrderPolicy:
    """LRU (``refresh=True``: hits move a key to the back) or FIFO (insertion order)."""

    def __init__(self, refresh: bool):
        self.refresh = refresh
        self.order: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def touch(self, key: str) -> None:
        if self.refresh and key in self.order:
            self.order.move_to_end(key)

    def remove(self, key: str) -> None:
        self.order.pop(key, None)

    def victim(self) -> str | None:
        return next(iter(self.order), None)


class LFUPolicy:
    """Fewest hits first; ties: least recently used first."""

    def __init__(self):
        self.count: dict[str, int] = {}
        self.buckets: dict[int, OrderedDict[str, None]] = {}

    def _place(self, key: str, n: int) -> None:
        self.count[key] = n
        self.buckets.setdefault(n, OrderedDict())[key] = None

    def _unplace(self, key: str) -> int | None:
        n = self.count.pop(key, None)
        if n is not None:
            b = self.buckets[n]
            del b[key]
            if not b:
                del self.buckets[n]
        return n

    def add(self, key: str) -> None:
        self._unplace(key)
        self._place(key, 0)

    def touch(self, key: str) -> None:
        n = self._unplace(key)
        if n is not None:
            self._place(key, n + 1)

    def remove(self, key: str) -> None:
        self._unplace(key)

    def victim(self) -> str | None:
        if not self.buckets:
            return None
        return next(iter(self.buckets[min(self.buckets)]))


def make_policy(name: str) -> EvictionPolicy:
    """The policy ``StoreConfig.eviction`` names."""
    if name == "lfu":
        return LFUPolicy()
    if name in ("lru", "fifo"):
        return OrderPolicy(refresh=name == "lru")
    raise ConfigError(f"store.eviction {name!r} is not allowed; choose lru, lfu or fifo")
