"""Token 1 handed to an early decode (issue 16), below the HTTP layer: the coordinator's FIRST /
AWAIT_FIRST over real ZMQ, the decode scheduler's waiter threads (``FirstWaiter``), and the
scheduler half's lookup with vLLM's own ``Request`` (the prompt grows by token 1 once; what vLLM
counts follows). The rule under test: the proxy and the decode never disagree about whether the
decode's answer starts at token 1 or at token 2."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import zmq
from vllm.v1.request import RequestStatus

from pd.config import CoordinatorConfig
from pd.connector.first_wait import PENDING, RECOMPUTE, FirstSender, FirstWaiter
from pd.connector.scheduler import SchedulerSide
from pd.coordinator.client import AsyncCoordinatorClient, CoordinatorClient
from pd.coordinator.first import NONE
from pd.coordinator.protocol import Abort, Ack, AwaitFirst, Error, First, FirstOutcome, FirstToken, WaitTimeout, encode
from pd.coordinator.server import Coordinator
from tests.unit.test_coordinator import ctx, peers, start_coord, until  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(60)


# ---- the coordinator ---------------------------------------------------------------------------


def test_a_first_while_the_decode_waits_is_handed_over_and_the_proxy_hears_it(peers):
    prefill, decode, proxy = peers(), peers(), peers()
    decode.send(AwaitFirst("p1", 5.0))
    assert decode.recv(0.3) is None  # parked: the decode is registered
    assert proxy.query().counters["waiters"] == 1
    assert isinstance(prefill.req(First("p1", 42)), Ack)
    assert decode.recv() == FirstToken("p1", 42)
    assert proxy.req(FirstOutcome("p1", 1.0)) == FirstToken("p1", 42)
    assert isinstance(prefill.req(First("p1", 42)), Ack)  # the same token again: idempotent
    assert isinstance(prefill.req(First("p1", 43)), Error)  # another one: refused
    assert proxy.query().counters["waiters"] == 0


def test_a_first_with_no_decode_waiting_settles_that_the_decode_computes_token_1(peers):
    prefill, decode, proxy = peers(), peers(), peers()
    reply = prefill.req(First("p2", 7))
    assert isinstance(reply, Error) and "no decode waits" in reply.reason
    assert decode.req(AwaitFirst("p2", 5.0)) == FirstToken("p2", NONE)  # at once: compute it yourself
    assert proxy.req(FirstOutcome("p2", 1.0)) == FirstToken("p2", NONE)


def test_the_proxy_waits_for_the_first_and_past_its_timeout_settles_none(peers):
    prefill, decode, proxy, late = peers(), peers(), peers(), peers()
    decode.send(AwaitFirst("p3", 5.0))
    proxy.send(FirstOutcome("p3", 5.0))
    assert proxy.recv(0.3) is None  # parked until the prefill's FIRST
    assert isinstance(prefill.req(First("p3", 9)), Ack)
    assert proxy.recv() == FirstToken("p3", 9) and decode.recv() == FirstToken("p3", 9)
    decode.send(AwaitFirst("p4", 5.0))
    assert until(lambda: prefill.query().counters["waiters"] == 1)  # registered before the proxy asks
    t0 = time.monotonic()
    assert late.req(FirstOutcome("p4", 0.3)) == FirstToken("p4", NONE)  # no FIRST came
    assert 0.25 < time.monotonic() - t0 < 2.5
    assert decode.recv() == FirstToken("p4", NONE)  # told at once: it computes token 1
    assert isinstance(prefill.req(First("p4", 9)), Error)  # too late


def test_past_its_timeout_with_no_decode_asking_here_the_proxy_hears_unknown(peers):
    """No FIRST and no decode: the proxy cannot tell a hand-off this coordinator never saw from
    one a restarted coordinator lost (that decode's answer starts at token 2): unknown, not -1."""
    prefill, decode, proxy = peers(), peers(), peers()
    reply = proxy.req(FirstOutcome("u1", 0.3))
    assert isinstance(reply, Error) and "unknown" in reply.reason, reply
    assert decode.req(AwaitFirst("u1", 5.0)) == FirstToken("u1", NONE)  # settled all the same
    assert isinstance(prefill.req(First("u1", 4)), Error)
    assert isinstance(proxy.req(FirstOutcome("u2", 0.0)), Error)  # asked without waiting: the same
    assert proxy.req(FirstOutcome("u1", 0.3)) == FirstToken("u1", NONE)  # once settled, it is read
    assert proxy.query().counters["first_unknowns"] == 2


def test_an_await_first_a_stalled_coordinator_reads_late_registers_nothing(peers):
    """The coordinator stalled (2 s) while a decode's AWAIT_FIRST of a 0.3 s slice waited in its
    socket: by the time it reads it, the decode has stopped waiting (and, past its give-ups, computes
    token 1 itself: ``FirstWaiter``), so a FIRST read after it must settle -1, not hand the token to
    a decode that no longer waits (it would give token 1 twice). The FIRST goes on the decode's own
    socket, so it is read after the AWAIT_FIRST."""
    decode, proxy = peers(), peers()
    coord = peers.holder["coord"]
    stall, stalled, sweep = threading.Event(), threading.Event(), coord.state.sweep

    def stalling_sweep(now: float) -> None:
        if stall.is_set():
            stall.clear()
            stalled.set()
            time.sleep(2.0)
        sweep(now)

    coord.state.sweep = stalling_sweep
    stall.set()
    assert stalled.wait(5)
    decode.send(AwaitFirst("z1", 0.3))
    time.sleep(1.0)  # its slice and REGISTERED_MARGIN_S are over: the decode no longer counts on it
    decode.send(First("z1", 7))
    assert decode.recv(5.0) == WaitTimeout("z1")  # read late: not registered (it asks again if it waits)
    reply = decode.recv(5.0)
    assert isinstance(reply, Error) and "no decode waits" in reply.reason, reply
    assert proxy.req(FirstOutcome("z1", 0.3)) == FirstToken("z1", NONE)
    assert proxy.query().counters["first_waits_stale"] == 1
    decode.send(AwaitFirst("z2", 5.0))  # and a fresh one registers as before
    assert until(lambda: proxy.query().counters["waiters"] == 1)
    assert isinstance(proxy.req(First("z2", 8)), Ack) and decode.recv() == FirstToken("z2", 8)


def test_a_decode_slice_times_out_and_it_stays_registered(peers):
    prefill, decode = peers(), peers()
    assert decode.req(AwaitFirst("p5", 0.3)) == WaitTimeout("p5")  # ask again
    assert isinstance(prefill.req(First("p5", 3)), Ack)  # still registered between its slices
    assert decode.req(AwaitFirst("p5", 0.3)) == FirstToken("p5", 3)


def test_a_give_up_settles_none_unless_the_token_is_there(peers):
    prefill, decode, other = peers(), peers(), peers()
    other.send(AwaitFirst("p6", 5.0))
    assert other.recv(0.3) is None
    assert decode.req(AwaitFirst("p6", 0.0, give_up=True)) == FirstToken("p6", NONE)
    assert other.recv() == FirstToken("p6", NONE)
    assert isinstance(prefill.req(First("p6", 11)), Error)
    decode.send(AwaitFirst("p7", 5.0))
    assert until(lambda: other.query().counters["waiters"] == 1)  # registered before the FIRST comes
    assert isinstance(prefill.req(First("p7", 5)), Ack)
    assert decode.recv() == FirstToken("p7", 5)
    assert decode.req(AwaitFirst("p7", 0.0, give_up=True)) == FirstToken("p7", 5)  # must be used


def test_an_abort_answers_the_askers_and_refuses_firsts(peers):
    prefill, decode, proxy = peers(), peers(), peers()
    decode.send(AwaitFirst("p8", 5.0))
    proxy.send(FirstOutcome("p8", 5.0))
    assert decode.recv(0.3) is None and proxy.recv(0.1) is None  # both parked
    assert isinstance(peers().req(Abort("p8", "client went away")), Ack)
    for p in (decode, proxy):
        reply = p.recv()
        assert type(reply).__name__ == "Aborted" and reply.reason == "client went away", reply
    assert isinstance(prefill.req(First("p8", 1)), Error)


def test_a_token_out_of_range_is_refused_at_decoding(peers):
    prefill = peers()
    for bad in (-2, 1 << 31):
        reply = prefill.req(First("p9", bad))
        assert isinstance(reply, Error) and "token_id" in reply.reason, reply


def test_settlements_and_registrations_expire_after_the_entry_ttl(peers):
    prefill, decode = peers(entry_ttl_s=0.3), peers()
    assert decode.req(AwaitFirst("q0", 0.05)) == WaitTimeout("q0")
    assert isinstance(prefill.req(First("x0", 3)), Error)  # settled: none
    time.sleep(1.5)  # swept
    assert isinstance(prefill.req(First("q0", 3)), Error)  # the registration is gone: none waits
    assert decode.req(AwaitFirst("x0", 0.05)) == WaitTimeout("x0")  # the old settlement is gone


# ---- the decode scheduler's waiter thread and the prefill's sender -------------------------------


@pytest.fixture
def coord(start_coord):
    c = start_coord()
    clients, waiters = [], []

    def client(**kw):
        cl = CoordinatorClient(c.address, **kw)
        clients.append(cl)
        return cl

    def waiter(**kw):
        w = FirstWaiter(c.address, **kw)
        waiters.append(w)
        return w

    c.client, c.waiter = client, waiter
    yield c
    for w in waiters:
        w.close()
    for cl in clients:
        cl.close()


def _outcome(address: str, pd_id: str, timeout_s: float = 1.0):
    async def go():
        cl = AsyncCoordinatorClient(address)
        try:
            return await cl.first_outcome(pd_id, timeout_s)
        finally:
            cl.close()
    return asyncio.run(go())


def test_the_waiter_is_pending_until_the_prefill_hands_the_token_over(coord):
    w = coord.waiter(deadline_s=10.0, poll_s=0.2)
    sender = FirstSender(coord.client())
    try:
        assert w.poll("q1") is PENDING
        time.sleep(0.5)  # several slices go by
        assert w.poll("q1") is PENDING
        sender.send("q1", 77)
        assert until(lambda: w.poll("q1") is not PENDING) and w.poll("q1") == 77
        assert _outcome(coord.address, "q1") == 77
    finally:
        sender.close()


def test_many_waits_at_once_share_one_thread_and_each_gets_its_own_token(coord):
    w = coord.waiter(deadline_s=10.0, poll_s=0.5)
    ids = [f"m{i}" for i in range(100)]
    for p in ids:
        assert w.poll(p) is PENDING
    assert until(lambda: coord.client().query().counters["waiters"] == 100)
    cl = coord.client()
    for i, p in enumerate(ids):
        assert cl.first(p, i)
    assert until(lambda: all(w.poll(p) is not PENDING for p in ids))
    assert [w.poll(p) for p in ids] == list(range(100))


def test_past_its_deadline_the_waiter_gives_up_and_the_proxy_hears_none(coord):
    w = coord.waiter(deadline_s=0.3, poll_s=0.1)
    assert w.poll("q2") is PENDING
    assert until(lambda: w.poll("q2") is not PENDING) and w.poll("q2") == RECOMPUTE
    assert not coord.client().first("q2", 5)  # too late: the decode computes token 1
    assert _outcome(coord.address, "q2") == RECOMPUTE


def test_a_decode_that_cannot_wait_gives_up_at_once(coord):
    w = coord.waiter(deadline_s=10.0, poll_s=0.2)
    assert w.poll("q3", give_up=True) is PENDING
    assert until(lambda: w.poll("q3") is not PENDING) and w.poll("q3") == RECOMPUTE
    assert not coord.client().first("q3", 5)


def test_an_aborted_transfer_settles_as_recompute(coord):
    w = coord.waiter(deadline_s=10.0, poll_s=0.2)
    assert w.poll("q5") is PENDING
    time.sleep(0.3)
    assert coord.client().abort("q5", "client went away")
    assert until(lambda: w.poll("q5") is not PENDING) and w.poll("q5") == RECOMPUTE


def test_a_hand_off_a_restarted_coordinator_lost_is_unknown_to_the_proxy_not_recompute():
    """The decode was handed token 1 (its answer starts at token 2), then the coordinator restarted
    before the proxy asked: the proxy must not hear -1 (it would take token 2 for token 1, and drop
    it when the two are the same token)."""
    old = Coordinator(CoordinatorConfig(host="127.0.0.1", port=0)).start_in_thread()
    address, new = old.address, None
    w, cl = FirstWaiter(address, deadline_s=10.0, poll_s=0.2), CoordinatorClient(address)
    try:
        assert w.poll("r1") is PENDING
        assert until(lambda: cl.query().counters["waiters"] == 1)
        assert cl.first("r1", 5)
        assert until(lambda: w.poll("r1") is not PENDING) and w.poll("r1") == 5  # handed over
        old.stop()
        new = Coordinator(CoordinatorConfig(host="127.0.0.1", port=old.port)).start_in_thread()
        assert _outcome(address, "r1", 0.3) is None  # unknown: the proxy does not use that decode
        assert _outcome(address, "r1", 0.3) == RECOMPUTE  # (settled here now, for any late asker)
    finally:
        w.close()
        cl.close()
        old.stop()
        if new is not None:
            new.stop()


def test_refused_calls_are_asked_again_a_slice_later_not_in_a_busy_loop():
    """A peer that answers every AWAIT_FIRST with an Error at once (a refused key, a coordinator
    without the message): the waiter asks again only after a slice and its margin."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    w = FirstWaiter(f"tcp://127.0.0.1:{port}", deadline_s=30.0, poll_s=0.2)
    got = 0
    try:
        assert w.poll("q7") is PENDING
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            if router.poll(100):
                ident, *_ = router.recv_multipart()
                got += 1
                router.send_multipart([ident, *encode(Error("refused"))])
        assert 1 <= got <= 3, got  # at 0 s, then about every 1.2 s (the slice + 1 s)
        assert w.poll("q7") is PENDING
    finally:
        w.close()
        router.close(0)


def test_without_a_coordinator_the_waiter_settles_as_recompute_after_its_deadline():
    w = FirstWaiter("tcp://127.0.0.1:1", deadline_s=0.3, poll_s=0.1)
    try:
        assert w.poll("q6") is PENDING
        assert until(lambda: w.poll("q6") is not PENDING, timeout_s=15) and w.poll("q6") == RECOMPUTE
    finally:
        w.close()


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
    w = coord.waiter(deadline_s=10.0, poll_s=0.2)
    side = _side(w)
    req = _request(list(range(100, 131)), max_tokens=10, min_tokens=3)  # 31 tokens: token 1 fills block 2
    assert side.get_num_new_matched_tokens(req, 0) == (None, False)  # waiting for token 1
    assert side.get_num_new_matched_tokens(req, 0) == (None, False)
    assert until(lambda: coord.client().query().counters["waiters"] == 1)  # registered
    assert coord.client().first("r-pd", 999)  # the prefill's scheduler hands token 1 over
    assert until(lambda: side.get_num_new_matched_tokens(req, 0)[0] is not None)
    assert list(req.prompt_token_ids) == list(range(100, 131)) + [999]
    assert list(req.all_token_ids) == list(req.prompt_token_ids) and req.num_prompt_tokens == 32
    assert req.num_tokens == 32 and len(req.block_hashes) == 2  # the block token 1 completed is hashed
    assert req.max_tokens == 9 and req.sampling_params.max_tokens == 9 and req.sampling_params.min_tokens == 2
    assert req.kv_transfer_params["kv_tokens"] == 31
    # The first-token path's lookup now: the prompt's 31 tokens load, vLLM computes token 1 (the 32nd).
    assert side.get_num_new_matched_tokens(req, 0) == (31, False)
    assert req.num_prompt_tokens == 32  # asked again (e.g. no blocks this step): appended once only


def test_a_handed_request_waits_for_its_last_chunks_to_load_them_within_one_step(coord):
    """The prefill's scheduler sends token 1 as its request ends, often before its worker has
    published the last chunks: the handed request waits for them (as a whole-prompt early decode
    does) rather than going asynchronous (a WAIT, and the load reported a step later)."""
    w = coord.waiter(deadline_s=10.0, poll_s=0.2)
    published = _Published()
    published.all = False
    side = _side(w, published)
    req = _request(list(range(100, 131)))
    assert side.get_num_new_matched_tokens(req, 0) == (None, False)
    assert until(lambda: coord.client().query().counters["waiters"] == 1)
    assert coord.client().first("r-pd", 7)
    def handed():
        assert side.get_num_new_matched_tokens(req, 0) == (None, False)  # waiting: the token, then the chunks
        return req.num_prompt_tokens == 32
    assert until(handed)
    assert side.get_num_new_matched_tokens(req, 0) == (None, False)  # handed, its chunks not all out
    published.all = True
    assert side.get_num_new_matched_tokens(req, 0) == (31, False)  # loaded within the step


def test_a_hand_off_settled_none_leaves_the_request_as_it_was_and_vllm_computes_the_last_token(coord):
    w = coord.waiter(deadline_s=10.0, poll_s=0.2)
    side = _side(w)
    req = _request(list(range(100, 131)))
    assert side.get_num_new_matched_tokens(req, 0) == (None, False)
    assert _outcome(coord.address, "r-pd", 0.2) == NONE  # no FIRST came: the proxy's wait settles none
    assert until(lambda: side.get_num_new_matched_tokens(req, 0)[0] is not None)
    assert req.num_prompt_tokens == 31 and req.max_tokens == 10 and "kv_tokens" not in req.kv_transfer_params
    assert side.get_num_new_matched_tokens(req, 0) == (30, False)  # the whole prompt but its last token


def test_a_decode_that_cannot_wait_for_every_chunk_gives_the_hand_off_up(coord):
    w = coord.waiter(deadline_s=10.0, poll_s=0.2)
    side = SchedulerSide(16, False, True, chunk_size=16, published=None, first=w)  # no published check
    req = _request(list(range(100, 131)))
    assert side.get_num_new_matched_tokens(req, 0) == (None, False)  # until the give-up is answered
    assert until(lambda: side.get_num_new_matched_tokens(req, 0)[0] is not None)
    assert req.num_prompt_tokens == 31
    assert not coord.client().first("r-pd", 5)  # too late for the prefill
    assert _outcome(coord.address, "r-pd") == NONE  # and the proxy hears the decode computes token 1
    side.request_finished(req, [])
    assert w._results == {}  # forgotten with its request


def test_a_request_for_one_token_more_is_never_grown_to_ask_for_none(coord):
    """vLLM gives a request without max_tokens the context's end: one token where the prompt leaves
    room for one. Token 1 is then the whole answer (the proxy answers from the prefill alone), and
    a request for no token would stop the engine (SamplingParams refuses max_tokens 0)."""
    w = coord.waiter(deadline_s=10.0, poll_s=0.2)
    side = _side(w)
    req = _request(list(range(100, 131)), max_tokens=1)
    assert side.get_num_new_matched_tokens(req, 0) == (None, False)  # until its give-up is answered
    assert until(lambda: side.get_num_new_matched_tokens(req, 0)[0] is not None)
    assert not coord.client().first("r-pd", 5)  # settled: the decode computes token 1
    assert req.num_prompt_tokens == 31 and req.max_tokens == 1 and req.sampling_params.max_tokens == 1


def test_requests_without_the_flag_never_wait_for_token_1(coord):
    w = coord.waiter(deadline_s=10.0, poll_s=0.2)
    side = _side(w)
    req = _request(list(range(100, 131)), handoff=False)
    assert side.get_num_new_matched_tokens(req, 0) == (30, False)
    assert w._results == {}


def test_the_prefill_sends_the_token_it_sampled_when_its_request_finishes(coord):
    w = coord.waiter(deadline_s=10.0, poll_s=0.2)
    sender = FirstSender(coord.client())
    try:
        prefill = SchedulerSide(16, True, False, chunk_size=16, first_sender=sender)
        req = _request(list(range(100, 131)), max_tokens=1)
        req.kv_transfer_params = {"pd_id": "s-pd", "do_remote_decode": True, "handoff": True}
        prefill.on_new_request(req)
        assert w.poll("s-pd") is PENDING
        assert until(lambda: coord.client().query().counters["waiters"] == 1)
        req.append_output_token_ids(4242)  # what vLLM does before finishing it
        req.status = RequestStatus.FINISHED_LENGTH_CAPPED
        prefill.request_finished(req, [])
        assert until(lambda: w.poll("s-pd") is not PENDING) and w.poll("s-pd") == 4242
        plain = _request(list(range(100, 131)), max_tokens=1)
        plain.kv_transfer_params = {"pd_id": "t-pd", "do_remote_decode": True}  # no hand-off asked for
        prefill.on_new_request(plain)
        plain.append_output_token_ids(1)
        plain.status = RequestStatus.FINISHED_LENGTH_CAPPED
        prefill.request_finished(plain, [])
        eos = _request(list(range(100, 131)), max_tokens=1)
        eos.kv_transfer_params = {"pd_id": "u-pd", "do_remote_decode": True, "handoff": True}
        prefill.on_new_request(eos)
        eos.append_output_token_ids(2)
        eos.status = RequestStatus.FINISHED_STOPPED  # token 1 ended the answer: the decode is let go
        prefill.request_finished(eos, [])
        # No FIRST was sent for either (one would have settled -1: no decode waits for them), and
        # no decode asked: unknown.
        assert _outcome(coord.address, "t-pd", 0.3) is None
        assert _outcome(coord.address, "u-pd", 0.3) is None
    finally:
        sender.close()
