"""One worker's KV caches as chunks, fixed when vLLM registers them.

``ChunkCodec`` holds what the saves and the loads of a worker share: the registered caches
(``KVLayout``), how a prompt is cut (``Chunking``), the key namespace, the fingerprint chunk
headers carry and the head groups this rank holds (``pd.connector.heads``). It names chunks
(``keys``), sizes them and moves one chunk between the paged cache and a buffer (a transport
slot or a staging slab). See docs/design.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pd.connector import chunk as chunkfmt
from pd.connector.chunk import Chunking
from pd.connector.keys import chunk_hashes, chunk_key, key_digest
from pd.connector.kv_layout import KVLayout


@dataclass(frozen=True)
class ChunkCodec:
    layout: KVLayout
    chunking: Chunking
    namespace: str  # = the scheduler's: chunk keys of both halves agree
    fingerprint: bytes  # what chunk headers carry: the spec's plus how the pages lie in memory
    checksum: bool  # payload checksums written (decided with the device, at registration)
    owned: tuple[int, ...]  # the head groups this rank saves or loads, each its own chunks
    groups: int  # head groups of the model (READY and DONE say how many to expect)
    secret: bytes | None = None  # checksums keyed with it (chunk.secret_key; connector.chunk_secret_file)

    @property
    def parts(self) -> int:
        """Head groups this rank holds: a chunk carries 1/parts of each of its pages."""
        return len(self.owned)

    def keys(self, token_ids: list[int], seed: bytes | None = b"", group: int | None = None) -> list[str]:
        """The prompt's chunk keys of head ``group`` (default: this rank's first); ``seed``:
        ``pd.connector.keys.request_seed`` of the request."""
        g = self.owned[0] if group is None else group
        return [chunk_key(self.namespace, g, h)
                for h in chunk_hashes(token_ids, self.chunking.chunk_size, seed or b"")]

    def part(self, group: int) -> tuple[int, int] | None:
        """The slice of this rank's heads that ``group`` is (None: all of them)."""
        return None if self.parts == 1 else (group - self.owned[0], self.parts)

    def chunk_bytes(self, n_blocks: int) -> int:
        """Bytes of one head group's chunk of ``n_blocks`` blocks."""
        return chunkfmt.HEADER_SIZE + self.layout.chunk_payload_bytes(n_blocks, self.parts)

    def gather_into(self, view, blocks: torch.Tensor, key: str, toks: int, nb: int, group: int) -> None:
        """Gather one chunk's blocks (of head ``group``) into ``view`` and write its header.
        ``view``: a byte memoryview, or a uint8 CUDA tensor (a GPU arena's slot: gathered device
        to device, the header copied in after it)."""
        layout, part = self.layout, self.part(group)
        slab = _as_bytes(view)
        if part is None:
            layout.gather(blocks, layout.payload_view(slab, nb))
        else:
            layout.gather(blocks, layout.payload_view(slab, nb, part[1]), part)
        plen = len(view) - chunkfmt.HEADER_SIZE
        if not slab.is_cuda:
            chunkfmt.write_header(view, self.fingerprint, key_digest(key), toks, nb, plen,
                                  with_checksum=self.checksum, secret=self.secret)
            return
        payload = layout.to_host(slab[chunkfmt.HEADER_SIZE:]) if self.checksum or self.secret else None
        head = chunkfmt.pack_header(self.fingerprint, key_digest(key), toks, nb, plen, payload, self.secret)
        layout.from_host(slab[: chunkfmt.HEADER_SIZE], head)

    def scatter_from(self, view, blocks: torch.Tensor, nb: int, skip: int, group: int) -> None:
        """Scatter a checked chunk of ``nb`` blocks (head ``group``) in ``view`` into ``blocks``,
        the chunk's blocks from its ``skip``-th on (those before hold valid KV already)."""
        layout, part = self.layout, self.part(group)
        slab = _as_bytes(view)
        if part is None:
            layout.scatter(blocks, layout.payload_view(slab, nb)[:, skip:])
        else:
            layout.scatter(blocks, layout.payload_view(slab, nb, part[1])[:, skip:], part)

    def verify(self, view, key: str, size: int, nb: int) -> None:
        """Raise ``ChunkError`` unless ``view`` holds chunk ``key`` intact (``size`` bytes). A
        CUDA view: its header is copied to the host (and the payload too if it has a checksum)."""
        if not isinstance(view, torch.Tensor):
            chunkfmt.verify(view, self.fingerprint, key_digest(key), size - chunkfmt.HEADER_SIZE, nb, self.secret)
            return
        if len(view) < chunkfmt.HEADER_SIZE:
            raise chunkfmt.ChunkError(f"chunk truncated: {len(view)} bytes, header needs {chunkfmt.HEADER_SIZE}")
        raw = self.layout.to_host(view[: chunkfmt.HEADER_SIZE])
        flags, _t, _b, plen, csum = chunkfmt.check_header(chunkfmt.read_header(raw), len(view), self.fingerprint,
                                                          key_digest(key), size - chunkfmt.HEADER_SIZE, nb)
        payload = view[chunkfmt.HEADER_SIZE : chunkfmt.HEADER_SIZE + plen]
        chunkfmt.check_payload(raw, flags, csum, self.layout.to_host(payload) if flags & chunkfmt.FLAG_CHECKSUM
                               else b"", self.secret)


def _as_bytes(view) -> torch.Tensor:
    """A chunk's buffer as a 1-D uint8 tensor (a CUDA slot already is one)."""
    return view if isinstance(view, torch.Tensor) else torch.frombuffer(view, dtype=torch.uint8)
