"""Scheduler-side half of PDConnector: decides what each worker saves and loads.

Producer (kv_producer/kv_both, request carries ``do_remote_decode``): follows the request's
blocks through (chunked) prefill; in every step that completes chunks of the prompt it tells the
workers to save those chunks (streaming: decode loads them while the rest is prefilled; the step
that completes the prompt saves the last ones, ``final``). From the first save on,
``request_finished`` keeps the blocks until the workers report the sends finished.

Consumer (kv_consumer/kv_both, request carries ``do_remote_prefill``): reports the prompt tokens
beyond the local prefix-cache hit (up to ``kv_tokens``, when the prompt ends with the prefill's
first token) as an external hit: synchronous when every chunk of the transfer is already
published in the transport (``connector.sync_load: ready``; the workers then load it in this
step, before the forward), else asynchronous; after allocation it tells the workers which
blocks to fill. A pd_id is loaded at most once per request.

Each request has one record (``_Request``) that says where it stands in loading and in saving:
two statuses, as an instance with a store may load a request's stored prefix and then save its
prompt (and never loads it again, not even after a preemption in the middle of the saves).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import Enum

from pd.connector.chunk import Chunking
from pd.connector.first_wait import PENDING, RECOMPUTE
from pd.connector.handoff import append_first_token, wants_handoff
from pd.connector.keys import chunk_hashes, chunk_key, chunk_keys, request_seed, transfer_key
from store.base import KVStore

logger = logging.getLogger("pd.connector")


@dataclass
class LoadSpec:
    req_id: str
    pd_id: str
    token_ids: list[int]  # the prompt
    block_ids: list[int]  # the request's blocks, from block 0
    start_token: int  # first token to load (block aligned: the local prefix hit ends here)
    seed: bytes | None = b""  # pd.connector.keys.request_seed: adapter, cache_salt, multimodal inputs
    sync: bool = False  # load within this step, before the forward (vLLM counts the tokens computed)
    # Seconds the request already waited in vLLM's queue for the transfer (an early decode's
    # lookup answered None): the asynchronous wait for READY counts them (connector.wait_timeout_s).
    waited_s: float = 0.0


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
    # Transfers a decode will not load (its prefix cache already holds their KV): workers abort
    # them at the coordinator, which frees their chunks now rather than at expiry.
    unneeded: list[str] = field(default_factory=list)
    # The transport keys of transfers whose decode request ended before its load began (an early
    # decode the proxy closed, waiting for token 1 or for the last chunks): nobody will read them,
    # and the coordinator may not know them (restarted since their READY): workers delete them.
    dropped: list[list[str]] = field(default_factory=list)


def transfer_params(request) -> tuple[str | None, bool, bool]:
    """``(pd_id, do_remote_prefill, do_remote_decode)`` of a request."""
    p = getattr(request, "kv_transfer_params", None) or {}
    if not isinstance(p, dict):
        return None, False, False
    pd_id = p.get("pd_id")
    if not isinstance(pd_id, str) or not pd_id:
        return None, False, False
    return pd_id, bool(p.get("do_remote_prefill")), bool(p.get("do_remote_decode"))


def kv_tokens(request, n_prompt: int) -> int:
    """How many of the prompt's tokens the transfer's KV covers: ``kv_tokens`` in the transfer
    params when the proxy sent the prefill's first token on as the prompt's last (the decode
    computes that token's KV itself), else the whole prompt. A value out of range is ignored."""
    p = getattr(request, "kv_transfer_params", None) or {}
    n = p.get("kv_tokens") if isinstance(p, dict) else None
    if n is None:
        return n_prompt
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= n_prompt:
        logger.warning("req %s: kv_tokens %r is not in 1..%d; loading the whole prompt",
                       getattr(request, "request_id", "?"), n, n_prompt)
        return n_prompt
    return n


class LoadStatus(Enum):
    """Where a request stands in loading KV (consumer; prefix reuse from the store anywhere)."""

    NONE = "none"  # nothing to load, or not looked up yet
    LOOKED_UP = "looked up"  # the store holds a prefix of ``hit`` tokens; waiting for the allocation
    LOADING = "loading"  # handed to the workers; vLLM holds its blocks until they report it
    LOADED = "loaded"  # reported; never loaded again (not after a preemption either)


class SaveStatus(Enum):
    """Where a request stands in saving its prompt's KV (producer)."""

    NONE = "none"  # not saved
    PREFILLING = "prefilling"  # followed through (chunked) prefill; ``sent`` chunks ordered saved so far
    SENT = "sent"  # the prompt's last chunks ordered saved: no longer followed


@dataclass
class _Request:
    """The scheduler half's one record of a request, dropped by ``request_finished``."""

    load: LoadStatus = LoadStatus.NONE
    hit: int = 0  # LOOKED_UP: the stored prefix (tokens) seen at the last lookup
    save: SaveStatus = SaveStatus.NONE
    # Saves (from on_new_request): the prompt and its blocks, from block 0, as prefill allocates them.
    pd_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    seed: bytes | None = b""
    sent: int = 0  # chunks already handed to the workers; > 0: request_finished holds the blocks
    sync: bool = False  # the transfer was all published at the last lookup: load it synchronously
    # The transfer covers the whole prompt (the early decode, the old flow): a synchronous load
    # tells vLLM one token fewer, the prompt's last, which it computes (and samples token 1) itself.
    whole: bool = False
    asked: float = 0.0  # when the lookup first found the transfer incomplete (monotonic s)
    keys: list[str] = field(default_factory=list)  # the transfer's transport keys, once looked up
    # An early decode offered token 1 (pd.connector.handoff): the token once settled (RECOMPUTE: none);
    # None while unsettled. Appended to the request's prompt once, whatever happens to it later.
    first: int | None = None


def _length_capped(request) -> bool:
    """The request ended at its ``max_tokens`` (vLLM's ``RequestStatus.FINISHED_LENGTH_CAPPED``)."""
    return getattr(getattr(request, "status", None), "name", "") == "FINISHED_LENGTH_CAPPED"


class SchedulerSide:
    def __init__(self, block_size: int, is_producer: bool, is_consumer: bool, store: KVStore | None = None,
                 namespace: str = "", chunk_size: int = 256, published=None, groups: int = 1,
                 sync_wait_s: float = 0.0, sync_wait_tokens: int = 0, clock=time.monotonic, first=None,
                 first_sender=None):
        self.chunking = Chunking(chunk_size, block_size)
        self.store = store  # prefix reuse: look up the longest stored prefix of each new request
        self.namespace = namespace
        # transport.published_check (None: never synchronous): whether a list of transport keys
        # is all published now; ``groups``: the KV-head groups a transfer's chunks are cut into.
        self.published, self.groups = published, groups
        # A whole-prompt transfer not yet all published: how long vLLM is asked to keep the request
        # waiting (lookup answered None) before its load goes asynchronous, and up to how many
        # tokens (a transfer that would fill much of the transport's pool must be read as it
        # comes: its first chunks may be evicted before its last are written).
        self.sync_wait_s, self.sync_wait_tokens, self.clock = sync_wait_s, sync_wait_tokens, clock
        # pd.connector.first_wait: FirstWaiter (a decode waits for token 1; None: it computes it) and
        # FirstSender (a prefill sends the token 1 it sampled, for requests flagged ``handoff``).
        self.first, self.first_sender = first, first_sender
        self.is_producer = is_producer
        self.is_consumer = is_consumer
        self._reqs: dict[str, _Request] = {}
        # What the next build_connector_meta hands to the workers.
        self._new_loads: list[LoadSpec] = []
        self._cancels: list[str] = []
        self._unneeded: list[str] = []
        self._dropped: list[list[str]] = []

    def _record(self, req_id: str) -> _Request:
        rec = self._reqs.get(req_id)
        if rec is None:
            rec = self._reqs[req_id] = _Request()
        return rec

    # ---- consumer ----------------------------------------------------------------------

    def _is_pd_load(self, request) -> str | None:
        pd_id, remote_prefill, _ = transfer_params(request)
        return pd_id if self.is_consumer and pd_id and remote_prefill else None

    def _stored_prefix(self, prompt, seed: bytes | None) -> int:
        if seed is None:  # KV not keyed by its tokens (prompt embeddings): no reuse
            return 0
        size = self.chunking.chunk_size
        n = self.store.contains(chunk_keys(self.namespace, 0, prompt, size, seed))
        return min(n * size, len(prompt))

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """vLLM's lookup: (tokens to load, asynchronously?); (None, False): ask again next step."""
        rec = self._reqs.get(request.request_id)
        if rec is not None and rec.load in (LoadStatus.LOADING, LoadStatus.LOADED):
            return 0, False
        n_prompt = len(request.prompt_token_ids or ())
        pd_id = self._is_pd_load(request)
        if pd_id and wants_handoff(request):
            token = self._token_1(request, pd_id, n_prompt)
            if token is PENDING:
                return None, False
            n_prompt = len(request.prompt_token_ids or ())
        if pd_id:
            n_kv = kv_tokens(request, n_prompt)
            whole = n_kv == n_prompt
            n = n_kv - num_computed_tokens - whole  # whole: vLLM computes the prompt's last token
            if n <= 0:  # the local prefix cache holds it all (a prompt of whole blocks, seen before)
                self._let_go(self._record(request.request_id), pd_id, request)
                return 0, False
            if self.published is not None:
                # Synchronous: vLLM counts the tokens computed and schedules what is left (the
                # prompt's last token, or token 1 on the first-token path) in this very step.
                rec = self._record(request.request_id)
                rec.whole, rec.sync = whole, self._all_published(rec, pd_id, request, n_kv)
                if rec.sync:
                    return n, False
                # An early decode (whole prompt, or handed token 1: the prefill's scheduler sends it
                # as its request ends, often before its last chunks are published) waits for them.
                handed = rec.first is not None and rec.first != RECOMPUTE
                if (whole or handed) and n_kv <= self.sync_wait_tokens and self._may_wait(rec):
                    return None, False
            n += whole  # asynchronous: vLLM recomputes the last token after loading the whole prompt
        elif self.store is not None:
            hit = self._stored_prefix(request.prompt_token_ids or [], request_seed(request))
            rec = self._record(request.request_id)
            rec.load, rec.hit = LoadStatus.LOOKED_UP, hit
            n = hit - num_computed_tokens
        else:
            n = 0
        return (n, True) if n > 0 else (0, False)

    def _token_1(self, request, pd_id: str, n_prompt: int) -> object:
        """An early decode flagged for token 1's hand-off: ``PENDING`` until it is settled, then the
        token, which is appended to the request's prompt (once), or ``RECOMPUTE``. A decode that
        could not wait for every chunk before loading (no published check, a transfer over half
        the pool) gives the hand-off up at once."""
        rec = self._record(request.request_id)
        if rec.first is None:
            # A request for one token (vLLM caps max_tokens at the context's end) cannot continue
            # from token 1: it gives the hand-off up before any FIRST can be settled for it.
            can_wait = (self.published is not None and n_prompt <= self.sync_wait_tokens
                        and request.max_tokens > 1)
            token = self.first.poll(pd_id, give_up=not can_wait) if self.first is not None else RECOMPUTE
            if token is PENDING:
                return PENDING
            rec.first = token if token != RECOMPUTE and append_first_token(request, token) else RECOMPUTE
            if rec.first != RECOMPUTE:
                logger.debug("req %s: token 1 (%d) handed over; the decode's first step yields token 2",
                             request.request_id, token)
        return rec.first

    def _may_wait(self, rec: _Request) -> bool:
        """A whole-prompt transfer (an early decode, sent with its prefill) is not all published
        yet: keep the request waiting for it, to load it in one step, for up to ``sync_wait_s``."""
        now = self.clock()
        if not rec.asked:
            rec.asked = now
        return now - rec.asked < self.sync_wait_s

    def _all_published(self, rec: _Request, pd_id: str, request, n_kv: int) -> bool:
        """Whether every chunk of the transfer (each head group's) is in the transport now."""
        return self.published(self._transfer_keys(rec, pd_id, request, n_kv))

    def _transfer_keys(self, rec: _Request, pd_id: str, request, n_kv: int) -> list[str]:
        """The transfer's transport keys, each head group's (made once per request: a waiting
        request is looked up every engine step)."""
        if not rec.keys:
            prompt, seed = (request.prompt_token_ids or [])[:n_kv], request_seed(request) or b""
            hashes = chunk_hashes(prompt, self.chunking.chunk_size, seed)  # once for every group
            rec.keys = [transfer_key(pd_id, chunk_key(self.namespace, g, h)) for g in range(self.groups) for h in hashes]
        return rec.keys

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        pd_id = self._is_pd_load(request)
        if num_external_tokens <= 0:
            rec = self._reqs.get(request.request_id)
            if pd_id and rec is not None and rec.load is LoadStatus.NONE:
                # vLLM kept its own sub-block prefix hit over the transfer: never loaded, let it go now.
                self._let_go(rec, pd_id, request)
            return
        prompt = list(request.prompt_token_ids)
        if pd_id:
            prompt = prompt[:kv_tokens(request, len(prompt))]  # the tokens the transfer's KV covers
        else:
            rec = self._reqs.get(request.request_id)
            if rec is None or rec.load is not LoadStatus.LOOKED_UP:
                return
            hit, rec.load, rec.hit = rec.hit, LoadStatus.NONE, 0
            if not hit:
                return
            pd_id, prompt = "", prompt[:hit]  # a prefix from the store, no transfer
        rec = self._record(request.request_id)
        sync = bool(pd_id) and rec.sync
        # A synchronous whole-prompt load: vLLM was told one token fewer (it computes the last).
        start = len(prompt) - num_external_tokens - (sync and rec.whole)
        if start % self.chunking.block_size:
            logger.warning("req %s: load start %d not block aligned; not loading", request.request_id, start)
            return
        (block_ids,) = blocks.get_block_ids()
        # A synchronous load is over (well or not) when this step's forward starts: no report comes.
        rec.load = LoadStatus.LOADED if sync else LoadStatus.LOADING
        waited = self.clock() - rec.asked if pd_id and rec.asked and not sync else 0.0
        self._new_loads.append(LoadSpec(request.request_id, pd_id, prompt, list(block_ids), start,
                                        request_seed(request), sync, waited))

    # ---- producer ----------------------------------------------------------------------

    def on_new_request(self, request) -> None:
        if not self.is_producer:
            return
        pd_id, _, remote_decode = transfer_params(request)
        if pd_id and remote_decode:
            rec = self._record(request.request_id)
            rec.save, rec.pd_id, rec.token_ids = SaveStatus.PREFILLING, pd_id, list(request.prompt_token_ids)
            rec.block_ids, rec.seed = [], request_seed(request)

    def _prefilling(self, req_id: str) -> _Request | None:
        rec = self._reqs.get(req_id)
        return rec if rec is not None and rec.save is SaveStatus.PREFILLING else None

    def _follow_blocks(self, so) -> list[SaveSpec]:
        done_tokens: dict[str, int] = {}
        for r in so.scheduled_new_reqs:
            rec = self._prefilling(r.req_id)
            if rec is not None:
                rec.block_ids = list(r.block_ids[0])
                done_tokens[r.req_id] = r.num_computed_tokens
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            rec = self._prefilling(req_id)
            if rec is None:
                continue
            new = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                rec.block_ids = list(new[0]) if new else []
            elif new:
                rec.block_ids.extend(new[0])
            done_tokens[req_id] = cached.num_computed_tokens[i]
        saves = []
        for req_id, computed in done_tokens.items():
            save = self._chunks_done(req_id, computed + so.num_scheduled_tokens.get(req_id, 0))
            if save is not None:
                saves.append(save)
        return saves

    def _chunks_done(self, req_id: str, done: int) -> SaveSpec | None:
        """The save of the chunks a step completed (``done`` tokens computed after it), if any."""
        rec, ch = self._reqs[req_id], self.chunking
        n_prompt = len(rec.token_ids)
        done = min(done, n_prompt)
        final = done >= n_prompt
        upto = ch.chunks(n_prompt) if final else done // ch.chunk_size
        if upto <= rec.sent:
            return None
        n_blocks = ch.blocks(min(upto * ch.chunk_size, n_prompt))
        save = SaveSpec(req_id, rec.pd_id, rec.token_ids, rec.block_ids[:n_blocks], rec.sent, upto, final, rec.seed)
        rec.sent = upto  # its blocks are now held until the workers have read them
        if final:
            rec.save = SaveStatus.SENT
        return save

    # ---- both --------------------------------------------------------------------------

    def build_connector_meta(self, so) -> PDMetadata:
        meta = PDMetadata(
            loads=self._new_loads,
            saves=self._follow_blocks(so) if self.is_producer else [],
            cancels=self._cancels,
            preempted=list(getattr(so, "preempted_req_ids", None) or ()),
            unneeded=self._unneeded,
            dropped=self._dropped,
        )
        self._new_loads, self._cancels, self._unneeded, self._dropped = [], [], [], []
        return meta

    def update_connector_output(self, output) -> None:
        for req_id in getattr(output, "finished_recving", None) or ():
            rec = self._reqs.get(req_id)
            if rec is not None and rec.load is LoadStatus.LOADING:
                rec.load = LoadStatus.LOADED

    def _let_go(self, rec: _Request, pd_id: str, request) -> None:
        """A transfer this request will never load: aborted at the coordinator (``unneeded``) and its
        chunks deleted."""
        rec.load = LoadStatus.LOADED
        self._unneeded.append(pd_id)
        self._drop(rec, pd_id, request)

    def _drop(self, rec: _Request, pd_id: str, request) -> None:
        """The transfer's chunks go (``dropped``): nobody will read them, and a coordinator restarted
        since their READY could not free them."""
        n_kv = kv_tokens(request, len(request.prompt_token_ids or ()))
        self._dropped.append(self._transfer_keys(rec, pd_id, request, n_kv))

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        rec = self._reqs.pop(request.request_id, None)
        if rec is None:
            pd_id = self._is_pd_load(request)
            if pd_id:  # ended before its first lookup (queued behind a full batch): never loaded
                self._drop(_Request(), pd_id, request)
            return False, None
        if rec.save is not SaveStatus.NONE and self.first_sender is not None and wants_handoff(request) \
                and request.output_token_ids and _length_capped(request):
            # The early decode's token 1 (not when it ended the answer: EOS, a stop token; the proxy
            # then answers from the prefill alone and lets the decode go).
            self.first_sender.send(rec.pd_id, request.output_token_ids[0])
        pd_id = self._is_pd_load(request)
        if pd_id and self.first is not None and wants_handoff(request):
            self.first.forget(pd_id)
        if rec.load is LoadStatus.LOADING:
            # Aborted while its KV was in flight: vLLM holds the blocks until the worker
            # reports the load finished; make the worker stop waiting.
            self._cancels.append(request.request_id)
        elif pd_id and rec.load is LoadStatus.NONE:
            self._drop(rec, pd_id, request)  # ended before its load began
        return rec.sent > 0, None
