"""Chunk keys: ``namespace/rank/hash``.

``hash`` chains a 128-bit BLAKE2b over the token ids of every chunk up to and including this
one, so equal prefixes give equal keys on every instance and process (no dependence on Python's
hash randomization). ``namespace`` names the model and the KV layout fingerprint, so KV of
another model or layout can never be found under the same key.
"""
from __future__ import annotations

import hashlib
import re
from array import array
from typing import Sequence

HASH_BYTES = 16
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def layout_fingerprint(**fields) -> bytes:
    """16-byte digest of everything that must match for raw KV bytes to be interchangeable."""
    text = "|".join(f"{k}={fields[k]}" for k in sorted(fields))
    return hashlib.blake2b(text.encode(), digest_size=HASH_BYTES).digest()


def make_namespace(model: str, fingerprint: bytes) -> str:
    name = _SAFE.sub("_", model.rstrip("/").split("/")[-1]) or "model"
    return f"{name}-{fingerprint.hex()[:16]}"


def chunk_hashes(token_ids: Sequence[int], chunk_size: int, seed: bytes = b"") -> list[bytes]:
    """Chain hashes, one per chunk of ``chunk_size`` tokens (the last one may be partial)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return chain_hashes(array("q", token_ids).tobytes(), chunk_size * 8, seed)


def chain_hashes(data: bytes, step: int, seed: bytes = b"") -> list[bytes]:
    """Chain hashes of ``data`` cut every ``step`` bytes (the last piece may be shorter): each
    covers every byte up to the end of its piece. ``chunk_hashes`` over token ids; the proxy's
    prefix affinity over prompt text (pd/proxy/prefix.py)."""
    prev = seed
    out = []
    for start in range(0, len(data), step):
        h = hashlib.blake2b(prev, digest_size=HASH_BYTES)
        h.update(data[start : start + step])
        prev = h.digest()
        out.append(prev)
    return out


def chunk_key(namespace: str, rank: int, digest: bytes) -> str:
    return f"{namespace}/{rank}/{digest.hex()}"


def chunk_keys(namespace: str, rank: int, token_ids: Sequence[int], chunk_size: int,
               seed: bytes = b"") -> list[str]:
    return [chunk_key(namespace, rank, d) for d in chunk_hashes(token_ids, chunk_size, seed)]


def request_seed(request) -> bytes | None:
    """What besides its token ids makes a request's KV its own, as a chain-hash seed.

    vLLM's own block hashes also cover the LoRA adapter, ``cache_salt`` and multimodal inputs
    (their content hash and position); the store's keys must too, or a request with another
    adapter, salt or image could load KV that is not its own. ``b""`` for a plain request (its
    keys stay what they were); ``None`` when its KV cannot be keyed by token ids at all (prompt
    embeddings): such a request neither reads nor writes the store.
    """
    if getattr(request, "prompt_embeds", None) is not None:
        return None
    parts = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(f"lora={getattr(lora, 'lora_name', '')}|{getattr(lora, 'lora_path', '')}")
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts.append(f"salt={salt}")
    for f in getattr(request, "mm_features", None) or ():
        ident = getattr(f, "identifier", None)
        pos = getattr(f, "mm_position", None)
        if ident is None:
            return None  # an input we cannot name: no reuse
        parts.append(f"mm={ident}@{getattr(pos, 'offset', '?')}+{getattr(pos, 'length', '?')}")
    if not parts:
        return b""
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=HASH_BYTES).digest()


def key_digest(key: str) -> bytes:
    """The hash part of a key (what a chunk header records), as bytes."""
    try:
        return bytes.fromhex(key.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"malformed chunk key {key!r}; expected namespace/rank/hexhash") from None


def transfer_key(pd_id: str, key: str) -> str:
    """The transport name of one chunk of one P/D transfer.

    Scoping by pd_id lets a consumer delete what it read without racing another request that
    shares the prefix (and therefore the chunk key).
    """
    return f"xfer/{_SAFE.sub('_', pd_id)}/{key}"
