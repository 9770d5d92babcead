"""Persistent KV stores: ``make_store`` builds the one ``StoreConfig.backend`` names."""
from __future__ import annotations

from typing import Any

from common.config import ConfigError
from store.base import KVStore
from store.hf3fs import Hf3fsStore
from store.local import LocalStore

__all__ = ["KVStore", "make_store"]


def make_store(cfg: Any, device_index: int = 0, writer: bool = True) -> KVStore | None:
    """The store of ``cfg`` (a ``store.config.StoreConfig``) for device ``device_index``.

    ``writer=False`` opens it for reading only (a scheduler's lookups, a decode worker's
    fallback): no writer threads, no directory claimed, every ``put`` dropped and counted.

    None for backend ``none``. Raises ValueError with a clear message for a backend that
    cannot be built or a configuration it refuses (missing/unwritable path, tiny budget).
    """
    backend = cfg.backend
    if backend == "none":
        return None
    if backend == "local":
        return LocalStore(cfg, device_index, writer=writer)
    if backend == "hf3fs":
        return Hf3fsStore(cfg, device_index, writer=writer)
    raise ConfigError(f"unknown store backend {backend!r}; choose none, local or hf3fs")
