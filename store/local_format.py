"""The file format and file names of store/local (one file per chunk; see store/local.py).

Key ``namespace/rank/hexhash`` -> ``<path>/<namespace>+<rank>/<hexhash>.kv``. Characters
outside ``[A-Za-z0-9_.-]`` are escaped as ``%XX`` (``/`` inside the directory part as ``+``),
so the mapping is injective and a lookup is a single ``open``; no index scan.

File format (little endian): ``magic 8s | version H | key_len H | flags I | payload_len Q |
xxh3-64 of the payload Q`` (32 bytes), then the UTF-8 key, then the payload. With O_DIRECT the
header+key is zero-padded to 4096 bytes so the payload starts page aligned, and the payload is
zero-padded to a multiple of 4096 bytes (flags ``PADDED | ALIGNED``); the true length is in the
header. Files of the older O_DIRECT layout (``PADDED`` only: header, key, payload, then
padding) are still read. A file is written as ``.tmp-<pid>-...`` in the same directory and
renamed, so a chunk is never visible half-written.
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
from typing import Any

from common.process import pid_alive
from store.fileio import ZEROS, round_up

MAGIC = b"PDKVSTOR"
VERSION = 1
HEADER = struct.Struct("<8sHHIQQ")
HEADER_FIXED = HEADER.size  # 32
FLAG_PADDED = 1            # the file is zero-padded to a multiple of ALIGN
FLAG_ALIGNED = 2           # the payload starts at the first ALIGN boundary after the key
SUFFIX = ".kv"
TMP_PREFIX = ".tmp-"
MAX_KEY = 0xFFFF
_MAX_NAME = 200            # well under NAME_MAX (255 bytes)
_TMP_STALE_S = 600.0       # temp files of live processes older than this are removed at start

_PLAIN = re.compile(r"[A-Za-z0-9_.-]")
# whole components that _escape leaves as they are ("/" becomes "+" in the directory part)
_ALL_PLAIN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_ALL_PLAIN_DIR = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_./-]*")
_FLAT_DIR = "%flat"        # keys without "/"; "%f" can never come out of _escape
_EMPTY = "%e"              # an empty component


def _escape(part: str, slash: str | None = None) -> str:
    if not part:
        return _EMPTY
    if len(part) <= _MAX_NAME:  # fast path (the usual keys): one regex instead of one per character
        if slash is None:
            if _ALL_PLAIN.fullmatch(part):
                return part
        elif _ALL_PLAIN_DIR.fullmatch(part):
            return part.replace("/", slash)
    out = []
    for i, ch in enumerate(part):
        if slash is not None and ch == "/":
            out.append(slash)
        elif _PLAIN.match(ch) and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode())
    name = "".join(out)
    if len(name) > _MAX_NAME:  # readable prefix + 128-bit digest; "#" never occurs otherwise
        digest = hashlib.blake2b(part.encode(), digest_size=16).hexdigest()
        name = name[: _MAX_NAME - 33] + "#" + digest
    return name


def key_to_relpath(key: str) -> str:
    """Injective, filesystem-safe relative path of a key: ``<dir>/<file>.kv``."""
    if "/" in key:
        prefix, last = key.rsplit("/", 1)
        d = _escape(prefix, slash="+")
    else:
        d, last = _FLAT_DIR, key
    return os.path.join(d, _escape(last) + SUFFIX)


def layout(klen: int, plen: int, direct: bool) -> tuple[int, int]:
    """(payload offset, file size) of a file written now (O_DIRECT: the ALIGNED layout)."""
    hoff = HEADER_FIXED + klen
    if direct:
        poff = round_up(hoff)
        return poff, poff + round_up(plen)
    return hoff, hoff + plen


def fill_image(mv: memoryview, kb: bytes, poff: int, plen: int, size: int, direct: bool, csum: int) -> None:
    """Write the header, the key and (``direct``) the zero padding around the payload that
    ``mv[poff:poff + plen]`` holds already, so that ``mv[:size]`` is the whole file."""
    hoff, end = HEADER_FIXED + len(kb), poff + plen
    HEADER.pack_into(mv, 0, MAGIC, VERSION, len(kb), (FLAG_PADDED | FLAG_ALIGNED) if direct else 0,
                     plen, csum)
    mv[HEADER_FIXED:hoff] = kb
    if direct:  # a reused buffer holds old bytes where the padding goes
        mv[hoff:poff] = ZEROS[:poff - hoff]
        mv[end:size] = ZEROS[:size - end]


def parse_header(hdr: Any, file_size: int) -> tuple[str, int, int, int] | None:
    """(key, payload offset, payload length, checksum) if the header fits the file size."""
    if len(hdr) < HEADER_FIXED:
        return None
    magic, version, klen, flags, plen, csum = HEADER.unpack_from(hdr, 0)
    if magic != MAGIC or version != VERSION or len(hdr) < HEADER_FIXED + klen:
        return None
    try:
        key = bytes(hdr[HEADER_FIXED:HEADER_FIXED + klen]).decode()
    except UnicodeDecodeError:
        return None
    hoff = HEADER_FIXED + klen
    if flags & FLAG_ALIGNED:
        hoff = round_up(hoff)
        want = hoff + round_up(plen)
    elif flags & FLAG_PADDED:
        want = round_up(hoff + plen)
    else:
        want = hoff + plen
    if file_size != want:
        return None
    return key, hoff, plen, csum


def read_meta(root: str, full: str) -> tuple[str, int, float] | None:
    """(key, file size, mtime) of the store file ``full`` under ``root`` whose header is
    consistent, else None."""
    try:
        fd = os.open(full, os.O_RDONLY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        hdr = os.pread(fd, 512, 0)  # the fixed part and any usual key
        if len(hdr) >= HEADER_FIXED:
            klen = HEADER.unpack_from(hdr, 0)[2]
            if HEADER_FIXED + klen > len(hdr):
                hdr = os.pread(fd, HEADER_FIXED + klen, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    parsed = parse_header(hdr, st.st_size)
    if parsed is None:
        return None
    key = parsed[0]
    if os.path.join(root, key_to_relpath(key)) != full:
        return None  # the header names another key: not this file
    return key, st.st_size, st.st_mtime


def tmp_name(d: str, uid: str, seq: int) -> str:
    """A temporary file in directory ``d`` (``uid``: the writing store, ``seq``: its count)."""
    return os.path.join(d, f"{TMP_PREFIX}{os.getpid()}-{uid}-{seq}")


def stale_temp(name: str, full: str, now: float) -> bool:
    """Whether the temporary file ``full`` (named ``name``) is garbage: its writer is gone, or
    it is older than a write can take."""
    try:
        pid = int(name[len(TMP_PREFIX):].split("-", 1)[0])
    except ValueError:
        return True
    if not pid_alive(pid):  # the writer is gone (crashed): its temp files are garbage
        return True
    try:
        return now - os.stat(full).st_mtime > _TMP_STALE_S
    except OSError:
        return False
