"""Chunk format: a fixed header followed by the raw KV bytes of every layer.

Header (little endian, HEADER_SIZE bytes, the rest zero):
    magic 8s | version H | header_size H | flags I | fingerprint 16s | key hash 16s |
    n_tokens I | n_blocks I | payload_len Q | checksum Q (xxh3-64 of the payload)

A reader checks magic, version, layout fingerprint, the key hash it asked for, the lengths and,
when flag ``FLAG_CHECKSUM`` is set, the checksum; any mismatch is a ``ChunkError`` and the caller
treats the chunk as a miss. A writer leaves the checksum out (flag clear, field 0) only where
the medium guards the bytes itself (see ``connector.checksum``).

With a deployment secret (``connector.chunk_secret_file``) the checksum is keyed: BLAKE2b-64
with the secret over the header bytes before it and the payload (flag ``FLAG_KEYED`` too), so
whoever can write the medium but lacks the secret (another client of a shared store) cannot make
a chunk a reader accepts; a reader with a secret refuses chunks not keyed with it, one without
refuses keyed chunks.

``Chunking`` is the geometry both halves share: which tokens and blocks each chunk of a prompt
covers.
"""
from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import xxhash

from common.config import ConfigError
from pd.coordinator.keyfiles import read_checked

MAGIC = b"PDKVCHNK"
VERSION = 1
HEADER_SIZE = 128
_FMT = struct.Struct("<8sHHI16s16sIIQQ")
FLAG_CHECKSUM = 1  # the checksum field holds xxh3-64 of the payload
FLAG_KEYED = 2  # ... keyed with the deployment's secret instead (module docstring)
_CSUM_AT = _FMT.size - 8  # where the checksum field starts
SECRET_MIN_BYTES = 16
assert _FMT.size <= HEADER_SIZE


class ChunkError(ValueError):
    """A chunk that must not be used: wrong magic/version/layout/key, truncated or corrupt."""


def secret_key(raw: bytes, where: str = "connector.chunk_secret_file") -> bytes:
    """The BLAKE2b key made from a deployment secret's bytes (at least ``SECRET_MIN_BYTES``)."""
    raw = raw.strip()
    if len(raw) < SECRET_MIN_BYTES:
        raise ConfigError(f"{where}: the secret has {len(raw)} bytes; it needs at least {SECRET_MIN_BYTES} "
                          "(e.g. `head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE`)")
    return hashlib.blake2b(raw, digest_size=32, person=b"pdkv-chunk-key").digest()


def read_secret(path: str, where: str = "connector.chunk_secret_file") -> bytes:
    """``secret_key`` of file ``path``, read as a key file is (``keyfiles.read_checked``: never
    through a symlink, ours or root's, no group or other bits); ConfigError naming what is wrong."""
    try:
        raw = read_checked(Path(path).expanduser(), where, secret=True)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {path}: {e.strerror or e}") from None
    return secret_key(raw, where)


def checksum(payload, secret: bytes | None = None, head: bytes = b"") -> int:
    """xxh3-64 of ``payload``; with ``secret`` (a ``secret_key``): BLAKE2b-64 keyed with it over
    ``head`` (the header bytes before the checksum field) and the payload."""
    if not secret:
        return xxhash.xxh3_64_intdigest(payload)
    h = hashlib.blake2b(head, key=secret, digest_size=8)
    h.update(payload)
    return int.from_bytes(h.digest(), "little")


def write_header(buf: memoryview, fingerprint: bytes, key_hash: bytes, n_tokens: int,
                 n_blocks: int, payload_len: int, with_checksum: bool = True, secret: bytes | None = None) -> None:
    """Fill ``buf[:HEADER_SIZE]``; the payload must already be in ``buf[HEADER_SIZE:]``."""
    payload = buf[HEADER_SIZE : HEADER_SIZE + payload_len]
    if len(payload) != payload_len:
        raise ValueError(f"buffer holds {len(payload)} payload bytes, expected {payload_len}")
    buf[:HEADER_SIZE] = pack_header(fingerprint, key_hash, n_tokens, n_blocks, payload_len,
                                    payload if with_checksum or secret else None, secret)


def pack_header(fingerprint: bytes, key_hash: bytes, n_tokens: int, n_blocks: int, payload_len: int,
                payload=None, secret: bytes | None = None) -> bytes:
    """The ``HEADER_SIZE`` header bytes of a chunk, with the checksum of ``payload`` (its bytes on
    the host; None: no checksum), keyed with ``secret`` if given."""
    flags = 0 if payload is None else FLAG_CHECKSUM | (FLAG_KEYED if secret else 0)
    head = bytearray(HEADER_SIZE)
    _FMT.pack_into(head, 0, MAGIC, VERSION, HEADER_SIZE, flags, fingerprint, key_hash, n_tokens, n_blocks,
                   payload_len, 0)
    if payload is not None:
        struct.pack_into("<Q", head, _CSUM_AT, checksum(payload, secret, bytes(head[:_CSUM_AT])))
    return bytes(head)


def check_payload(head: bytes, flags: int, csum: int, payload, secret: bytes | None) -> None:
    """ChunkError unless the chunk whose header bytes are ``head`` is keyed iff this reader has a
    ``secret`` and its checksum (if it has one) matches ``payload``."""
    if bool(flags & FLAG_KEYED) != bool(secret):
        raise ChunkError("chunk keyed with a secret this reader lacks (connector.chunk_secret_file)" if not secret
                         else "chunk not keyed with this deployment's secret (connector.chunk_secret_file)")
    if flags & FLAG_CHECKSUM:
        got = checksum(payload, secret, bytes(head[:_CSUM_AT]))
        if not hmac.compare_digest(got.to_bytes(8, "little"), csum.to_bytes(8, "little")):
            raise ChunkError("checksum mismatch (corrupt chunk, or keyed with another secret)")


def read_header(buf) -> tuple:
    if len(buf) < HEADER_SIZE:
        raise ChunkError(f"chunk truncated: {len(buf)} bytes, header needs {HEADER_SIZE}")
    return _FMT.unpack_from(buf, 0)


def verify(buf: memoryview, fingerprint: bytes, key_hash: bytes, expect_payload: int | None = None,
           expect_blocks: int | None = None, secret: bytes | None = None) -> tuple[int, int, memoryview]:
    """Validate a chunk; return ``(n_tokens, n_blocks, payload view)`` or raise ChunkError."""
    head = read_header(buf)
    flags, n_tokens, n_blocks, plen, csum = check_header(head, len(buf), fingerprint, key_hash, expect_payload,
                                                         expect_blocks)
    payload = buf[HEADER_SIZE : HEADER_SIZE + plen]
    check_payload(buf[:_CSUM_AT], flags, csum, payload, secret)
    return n_tokens, n_blocks, payload


def check_header(head: tuple, size: int, fingerprint: bytes, key_hash: bytes, expect_payload: int | None = None,
                 expect_blocks: int | None = None) -> tuple[int, int, int, int, int]:
    """Check a ``read_header`` tuple of a chunk of ``size`` bytes (all but the checksum);
    ``(flags, n_tokens, n_blocks, payload_len, checksum)`` or ChunkError."""
    magic, version, hsize, flags, fp, kh, n_tokens, n_blocks, plen, csum = head
    if magic != MAGIC:
        raise ChunkError("bad magic (not a pdkv chunk)")
    if (version != VERSION or hsize != HEADER_SIZE or flags & ~(FLAG_CHECKSUM | FLAG_KEYED)
            or flags & FLAG_KEYED and not flags & FLAG_CHECKSUM):
        raise ChunkError(f"unsupported chunk version {version}/{hsize}")
    if fp != fingerprint:
        raise ChunkError("layout fingerprint mismatch (KV from another model/layout)")
    if kh != key_hash:
        raise ChunkError("key hash mismatch (chunk belongs to other tokens)")
    if expect_payload is not None and plen != expect_payload:
        raise ChunkError(f"payload length {plen} != expected {expect_payload}")
    if expect_blocks is not None and n_blocks != expect_blocks:
        raise ChunkError(f"chunk has {n_blocks} blocks, expected {expect_blocks}")
    if size - HEADER_SIZE < plen:
        raise ChunkError(f"chunk truncated: payload {max(0, size - HEADER_SIZE)} of {plen} bytes")
    return flags, n_tokens, n_blocks, plen, csum


@dataclass(frozen=True)
class Chunking:
    """A prompt cut into chunks of ``chunk_size`` tokens (the last may be partial), each a whole
    number of vLLM blocks of ``block_size`` tokens."""

    chunk_size: int
    block_size: int

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_size // self.block_size

    def blocks(self, n_tokens: int) -> int:
        """Blocks that hold ``n_tokens`` tokens (the last may be partial)."""
        return -(-n_tokens // self.block_size)

    def chunks(self, n_tokens: int) -> int:
        """Chunks that hold ``n_tokens`` tokens (the last may be partial)."""
        return -(-n_tokens // self.chunk_size)

    def spans(self, n_tokens: int, first: int = 0, last: int = -1) -> Iterator[tuple[int, int, int, int]]:
        """(chunk index, its first block, its blocks, its tokens) of chunks [first, last) of an
        ``n_tokens`` prompt; ``last`` -1: to the end."""
        n_chunks = self.chunks(n_tokens)
        last = n_chunks if last < 0 else min(last, n_chunks)
        for c in range(first, last):
            toks = min(self.chunk_size, n_tokens - c * self.chunk_size)
            yield c, c * self.blocks_per_chunk, self.blocks(toks), toks
