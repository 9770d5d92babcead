"""Prefix affinity for the proxy: which instance most likely holds a prompt's leading KV.

A prompt is cut into blocks (``block_tokens`` token ids, or ``4 * block_tokens`` bytes of its
text when the client sent text: the proxy has no tokenizer) and each block gets a chain hash over
everything up to its end (``pd.connector.keys.chain_hashes``, the connector's chunk-key hash), so
equal hashes mean equal prefixes. ``PrefixIndex`` remembers, in a bounded LRU map, which
instances were recently sent each block hash; the instance with the longest matching run is where
the prefix's KV most likely still is (vLLM's prefix cache). ``pd.proxy.routing.Pool`` weighs
that against load. See docs/design.md ("Routing").
"""
from __future__ import annotations

import json
from array import array
from collections import OrderedDict
from typing import Any

from pd.connector.keys import chain_hashes

BYTES_PER_TOKEN = 4  # a text block of 4 * block_tokens bytes stands for about block_tokens tokens
MAX_BLOCKS = 256  # blocks hashed per prompt: the first 256 * block_tokens tokens decide
# Request fields besides the prompt that change the prompt's leading KV (rendering, salt, adapter).
SEED_FIELDS = ("model", "cache_salt", "tools", "chat_template", "chat_template_kwargs", "documents")


def _seed(body: dict) -> bytes:
    fields = {k: body[k] for k in SEED_FIELDS if body.get(k) is not None}
    return json.dumps(fields, sort_keys=True, default=str).encode() if fields else b""


def _is_ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(
        isinstance(t, int) and not isinstance(t, bool) and -(1 << 63) <= t < 1 << 63 for t in prompt)


def _chat_bytes(messages: list, limit: int) -> bytes:
    """The messages, one canonical JSON line each, up to about ``limit`` bytes (later turns extend
    a conversation's earlier ones, so a conversation's next request shares this prefix)."""
    out = bytearray()
    for m in messages:
        out += json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          default=str).encode("utf-8", "surrogatepass")  # JSON may carry lone surrogates
        out += b"\n"
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def prompt_blocks(body: Any, block_tokens: int) -> list[bytes]:
    """The chain hashes of the prompt's whole blocks, at most ``MAX_BLOCKS``; [] when the body
    has no single prompt the proxy can read (several prompts, prompt embeddings, a malformed
    body: the instance says what is wrong with it) or one shorter than a block."""
    if block_tokens <= 0:
        raise ValueError(f"block_tokens must be positive, got {block_tokens}")
    if not isinstance(body, dict) or body.get("prompt_embeds") is not None:
        return []
    seed = _seed(body)
    prompt, messages = body.get("prompt"), body.get("messages")
    if _is_ids(prompt):
        ids = prompt[: (min(len(prompt), MAX_BLOCKS * block_tokens) // block_tokens) * block_tokens]
        return chain_hashes(array("q", ids).tobytes(), block_tokens * 8, seed)
    step = block_tokens * BYTES_PER_TOKEN
    limit = step * MAX_BLOCKS
    if isinstance(prompt, str):
        data = prompt[:limit].encode("utf-8", "surrogatepass")[:limit]
    elif isinstance(messages, list) and messages:
        try:
            data = _chat_bytes(messages, limit)
        except (RecursionError, ValueError, TypeError):  # nested past what json.dumps takes: no affinity
            return []
    else:
        return []
    return chain_hashes(data[: len(data) // step * step], step, seed)


class PrefixIndex:
    """Block hash -> the instances most recently sent a prompt with that block (newest first), in
    an LRU map of at most ``max_entries`` hashes; each hash keeps at most ``owners`` instances."""

    def __init__(self, max_entries: int, owners: int):
        if max_entries < 1 or owners < 1:
            raise ValueError(f"max_entries and owners must be positive, got {max_entries} and {owners}")
        self.max_entries = max_entries
        self.owners = owners
        self._map: OrderedDict[bytes, tuple[str, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def match(self, blocks: list[bytes], urls: list[str]) -> dict[str, int]:
        """For each instance of ``urls`` that has some of the prompt's leading blocks: how many."""
        found: dict[str, int] = {}
        for i in range(len(blocks) - 1, -1, -1):
            for url in self._map.get(blocks[i], ()):
                found.setdefault(url, i + 1)
            if len(found) == len(urls):
                break
        return found

    def record(self, blocks: list[bytes], url: str) -> None:
        """``url`` was sent a prompt with these blocks: its KV for them is (or soon will be) there."""
        for b in blocks:
            old = self._map.pop(b, ())
            self._map[b] = ((url,) + tuple(u for u in old if u != url))[: self.owners]
        while len(self._map) > self.max_entries:
            self._map.popitem(last=False)
