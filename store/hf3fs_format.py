"""What store/hf3fs writes: slot headers in the data files and records of ``index.log``.

* ``data-NNNN.bin``: the data files of a writer directory, cut into slabs of slots (see
  store/hf3fs_slabs.py).

* Each slot: a 64-byte header ``magic 4s | version H | pad H | xxh3(key) Q | payload_len Q |
  xxh3(payload) Q | seq Q`` then the payload. A slot whose header does not name the key, the
  index's sequence number, the length or the checksum is a miss (torn, stale, overwritten).
* ``index.log``: a header ``magic | version | generation`` (random, new at each rewrite), then
  append-only records ``magic | op | key_len | file | offset | slot size | length | checksum |
  seq`` + key + xxh3 of the record (see store/hf3fs_log.py).
"""
from __future__ import annotations

import os
import struct

import xxhash

VERSION = 1
SLOT_MAGIC = b"PK3S"
_SLOT = struct.Struct("<4sHHQQQQ")  # 40 bytes, padded to HDR
HDR = 64
LOG_MAGIC = b"PK3L"
_REC = struct.Struct("<4sBxHIQIQQQ")  # 48 bytes, then key, then xxh3 Q
OP_ADD, OP_DEL = 1, 2
LOG_HDR_MAGIC = b"PK3H"
LOG_HDR = struct.Struct("<4sIQ")  # magic, version, generation


class Entry:
    """Where one of this writer's values lies (slab, slot, slot size) and what its slot header
    says (length, checksum, sequence number)."""
    __slots__ = ("slab", "slot", "cls", "length", "csum", "seq")

    def __init__(self, slab, slot, cls, length, csum, seq):
        self.slab, self.slot, self.cls, self.length, self.csum, self.seq = slab, slot, cls, length, csum, seq


def data_file(path: str, f: int) -> str:
    """Data file number ``f`` of writer directory ``path``."""
    return os.path.join(path, f"data-{f:04d}.bin")


def khash(key: str) -> int:
    return xxhash.xxh3_64_intdigest(key.encode())


def slot_header(key: str, length: int, csum: int, seq: int) -> bytes:
    """The ``HDR`` bytes in front of a value's payload."""
    hdr = _SLOT.pack(SLOT_MAGIC, VERSION, 0, khash(key), length, csum, seq)
    return hdr + bytes(HDR - len(hdr))


def check_slot(slot: memoryview, key: str, length: int, csum: int, seq: int, got: int) -> str:
    """Why the slot read into ``slot`` (``got`` bytes) is not the value the index names; "" if
    it is."""
    if got < HDR + length:
        return "short read"
    magic, version, _, kh, s_length, s_csum, s_seq = _SLOT.unpack_from(slot, 0)
    if magic != SLOT_MAGIC or version != VERSION:
        return "bad slot header"
    if kh != khash(key) or s_seq != seq or s_length != length:
        return "slot holds another value"
    if s_csum != csum or xxhash.xxh3_64_intdigest(slot[HDR:HDR + length]) != csum:
        return "checksum mismatch"
    return ""


def pack_record(op: int, key: str, f: int, off: int, cls: int, length: int, csum: int, seq: int) -> bytes:
    """One ``index.log`` record: value ``key`` is (``OP_ADD``) or is no longer (``OP_DEL``) at
    offset ``off`` of data file ``f``, in a slot of ``cls`` bytes."""
    kb = key.encode()
    body = _REC.pack(LOG_MAGIC, op, len(kb), f, off, cls, length, csum, seq) + kb
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def parse_log(raw: bytes, pos: int) -> tuple[list[tuple], int]:
    """The whole records of an index log from ``pos``: (records, end of the last whole one)."""
    out = []
    while pos + _REC.size <= len(raw):
        magic, op, klen, f, off, cls, length, csum, seq = _REC.unpack_from(raw, pos)
        end = pos + _REC.size + klen + 8
        if magic != LOG_MAGIC or end > len(raw):
            break
        if struct.unpack_from("<Q", raw, end - 8)[0] != xxhash.xxh3_64_intdigest(raw[pos:end - 8]):
            break
        out.append((op, raw[pos + _REC.size:end - 8].decode("utf-8", "replace"), f, off, cls,
                    length, csum, seq))
        pos = end
    return out, pos
