"""Moving chunks between processes and hosts: the ``Transport`` interface (transport.base), its
implementations, and the factories that pick one from a ``TransportConfig`` (transport.config).
The implementations import their heavy clients (mooncake, infinistore, torch) only when built.
"""
from __future__ import annotations

from typing import Callable, Sequence

from common.config import ConfigError
from transport.base import Transport, TransportError, ZeroCopyTransport
from transport.infinistore import InfinistoreTransport
from transport.infinistore_server import server_spec
from transport.mooncake import MooncakeTransport
from transport.mooncake_master import master_spec
from transport.shm import ShmTransport
from transport.shm_index import all_linked, pool_dir

__all__ = ["Transport", "TransportError", "ZeroCopyTransport", "make_transport", "published_check", "server_specs"]


def make_transport(cfg, *, pin_cuda: bool = False, device=None) -> Transport | None:
    """Build the transport named by a ``TransportConfig`` (None for kind "none").

    ``pin_cuda``: register the transport's staging memory with CUDA (shm: its shared memory;
    mooncake, infinistore: their staging regions), for GPU workers. All implement
    ``ZeroCopyTransport``. A transport that cannot start (mooncake: master not reachable;
    infinistore: server not reachable) raises ``TransportError``. ``device``: the worker's CUDA
    device, where shm keeps chunks in GPU memory (``shm_memory: gpu``) and maps other producers'.
    """
    if cfg.kind == "none":
        return None
    if cfg.kind == "shm":
        return ShmTransport(cfg, pin_cuda=pin_cuda, device=device)
    if cfg.kind == "mooncake":
        return MooncakeTransport(cfg, pin_cuda=pin_cuda)
    if cfg.kind == "infinistore":
        return InfinistoreTransport(cfg, pin_cuda=pin_cuda)
    raise ConfigError(f"unknown transport kind {cfg.kind!r}; allowed: shm, mooncake, infinistore, none")


def published_check(cfg) -> Callable[[Sequence[str]], bool] | None:
    """A cheap check, for a process that holds no transport (vLLM's scheduler), that every key of
    a list is published now; None where the transport has none (only shm has: its index links).
    A key it reports may still be gone by the time it is read (evicted, its producer dead)."""
    if cfg.kind != "shm":
        return None
    path = pool_dir(cfg)
    return lambda keys: all_linked(path, keys)


def server_specs(cfg, here: bool = True) -> list[dict]:
    """The servers a deployment's control host must run for this ``TransportConfig``.

    Each is ``{"name", "argv", "host" (where it listens), "port" (to wait for), "env",
    "health_url"}``. mooncake with ``start_master``: the ``mooncake_master``; infinistore with
    ``start_server``: the InfiniStore server; otherwise none. Checks the transport's settings
    (ConfigError naming the key), so a launch fails at start. ``here`` False: for another
    machine (a container image, ``pd launch --emit k8s``): nothing of this host is checked or
    named (its binaries, RDMA devices, paths); programs are named as on that machine's PATH.
    """
    if cfg.kind == "infinistore":
        cfg.infinistore.check()
        if not cfg.infinistore.start_server:
            return []
        return [server_spec(cfg.infinistore, here)]
    if cfg.kind != "mooncake":
        return []
    cfg.mooncake.check()
    if not cfg.mooncake.start_master:
        return []
    return [master_spec(cfg.mooncake, here)]
