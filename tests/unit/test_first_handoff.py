"""Token 1 handed to an early decode (issue 16), below the HTTP layer: the coordinator's FIRST /
AWAIT_FIRST over real ZMQ, the decode scheduler's waiter threads (``FirstWaiter``), and the
scheduler half's lookup with vLLM's own ``Request`` (the prompt grows by token 1 once; what vLLM
counts follows). The rule under test: the proxy and the decode never disagree about whether the
decode's answer starts at token 1 or at token 2."""
from __future__ import annotations

import asyncio
import time

import pytest

from pd.connector.first_wait import PENDING, RECOMPUTE, FirstWaiter
from pd.connector.scheduler import SchedulerSide
from pd.coordinator.client import AsyncCoordinatorClient, CoordinatorClient
from pd.coordinator.protocol import Abort, Ack, AwaitFirst, Error, First, FirstToken, WaitTimeout
from tests.unit.test_coordinator import ctx, peers, start_coord, until  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(60)


# ---- the coordinator ---------------------------------------------------------------------------


def test_first_before_the_decode_asks_is_kept_and_answered_at_once(peers):
    proxy, decode = peers(), peers()
    assert isinstance(proxy.req(First("p1", 42)), Ack)
    assert proxy.req(First("p1", 42)) == Ack()  # the same token again: idempotent
    assert isinstance(proxy.req(First("p1", 43)), Error)  # another token for it: refused
    assert decode.req(AwaitFirst("p1", 5.0)) == FirstToken("p1", 42)


def test_a_parked_await_is_answered_by_the_first(peers):
    proxy, decode = peers(), peers()
    decode.send(AwaitFirst("p2", 5.0))
    assert decode.recv(0.3) is None  # parked
    assert proxy.query().counters["waiters"] == 1
    assert isinstance(proxy.req(First("p2", 7)), Ack)
    assert decode.recv() == FirstToken("p2", 7)
    assert proxy.query().counters["waiters"] == 0


def test_an_await_times_out_without_giving_up(peers):
    proxy, decode = peers(), peers()
    t0 = time.monotonic()
    assert decode.req(AwaitFirst("p3", 0.3)) == WaitTimeout("p3")
    assert 0.25 < time.monotonic() - t0 < 2.5
    assert isinstance(proxy.req(First("p3", 9)), Ack)  # the decode will ask again: still taken
    assert decode.req(AwaitFirst("p3", 0.3)) == FirstToken("p3", 9)


def test_a_give_up_refuses_every_later_first_and_releases_parked_awaits(peers):
    proxy, decode, other = peers(), peers(), peers()
    other.send(AwaitFirst("p4", 5.0))
    assert other.recv(0.3) is None  # parked
    assert decode.req(AwaitFirst("p4", 0.0, give_up=True)) == WaitTimeout("p4")
    assert other.recv() == WaitTimeout("p4")
    assert other.req(AwaitFirst("p4", 5.0)) == WaitTimeout("p4")  # given up: answered at once
    reply = proxy.req(First("p4", 11))
    assert isinstance(reply, Error) and "no longer waits" in reply.reason
    assert proxy.query().counters["firsts_refused"] == 1


def test_a_give_up_after_the_first_came_gets_the_token_which_must_be_used(peers):
    proxy, decode = peers(), peers()
    assert isinstance(proxy.req(First("p5", 5)), Ack)
    assert decode.req(AwaitFirst("p5", 0.0, give_up=True)) == FirstToken("p5", 5)


def test_an_abort_answers_awaits_and_refuses_firsts(peers):
    proxy, decode = peers(), peers()
    decode.send(AwaitFirst("p6", 5.0))
    assert decode.recv(0.3) is None
    assert isinstance(proxy.req(Abort("p6", "client went away")), Ack)
    reply = decode.recv()
    assert type(reply).__name__ == "Aborted" and reply.reason == "client went away"
    assert isinstance(proxy.req(First("p6", 1)), Error)
    assert type(decode.req(AwaitFirst("p6", 1.0))).__name__ == "Aborted"


def test_a_token_out_of_range_is_refused_at_decoding(peers):
    proxy = peers()
    for bad in (-2, 1 << 31):
        reply = proxy.req(First("p7", bad))
        assert isinstance(reply, Error) and "token_id" in reply.reason, reply


def test_tokens_and_give_ups_expire_after_the_entry_ttl(peers):
    proxy, decode = peers(entry_ttl_s=0.3), peers()
    assert isinstance(proxy.req(First("p8", 3)), Ack)
    assert decode.req(AwaitFirst("p9", 0.0, give_up=True)) == WaitTimeout("p9")
    time.sleep(1.5)  # swept
    assert decode.req(AwaitFirst("p8", 0.2)) == WaitTimeout("p8")
    assert isinstance(proxy.req(First("p9", 3)), Ack)


# ---- the decode scheduler's waiter threads ------------------------------------------------------


@pytest.fixture
def coord(start_coord):
    c = start_coord()
    clients = []

    def client(**kw):
        cl = CoordinatorClient(c.address, **kw)
        clients.append(cl)
        return cl

    c.client = client
    yield c
    for cl in clients:
        cl.close()


def _offer(address: str, pd_id: str, token: int):
    async def go():
        cl = AsyncCoordinatorClient(address)
        try:
            return await cl.first(pd_id, token)
        finally:
            cl.close()
    return asyncio.run(go())


def test_the_waiter_is_pending_until_the_proxy_hands_the_token_over(coord):
    w = FirstWaiter(coord.client(), deadline_s=10.0, poll_s=0.2)
    try:
        assert w.poll("q1") is PENDING
        time.sleep(0.5)  # several polls of the coordinator go by
        assert w.poll("q1") is PENDING
        assert _offer(coord.address, "q1", 77) is True
        assert until(lambda: w.poll("q1") is not PENDING) and w.poll("q1") == 77
    finally:
        w.close()


def test_past_its_deadline_the_waiter_gives_up_and_the_proxy_is_told_so(coord):
    w = FirstWaiter(coord.client(), deadline_s=0.3, poll_s=0.1)
    try:
        assert w.poll("q2") is PENDING
        assert until(lambda: w.poll("q2") is not PENDING) and w.poll("q2") == RECOMPUTE
        assert _offer(coord.address, "q2", 5) is False  # too late: the decode computes token 1
    finally:
        w.close()


def test_a_decode_that_cannot_wait_gives_up_at_once_but_takes_a_token_already_there(coord):
    w = FirstWaiter(coord.client(), deadline_s=10.0, poll_s=0.2)
    try:
        assert w.poll("q3", give_up=True) is PENDING
        assert until(lambda: w.poll("q3") is not PENDING) and w.poll("q3") == RECOMPUTE
        assert _offer(coord.address, "q3", 5) is False
        assert _offer(coord.address, "q4", 6) is True
        assert w.poll("q4", give_up=True) is PENDING
        assert until(lambda: w.poll("q4") is not PENDING) and w.poll("q4") == 6
    finally:
        w.close()


def test_an_aborted_transfer_settles_as_recompute(coord):
    w = FirstWaiter(coord.client(), deadline_s=10.0, poll_s=0.2)
    try:
        assert w.poll("q5") is PENDING
        assert coord.client().abort("q5", "client went away")
        assert until(lambda: w.poll("q5") is not PENDING) and w.poll("q5") == RECOMPUTE
    finally:
        w.close()


def test_without_a_coordinator_the_waiter_settles_as_recompute_after_its_deadline():
    w = FirstWaiter(CoordinatorClient("tcp://127.0.0.1:1", timeout_s=0.2), deadline_s=0.3, poll_s=0.1)
    try:
        assert w.poll("q6") is PENDING
        assert until(lambda: w.poll("q6") is not PENDING, timeout_s=10) and w.poll("q6") == RECOMPUTE
    finally:
        w.close()
        w.client.close()


# ---- the scheduler half with vLLM's Request ----------------------------------------------------


def _request(prompt: list[int], max_tokens: int = 10, min_tokens: int = 0, handoff: bool = True, block: int = 16):
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    params = {"pd_id": "r-pd", "do_remote_prefill": True, **({"handoff": True} if handoff else {})}
    sp = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, temperature=0,
                        extra_args={"kv_transfer_params": params})
    return Request(request_id="r", prompt_token_ids=list(prompt), sampling_params=sp, pooling_params=None,
                   block_hasher=get_request_block_hasher(block, sha256))


class _Published:
    def __init__(self):
        self.all = True

    def __call__(self, keys):
        return self.all


def _side(first, published=None):
    return SchedulerSide(16, False, True, chunk_size=16, published=published or _Published(),
                         sync_wait_s=10.0, sync_wait_tokens=1 << 20, first=first)


def test_the_lookup_waits_for_token_1_then_the_prompt_grows_by_it_once(coord):
    w = FirstWaiter(coord.client(), deadline_s=10.0, poll_s=0.2)
    try:
        side = _side(w)
        req = _request(list(range(100, 131)), max_tokens=10, min_tokens=3)  # 31 tokens: token 1 fills block 2
        assert side.get_num_new_matched_tokens(req, 0) == (None, False)  # waiting for token 1
        assert side.get_num_new_matched_tokens(req, 0) == (None, False)
        assert _offer(coord.address, "r-pd", 999) is True
        assert until(lambda: side.get_num_new_matched_tokens(req, 0)[0] is not None)
        assert list(req.prompt_token_ids) == list(range(100, 131)) + [999]
        assert list(req.all_token_ids) == list(req.prompt_token_ids) and req.num_prompt_tokens == 32
        assert req.num_tokens == 32 and len(req.block_hashes) == 2  # the block token 1 completed is hashed
        assert req.max_tokens == 9 and req.sampling_params.max_tokens == 9 and req.sampling_params.min_tokens == 2
        assert req.kv_transfer_params["kv_tokens"] == 31
        # The first-token path's lookup now: the prompt's 31 tokens load, vLLM computes token 1 (the 32nd).
        assert side.get_num_new_matched_tokens(req, 0) == (31, False)
        assert req.num_prompt_tokens == 32  # asked again (e.g. no blocks this step): appended once only
    finally:
        w.close()


def test_a_refused_hand_off_leaves_the_request_as_it_was_and_vllm_computes_the_last_token(coord):
    w = FirstWaiter(coord.client(), deadline_s=10.0, poll_s=0.2)
    try:
        side = _side(w)
        req = _request(list(range(100, 131)))
        assert side.get_num_new_matched_tokens(req, 0) == (None, False)
        assert _offer(coord.address, "r-pd", -1) is True  # the proxy: compute token 1 yourself
        assert until(lambda: side.get_num_new_matched_tokens(req, 0)[0] is not None)
        assert req.num_prompt_tokens == 31 and req.max_tokens == 10 and "kv_tokens" not in req.kv_transfer_params
        assert side.get_num_new_matched_tokens(req, 0) == (30, False)  # the whole prompt but its last token
    finally:
        w.close()


def test_a_decode_that_cannot_wait_for_every_chunk_gives_the_hand_off_up(coord):
    w = FirstWaiter(coord.client(), deadline_s=10.0, poll_s=0.2)
    try:
        side = SchedulerSide(16, False, True, chunk_size=16, published=None, first=w)  # no published check
        req = _request(list(range(100, 131)))
        assert side.get_num_new_matched_tokens(req, 0) == (None, False)  # until the give-up is answered
        assert until(lambda: side.get_num_new_matched_tokens(req, 0)[0] is not None)
        assert req.num_prompt_tokens == 31
        assert _offer(coord.address, "r-pd", 5) is False  # the proxy learns it computes token 1
        side.request_finished(req, [])
        assert w.poll("r-pd") is PENDING  # forgotten with its request (a new poll starts afresh)
    finally:
        w.close()


def test_requests_without_the_flag_never_wait_for_token_1(coord):
    w = FirstWaiter(coord.client(), deadline_s=10.0, poll_s=0.2)
    try:
        side = _side(w)
        req = _request(list(range(100, 131)), handoff=False)
        assert side.get_num_new_matched_tokens(req, 0) == (30, False)
        assert w._results == {}
    finally:
        w.close()
