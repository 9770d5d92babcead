"""Where store/hf3fs puts values: slabs in its data files, slots of power-of-two sizes in them.

The data files (at most ``FILE_BYTES`` each) are cut into slabs of ``slab_size`` bytes, a power
of two: at most ``MAX_SLAB``, a quarter of the budget, and the read staging area. A slab is given
to one slot size class (4 KiB x 2^k up to the slab size) when a value of that class needs room,
and goes back to the free slabs when its last slot is freed.
"""
from __future__ import annotations

from store.fileio import round_up
from store.hf3fs_format import HDR, Entry

MIN_CLASS = 4096
MAX_SLAB = 1 << 30
FILE_BYTES = 4 << 30


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def slab_size(budget: int, read_area: int) -> int:
    """The slab size of a writer with ``budget`` bytes; a value is read in one piece, so the
    read staging area bounds it (writes go in pieces)."""
    return max(MIN_CLASS, _pow2_floor(min(MAX_SLAB, budget // 4, read_area)))


def slot_class(length: int) -> int:
    """The slot size of a value of ``length`` bytes (with its header)."""
    need = round_up(HDR + length)
    return max(MIN_CLASS, 1 << (need - 1).bit_length())


class Slabs:
    """Slab allocator: slabs of ``slab_size`` given to slot classes on demand (lock held by caller)."""

    def __init__(self, n_slabs: int, slab_size: int, per_file: int):
        self.n_slabs, self.slab_size, self.per_file = n_slabs, slab_size, per_file
        self.free_slabs = list(range(n_slabs - 1, -1, -1))  # pop() gives the lowest first
        self.cls_of: dict[int, int] = {}           # slab -> slot size
        self.free_slots: dict[int, set[int]] = {}  # slab -> free slot numbers
        self.used: dict[int, int] = {}             # slab -> slots in use
        self.partial: dict[int, set[int]] = {}     # slot size -> slabs with a free slot

    def alloc(self, cls: int) -> tuple[int, int] | None:
        part = self.partial.get(cls)
        if part:
            slab = next(iter(part))
        elif self.free_slabs:
            slab = self.free_slabs.pop()
            self._assign(slab, cls)
        else:
            return None
        return slab, self._take(slab, None)

    def _assign(self, slab: int, cls: int) -> None:
        self.cls_of[slab] = cls
        self.free_slots[slab] = set(range(self.slab_size // cls))
        self.used[slab] = 0
        self.partial.setdefault(cls, set()).add(slab)

    def _take(self, slab: int, slot: int | None) -> int:
        free = self.free_slots[slab]
        slot = free.pop() if slot is None else (free.remove(slot) or slot)
        self.used[slab] += 1
        if not free:
            self.partial[self.cls_of[slab]].discard(slab)
        return slot

    def claim(self, slab: int, slot: int, cls: int) -> bool:
        """Mark a known slot used (replaying the index); False if it conflicts."""
        if slab in self.cls_of:
            if self.cls_of[slab] != cls or slot not in self.free_slots[slab]:
                return False
        else:
            if slab not in self.free_slabs or slot >= self.slab_size // cls:
                return False
            self.free_slabs.remove(slab)
            self._assign(slab, cls)
        self._take(slab, slot)
        return True

    def free(self, slab: int, slot: int) -> None:
        cls = self.cls_of[slab]
        self.free_slots[slab].add(slot)
        self.used[slab] -= 1
        if self.used[slab] == 0:
            del self.cls_of[slab], self.free_slots[slab], self.used[slab]
            self.partial[cls].discard(slab)
            self.free_slabs.append(slab)
        else:
            self.partial.setdefault(cls, set()).add(slab)

    # -- addresses -------------------------------------------------------------------------
    def locate(self, e: Entry) -> tuple[int, int]:
        """(data file number, offset in it) of an entry's slot."""
        f, s = divmod(e.slab, self.per_file)
        return f, s * self.slab_size + e.slot * e.cls

    def find(self, f: int, off: int, cls: int) -> tuple[int, int] | None:
        """(slab, slot) of the slot of size ``cls`` at offset ``off`` of file ``f``; None if no
        slot of these slabs can be there."""
        if not (cls >= MIN_CLASS and cls & (cls - 1) == 0 and cls <= self.slab_size):
            return None
        slab = f * self.per_file + off // self.slab_size
        slot, rem = divmod(off % self.slab_size, cls)
        if rem == 0 and slab < self.n_slabs:
            return slab, slot
        return None
