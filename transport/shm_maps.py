"""The arenas one shm transport instance has mapped: its own and the producers' it reads from.

Mappings are cached by arena name and counted: ``hold`` for every copy in progress and every
slot view handed out, ``unhold`` when done. A mapping is unmapped (and unpinned) only at zero
holds: retiring one (its file is gone, or the instance closes) with views out defers the unmap to
the last ``unhold``. Every ``SWEEP_S`` the cache drops the mappings of other producers' arenas
whose file is gone (cleanup_pool, or the producer closed), so dead arenas do not stay mapped.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from transport.arena import Mapping
from transport.shm_gpu import GpuArenaError

log = logging.getLogger(__name__)

SWEEP_S = 2.0


class MapCache:
    """Name -> ``Mapping``; shares the transport's lock (``lock``)."""

    def __init__(self, path: str, lock: threading.Lock, pin_cuda: bool, device=None) -> None:
        self.path, self.lock, self.pin_cuda, self.device = path, lock, pin_cuda, device
        self.maps: dict[str, Mapping] = {}
        self.closed = False
        self._sweep_at = 0.0
        self._pin_failed = False
        self._unmappable: set[str] = set()  # GPU arenas this reader could not map (warned once)

    def add_own(self, m: Mapping) -> None:
        """(lock held) Cache the instance's own new arena (it was pinned by the caller)."""
        self.maps[m.name] = m

    def hold(self, name: str) -> Mapping | None:
        """The mapping of arena ``name`` with one more hold, mapping it first if needed
        (None if it cannot be mapped, or after close). The caller must ``unhold`` it."""
        with self.lock:
            if self.closed or name in self._unmappable:
                return None
            m = self.maps.get(name)
            if m is not None:
                m.holds += 1
                return m
        try:  # map outside the lock: faulting a large arena in takes a while
            new = Mapping.open(os.path.join(self.path, name), self.device)
        except GpuArenaError as e:
            if name not in self._unmappable:
                self._unmappable.add(name)
                log.warning("shm pool %s: %s; its chunks are read as misses", self.path, e)
            return None
        except (OSError, ValueError):
            return None
        with self.lock:
            m = self.maps.get(name)
            if m is None and not self.closed:
                m = self.maps[name] = new
            if m is not None:
                m.holds += 1
            if m is not new:
                new.close()
                return m
        self.pin(new)  # held, so it cannot be unmapped meanwhile
        return new

    def unhold(self, m: Mapping) -> None:
        with self.lock:
            self.unhold_locked(m)

    def unhold_locked(self, m: Mapping) -> None:
        m.holds -= 1
        if m.retired and m.holds == 0:
            m.close()

    def retire(self, m: Mapping) -> None:
        """(lock held) Forget ``m``; unmap it now, or at its last unhold if views of it are out."""
        if self.maps.get(m.name) is m:
            del self.maps[m.name]
        m.retired = True
        if m.holds == 0:
            m.close()

    def sweep(self) -> None:
        """Every ``SWEEP_S``: retire cached arenas of other producers whose file is gone."""
        now = time.monotonic()
        if now < self._sweep_at:
            return
        with self.lock:
            self._sweep_at = now + SWEEP_S
            for m in [m for m in self.maps.values() if not m.owner and not m.exists()]:
                self.retire(m)

    def close(self) -> None:
        """Retire every mapping; later holds fail."""
        with self.lock:
            self.closed = True
            for m in list(self.maps.values()):
                self.retire(m)

    def pin(self, m: Mapping) -> None:
        """Register ``m`` with CUDA if this instance pins; on failure warn once and stop trying."""
        if not self.pin_cuda or self._pin_failed:
            return
        try:
            rc = m.pin()
            why = f"cudaHostRegister returned cudaError {rc}"
        except Exception as e:  # noqa: BLE001 - no CUDA, torch missing, ...
            rc, why = -1, repr(e)
        if rc != 0:
            self._pin_failed = True
            log.warning("shm pool %s: cannot pin arena %s for CUDA (%s); going on unpinned",
                        self.path, m.name, why)
