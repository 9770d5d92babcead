"""Scheduler-side half of PDConnector: decides what each worker saves and loads.

Producer (kv_producer/kv_both, request carries ``do_remote_decode``): follows the request's
blocks through (chunked) prefill; in every step that completes chunks of the prompt it tells the
workers to save those chunks (streaming: decode loads them while the rest is prefilled; the step
that completes the prompt saves the last ones, ``final``). From the first save on,
``request_finished`` keeps the blocks until the workers report the sends finished.

Consumer (kv_consumer/kv_both, request carries ``do_remote_prefill``): reports the prompt tokens
beyond the local prefix-cache hit as an asynchronous external hit; after allocation it tells the
workers which blocks to fill. A pd_id is loaded at most once per request.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pd.connector.keys import request_seed

logger = logging.getLogger("pd.connector")


@dataclass
class LoadSpec:
    req_id: str
    pd_id: str
    token_ids: list[int]  # the prompt
    block_ids: list[int]  # the request's blocks, from block 0
    start_token: int  # first token to load (block aligned: the local prefix hit ends here)
    seed: bytes | None = b""  # pd.connector.keys.request_seed: adapter, cache_salt, multimodal inputs


@dataclass
class SaveSpec:
    req_id: str
    pd_id: str
    token_ids: list[int]  # the whole prompt
    block_ids: list[int]  # the request's blocks, from block 0, up to the end of chunk last_chunk - 1
    first_chunk: int = 0  # save chunks [first_chunk, last_chunk) of the prompt
    last_chunk: int = -1  # -1: to the end of the prompt
    final: bool = True  # the prompt's last chunk is among them
    seed: bytes | None = b""  # pd.connector.keys.request_seed; None: never written to the store


@dataclass
class PDMetadata:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    # Loads whose requests were aborted while waiting: workers stop them early.
    cancels: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)


def transfer_params(request) -> tuple[str | None, bool, bool]:
    """``(pd_id, do_remote_prefill, do_remote_decode)`` of a request."""
    p = getattr(request, "kv_transfer_params", None) or {}
    if not isinstance(p, dict):
        return None, False, False
    pd_id = p.get("pd_id")
    if not isinstance(pd_id, str) or not pd_id:
        return None, False, False
    return pd_id, bool(p.get("do_remote_prefill")), bool(p.get("do_remote_decode"))


@dataclass
class _Track:
    pd_id: str
    token_ids: list[int]
    block_ids: list[int]
    sent: int = 0  # chunks already handed to the workers
    seed: bytes | None = b""


class SchedulerSide:
    def __init__(self, block_size: int, is_producer: bool, is_consumer: bool, store=None, namespace: str = "",
                 chunk_size: int = 256):
        self.block_size = block_size
        self.store = store  # prefix reuse: look up the longest stored prefix of each new request
        self.namespace = namespace
        self.chunk_size = chunk_size
        self._hits: dict[str, int] = {}  # req -> stored prefix length seen at the last lookup
        self.is_producer = is_producer
        self.is_consumer = is_consumer
        self._tracks: dict[str, _Track] = {}  # producer: prompts being prefilled
        self._saving: set[str] = set()  # producer: save ordered, awaiting request_finished
        self._new_loads: list[LoadSpec] = []
        self._loading: set[str] = set()  # consumer: loads handed to workers, not finished
        self._loaded: set[str] = set()  # consumer: never load a pd_id twice for a request
        self._cancels: list[str] = []

    # ---- consumer ----------------------------------------------------------------------

    def _is_pd_load(self, request) -> str | None:
        pd_id, remote_prefill, _ = transfer_params(request)
        return pd_id if self.is_consumer and pd_id and remote_prefill else None

    def _stored_prefix(self, prompt, seed: bytes | None) -> int:
        from pd.connector.keys import chunk_keys

        if seed is None:  # KV not keyed by its tokens (prompt embeddings): no reuse
            return 0
        n = self.store.contains(chunk_keys(self.namespace, 0, prompt, self.chunk_size, seed))
        return min(n * self.chunk_size, len(prompt))

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        if request.request_id in self._loaded:
            return 0, False
        n_prompt = len(request.prompt_token_ids or ())
        if self._is_pd_load(request):
            n = n_prompt - num_computed_tokens
        elif self.store is not None:
            hit = self._stored_prefix(request.prompt_token_ids or [], request_seed(request))
            self._hits[request.request_id] = hit
            n = hit - num_computed_tokens
        else:
            n = 0
        return (n, True) if n > 0 else (0, False)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        pd_id = self._is_pd_load(request)
        prompt = list(request.prompt_token_ids)
        if not pd_id:
            hit = self._hits.pop(request.request_id, 0)
            if not hit:
                return
            pd_id, prompt = "", prompt[:hit]  # a prefix from the store, no transfer
        start = len(prompt) - num_external_tokens
        if start % self.block_size:
            logger.warning("req %s: load start %d not block aligned; not loading", request.request_id, start)
            return
        (block_ids,) = blocks.get_block_ids()
        self._loaded.add(request.request_id)
        self._loading.add(request.request_id)
        self._new_loads.append(LoadSpec(request.request_id, pd_id, prompt, list(block_ids), start,
                                        request_seed(request)))

    # ---- producer ----------------------------------------------------------------------

    def on_new_request(self, request) -> None:
        if not self.is_producer:
            return
        pd_id, _, remote_decode = transfer_params(request)
        if pd_id and remote_decode:
            self._tracks[request.request_id] = _Track(pd_id, list(request.prompt_token_ids), [],
                                                      seed=request_seed(request))

    def _follow_blocks(self, so) -> list[SaveSpec]:
        saves = []
        done_tokens: dict[str, int] = {}
        for r in so.scheduled_new_reqs:
            t = self._tracks.get(r.req_id)
            if t is not None:
                t.block_ids = list(r.block_ids[0])
                done_tokens[r.req_id] = r.num_computed_tokens
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            t = self._tracks.get(req_id)
            if t is None:
                continue
            new = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                t.block_ids = list(new[0]) if new else []
            elif new:
                t.block_ids.extend(new[0])
            done_tokens[req_id] = cached.num_computed_tokens[i]
        for req_id, computed in done_tokens.items():
            t = self._tracks[req_id]
            n_prompt = len(t.token_ids)
            done = min(computed + so.num_scheduled_tokens.get(req_id, 0), n_prompt)
            final = done >= n_prompt
            upto = -(-n_prompt // self.chunk_size) if final else done // self.chunk_size
            if upto <= t.sent:
                continue
            n_blocks = -(-min(upto * self.chunk_size, n_prompt) // self.block_size)
            saves.append(SaveSpec(req_id, t.pd_id, t.token_ids, t.block_ids[:n_blocks], t.sent, upto, final,
                                  t.seed))
            t.sent = upto
            self._saving.add(req_id)  # its blocks are held until the workers have read them
            if final:
                del self._tracks[req_id]
        return saves

    # ---- both --------------------------------------------------------------------------

    def build_connector_meta(self, so) -> PDMetadata:
        meta = PDMetadata(
            loads=self._new_loads,
            saves=self._follow_blocks(so) if self._tracks else [],
            cancels=self._cancels,
            preempted=list(getattr(so, "preempted_req_ids", None) or ()),
        )
        self._new_loads, self._cancels = [], []
        return meta

    def update_connector_output(self, output) -> None:
        for req_id in getattr(output, "finished_recving", None) or ():
            self._loading.discard(req_id)

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        req_id = request.request_id
        self._tracks.pop(req_id, None)
        self._loaded.discard(req_id)
        self._hits.pop(req_id, None)
        if req_id in self._loading:
            # Aborted while its KV was in flight: vLLM holds the blocks until the worker
            # reports the load finished; make the worker stop waiting.
            self._cancels.append(req_id)
        if req_id in self._saving:
            self._saving.discard(req_id)
            return True, None
        return False, None
