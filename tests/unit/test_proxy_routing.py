"""The proxy's routing (pd/proxy/routing.py, prefix.py, kv_usage.py): prompt-prefix affinity for
prefill, load and KV-cache usage for decode, and the least_outstanding policy left as it was;
over real HTTP against several vLLM-validated doubles (tests/unit/vllm_http_double.py).
"""
from __future__ import annotations

import asyncio
import random
from contextlib import ExitStack, asynccontextmanager
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from vllm_http_double import SERVED, VllmHttpDouble

from common.config import ConfigError
from pd.config import ProxyConfig
from pd.proxy.kv_usage import KVUsage, parse_usage
from pd.proxy.prefix import MAX_BLOCKS, PrefixIndex, prompt_blocks
from pd.proxy.routing import Pool
from pd.proxy.server import Proxy
from tests.unit.test_proxy import FakeCoord, eventually, run

BLOCK = 16  # tokens per block in these tests: a text block is 64 bytes


def doc(seed: int, n_bytes: int) -> str:
    """A document of ``n_bytes`` ASCII bytes, different for each seed."""
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefgh ") for _ in range(n_bytes))


# ---- prompt blocks --------------------------------------------------------------------------------


def test_prompts_that_share_a_prefix_share_its_block_hashes_and_only_those():
    a, b = doc(1, 640) + "question one?" * 20, doc(1, 640) + "another one!" * 20
    ha, hb = prompt_blocks({"prompt": a}, BLOCK), prompt_blocks({"prompt": b}, BLOCK)
    assert len(ha) == len(a) // 64 and ha[:10] == hb[:10] and ha[10] != hb[10]
    assert prompt_blocks({"prompt": doc(2, 640)}, BLOCK)[0] != ha[0]
    assert prompt_blocks({"prompt": "short"}, BLOCK) == []  # less than a block


def test_token_ids_chat_and_fields_that_change_the_kv():
    ids = list(range(100))
    assert len(prompt_blocks({"prompt": ids}, BLOCK)) == 6  # whole blocks only
    assert prompt_blocks({"prompt": ids}, BLOCK)[:2] == prompt_blocks({"prompt": ids[:40]}, BLOCK)
    turn1 = [{"role": "system", "content": doc(3, 300)}, {"role": "user", "content": "hi " * 30}]
    turn2 = turn1 + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more " * 40}]
    h1, h2 = prompt_blocks({"messages": turn1}, BLOCK), prompt_blocks({"messages": turn2}, BLOCK)
    assert h1 and h2[:len(h1)] == h1  # the next turn of a conversation extends its prefix
    body = {"prompt": doc(4, 256)}
    for other in ({**body, "cache_salt": "s"}, {**body, "model": "lora-a"}):
        assert prompt_blocks(other, BLOCK)[0] != prompt_blocks(body, BLOCK)[0]
    assert len(prompt_blocks({"prompt": doc(5, 64 * (MAX_BLOCKS + 7))}, BLOCK)) == MAX_BLOCKS
    lone = "\ud800" * 70  # what json.loads gives for "\\ud800": hashed, not a 500
    assert prompt_blocks({"prompt": lone}, BLOCK) and prompt_blocks({"messages": [{"content": lone}]}, BLOCK)


@pytest.mark.parametrize("body", [
    None, [], {"prompt": ["a" * 500, "b" * 500]}, {"prompt": [[1] * 50, [2] * 50]}, {"prompt": [True] * 50},
    {"prompt": [1 << 70] * 50}, {"prompt": "x" * 500, "prompt_embeds": "abc"}, {"messages": "x" * 500},
    {"prompt": 7}, {},
])
def test_bodies_without_one_readable_prompt_have_no_blocks(body):
    assert prompt_blocks(body, BLOCK) == []


def test_index_is_a_bounded_lru_that_keeps_the_newest_owners():
    idx = PrefixIndex(max_entries=4, owners=2)
    idx.record([b"a", b"b", b"c"], "u1")
    idx.record([b"a", b"b"], "u2")
    idx.record([b"a"], "u3")
    assert idx.match([b"a", b"b", b"c"], ["u1", "u2", "u3"]) == {"u1": 3, "u2": 2, "u3": 1}
    assert idx.match([b"a", b"x"], ["u1", "u2", "u3"]) == {"u3": 1, "u2": 1}  # u1 fell off a's owners
    idx.record([b"d", b"e"], "u1")  # 5 hashes: the least recently recorded (c) goes
    assert len(idx) == 4 and idx.match([b"a", b"b", b"c"], ["u1", "u2", "u3"]) == {"u2": 2, "u1": 2, "u3": 1}
    with pytest.raises(ValueError, match="positive"):
        PrefixIndex(0, 1)
    with pytest.raises(ValueError, match="block_tokens must be positive"):
        prompt_blocks({"prompt": "x"}, 0)


# ---- the pool's choice ----------------------------------------------------------------------------


def _pool(policy: str, n: int = 4, role: str = "prefill", slack: int = 2) -> Pool:
    return Pool(role, [f"http://p{i}" for i in range(n)], policy, block_tokens=BLOCK, slack=slack)


def _send(pool: Pool, body: dict, stack: ExitStack) -> str:
    """Pick for ``body`` and keep the request in flight until ``stack`` closes."""
    url = pool.pick(body)
    stack.enter_context(pool.track(url))
    return url


def test_requests_sharing_a_prefix_go_to_one_instance_and_new_prefixes_to_the_least_loaded():
    pool, docs = _pool("prefix"), [doc(10 + i, 1024) for i in range(4)]
    first = [pool.pick({"prompt": d + "q0"}) for d in docs]
    assert len(set(first)) == 4  # nothing matched yet: round-robin among the equally loaded
    for k in range(1, 6):
        for d, url in zip(docs, first):
            assert pool.pick({"prompt": d + f" question {k}" * 30}) == url
    assert pool.routes == {"hit": 20, "spill": 0, "miss": 4}


def test_a_hot_instance_spills_beyond_the_slack_and_the_prefix_then_lives_on_two():
    pool, hot = _pool("prefix", slack=2), {"prompt": doc(20, 1024)}
    with ExitStack() as busy:
        urls = [_send(pool, hot, busy) for _ in range(4)]
        assert urls[:3] == [urls[0]] * 3 and urls[3] != urls[0]  # 3 in flight > 0 + 2: spill
        assert pool.routes["spill"] == 1
        # both now hold the prefix: the next one goes to the less loaded of the two
        assert _send(pool, hot, busy) == urls[3]
        assert {_send(pool, {"prompt": doc(21, 1024)}, busy) for _ in range(2)} <= set(pool.urls) - {urls[0], urls[3]}
    assert pool.pick(hot) in (urls[0], urls[3])


def test_least_outstanding_and_round_robin_ignore_prefixes_as_before():
    body = {"prompt": doc(30, 1024)}
    lo = _pool("least_outstanding")
    with ExitStack() as busy:
        assert [_send(lo, body, busy) for _ in range(4)] == lo.urls  # one each, as any load
        busy.enter_context(lo.track("http://p2"))
        assert [lo.pick(body) for _ in range(3)] == ["http://p0", "http://p1", "http://p3"]
    rr = _pool("round_robin")
    assert [rr.pick(body) for _ in range(5)] == rr.urls + rr.urls[:1]
    assert lo.index is None and lo.routes == {"hit": 0, "spill": 0, "miss": 0}


def test_decode_goes_by_load_then_kv_usage_and_avoids_a_nearly_full_cache():
    pool = Pool("decode", ["http://d0", "http://d1", "http://d2"], "prefix", kv_poll_s=1.0)
    assert pool.index is None and pool.kv is not None
    pool.kv.set("http://d0", 0.97)
    pool.kv.set("http://d1", 0.55)
    pool.kv.set("http://d2", 0.12)
    with ExitStack() as busy:
        assert _send(pool, {"prompt": doc(40, 1024)}, busy) == "http://d2"  # equal load: emptiest cache
        assert _send(pool, {}, busy) == "http://d1"  # d2 has one more in flight; d0 is nearly full
        assert _send(pool, {}, busy) in ("http://d1", "http://d2")
        busy.enter_context(pool.track("http://d1"))
        busy.enter_context(pool.track("http://d2"))
        assert pool.pick() != "http://d0"  # it has fewer in flight but no room
    pool.kv.set("http://d0", None)  # unknown: judged by load alone
    assert pool.pick() == "http://d0"


def test_a_colocated_pool_has_prefix_affinity_and_kv_usage_a_prefill_pool_no_kv_usage():
    assert Pool("colocated", ["http://c0"], "prefix", kv_poll_s=1.0).index is not None
    assert Pool("prefill", ["http://p0"], "prefix", kv_poll_s=1.0).kv is None
    assert Pool("decode", ["http://d0"], "prefix", kv_poll_s=0).kv is None
    with pytest.raises(ConfigError, match="choose one of prefix, least_outstanding, round_robin"):
        Pool("prefill", ["http://p0"], "sticky")


# ---- /metrics ---------------------------------------------------------------------------------------

METRICS = b"""# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.625
vllm:kv_cache_usage_percent_other 0.99
vllm:num_requests_running{engine="0",model_name="m"} 3.0
"""


def test_usage_is_the_fullest_engines_and_nothing_else():
    assert parse_usage(METRICS) == 0.625
    assert parse_usage(b"vllm:gpu_cache_usage_perc 0.5\n") == 0.5  # older vLLM
    for bad in (b"", b"vllm:kv_cache_usage_perc NaN\n", b"vllm:kv_cache_usage_perc 7\n", b"# vllm:kv_cache_usage_perc 0.1\n",
                b"vllm:kv_cache_usage_perc{x=\"1\"} zero\n"):
        assert parse_usage(bad) is None
    with pytest.raises(ValueError, match="interval_s must be positive"):
        KVUsage(0)


# ---- over HTTP --------------------------------------------------------------------------------------


class Instance(VllmHttpDouble):
    """vLLM's request validation and answers, plus: ``hold`` delays answers; ``/metrics`` gives
    ``kv_usage`` as vLLM names it (None: 404)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.hold: asyncio.Event | None = None
        self.kv_usage: float | None = None

    async def _answer(self, request, req, chat):
        if self.hold is not None:
            await self.hold.wait()
        return await super()._answer(request, req, chat)

    async def metrics(self, request: web.Request) -> web.Response:
        if self.kv_usage is None:
            return web.Response(status=404)
        return web.Response(text=f'vllm:kv_cache_usage_perc{{engine="0",model_name="{SERVED}"}} {self.kv_usage}\n')

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/metrics", self.metrics)
        return app


@pytest.fixture(scope="module", autouse=True)
def vllm_imported():
    """vLLM's request models, imported once before any timed test (seconds on a busy machine)."""
    Instance("warm-up")


@asynccontextmanager
async def deployment(n_p: int, n_d: int, **cfg):
    insts = [Instance(f"p{i}") for i in range(n_p)] + [Instance(f"d{i}") for i in range(n_d)]
    runners = []
    for inst in insts:
        r = web.AppRunner(inst.app(), handler_cancellation=True, access_log=None)
        await r.setup()
        await web.TCPSite(r, "127.0.0.1", 0).start()
        runners.append(r)
        inst.url = f"http://127.0.0.1:{r.addresses[0][1]}"
    p, d = insts[:n_p], insts[n_p:]
    proxy = Proxy([i.url for i in p], [i.url for i in d],
                  ProxyConfig(upstream_timeout_s=10, prefix_block_tokens=BLOCK, **cfg))
    proxy.coord = FakeCoord()
    prunner, port = await proxy.start()
    try:
        async with aiohttp.ClientSession() as client:
            yield SimpleNamespace(p=p, d=d, proxy=proxy, url=f"http://127.0.0.1:{port}", client=client)
    finally:
        for inst in insts:
            if inst.hold is not None:
                inst.hold.set()
        await prunner.cleanup()
        for r in runners:
            await r.cleanup()


async def _complete(env, prompt: str) -> dict:
    async with env.client.post(env.url + "/v1/completions",
                               json={"model": SERVED, "prompt": prompt, "max_tokens": 3}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def _prefill_of(env) -> dict[str, str]:
    """prompt -> the prefill instance that got it."""
    return {b["prompt"]: inst.name for inst in env.p for b in inst.bodies}


@pytest.mark.parametrize("policy", ["prefix", "least_outstanding"])
def test_over_http_a_shared_prefix_stays_on_one_prefill_only_under_the_prefix_policy(policy):
    async def go():
        async with deployment(3, 2, policy=policy) as env:
            docs = [doc(50 + i, 2048) for i in range(3)]
            prompts = [d + f" question {k}?" for d in docs for k in range(4)]
            for prompt in prompts:
                await _complete(env, prompt)
            got = _prefill_of(env)
            per_doc = [{got[d + f" question {k}?"] for k in range(4)} for d in docs]
            if policy == "prefix":
                assert all(len(s) == 1 for s in per_doc) and len(set.union(*per_doc)) == 3
                assert env.proxy.prefill.routes == {"hit": 9, "spill": 0, "miss": 3}
                async with env.client.get(env.url + "/metrics") as r:
                    text = await r.text()
                assert 'pdkv_proxy_prefix_routes{outcome="hit",role="prefill"} 9.0' in text
            else:  # one at a time: each instance in turn (request i on instance i % 3), whatever the prompt
                assert all(len(s) == 3 for s in per_doc)
            assert sum(len(i.bodies) for i in env.d) == len(prompts)
    run(go())


def test_over_http_a_hot_prefill_spills_to_others_and_all_answers_arrive():
    async def go():
        async with deployment(3, 1, policy="prefix", prefix_load_slack=1) as env:
            gate = asyncio.Event()
            for inst in env.p:
                inst.hold = gate
            hot = doc(60, 2048)
            tasks = []
            for k in range(5):  # one at a time into the proxy, all held at the prefills
                tasks.append(asyncio.ensure_future(_complete(env, hot + f" q{k}")))
                await eventually(lambda: sum(len(i.bodies) for i in env.p) == k + 1)
            # slack 1: the holder takes 2 and the 3rd spills to an idle one, which then holds the
            # prefix too and takes the 4th; both are 1 beyond the idle third, which gets the 5th
            assert sorted(len(i.bodies) for i in env.p) == [1, 2, 2]
            assert env.proxy.prefill.routes == {"hit": 2, "spill": 2, "miss": 1}
            gate.set()
            answers = await asyncio.gather(*tasks)
            assert all(a["choices"][0]["text"] for a in answers)
    run(go())


def test_over_http_decode_avoids_an_instance_whose_kv_cache_is_full():
    async def go():
        async with deployment(1, 2, policy="prefix", kv_usage_poll_s=0.05) as env:
            env.d[0].kv_usage, env.d[1].kv_usage = 0.98, 0.30
            kv = env.proxy.decode.kv
            await eventually(lambda: kv.get(env.d[0].url) == 0.98 and kv.get(env.d[1].url) == 0.30)
            for k in range(4):
                await _complete(env, f"prompt {k}")
            assert (len(env.d[0].bodies), len(env.d[1].bodies)) == (0, 4)
            env.d[0].kv_usage = None  # /metrics gone: unknown again, load alone decides
            await eventually(lambda: kv.get(env.d[0].url) is None)
            for k in range(2):
                await _complete(env, f"prompt {k}")
            assert len(env.d[0].bodies) == 2  # unknown usage counts as empty: d0 wins the ties
    run(go())


def test_pd_proxy_cli_refuses_a_bad_routing_option(capsys):
    from launch.cli import main as cli_main

    assert cli_main(["proxy", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2",
                     "--prefix-load-slack", "-1"]) == 2
    assert "prefix_load_slack" in capsys.readouterr().err
    assert ProxyConfig().policy == "prefix"


def test_kv_usage_forgets_instances_that_left_the_pools():
    """An instance removed through /pd/pools is not remembered for ever (the watch keeps only the
    pools' current URLs)."""
    u = KVUsage(1.0)
    for url, usage in (("http://a", 0.5), ("http://b", 0.9), ("http://c", 0.1)):
        u.set(url, usage)
    u.keep(["http://a", "http://c", "http://d"])
    assert (u.get("http://a"), u.get("http://b"), u.get("http://c"), u.get("http://d")) == (0.5, None, 0.1, None)
    assert sorted(u._seen) == ["http://a", "http://c"]
