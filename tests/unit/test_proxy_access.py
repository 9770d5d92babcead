"""The proxy's edges: its API key, /v1/models readiness, a client that hangs up after [DONE].

Real HTTP against the fake vLLM instances of test_proxy (doubles that answer like vLLM)."""
from __future__ import annotations

import asyncio
import json

import aiohttp

from launch.cli import main as cli_main
from pd.config import CoordinatorConfig
from pd.coordinator.client import AsyncCoordinatorClient
from pd.coordinator.server import Coordinator
from tests.unit.test_proxy import REQ, FakeCoord, deployment, eventually, run


def _count(proxy, endpoint: str, status: int) -> float:
    return proxy.metrics.requests.labels(endpoint, str(status))._value.get()


def test_api_key_guards_v1_routes_only():
    async def go():
        async with deployment() as env:
            env.proxy.api_key = "sk-proxy"
            for hdr in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-proxy"}):
                async with env.client.post(env.url + "/v1/completions", json=REQ, headers=hdr) as r:
                    assert r.status == 401
                    err = (await r.json())["error"]
                    assert err["type"] == "authentication_error" and "Authorization: Bearer" in err["message"]
                async with env.client.get(env.url + "/v1/models", headers=hdr) as r:
                    assert r.status == 401
            assert env.p[0].bodies == [] and env.d[0].bodies == []  # nothing reached an instance
            assert _count(env.proxy, "/v1/completions", 401) == 3
            ok = {"Authorization": "Bearer sk-proxy"}
            async with env.client.post(env.url + "/v1/completions", json=REQ, headers=ok) as r:
                assert r.status == 200
            async with env.client.get(env.url + "/health") as r:  # probes need no key
                assert r.status == 200
    run(go())


def test_models_is_503_until_a_prefill_instance_is_up():
    async def go():
        async with deployment(n_p=2) as env:
            for f in env.p:
                f.down = True
            async with env.client.get(env.url + "/v1/models") as r:
                assert r.status == 503
                assert "no prefill instance is up" in (await r.json())["error"]["message"]
            env.p[1].down = False
            async with env.client.get(env.url + "/v1/models") as r:
                assert r.status == 200
                assert (await r.json())["data"][0]["id"] == "m"
    run(go())


def test_models_in_colocated_mode_needs_no_prefill():
    async def go():
        async with deployment(n_p=0, mode="colocated") as env:
            async with env.client.get(env.url + "/v1/models") as r:
                assert r.status == 200
    run(go())


def test_client_closing_right_after_done_is_not_an_abort():
    """The client reads to ``data: [DONE]`` and closes while the upstream's stream is still
    ending: the answer was whole, so no abort reaches the coordinator and it counts as 200."""
    async def go():
        coord = FakeCoord()
        async with deployment(coord=coord) as env:
            env.d[0].linger = 1.0
            host, port = env.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            body = json.dumps({**REQ, "stream": True}).encode()
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            seen = b""
            while b"data: [DONE]" not in seen:
                seen += await asyncio.wait_for(reader.read(4096), 5)
            writer.close()
            await eventually(lambda: env.d[0].cancelled.is_set() or _count(env.proxy, "/v1/completions", 200) == 1,
                             timeout=5)
            await asyncio.sleep(1.5)  # past the linger: a late abort would have been sent by now
            assert coord.aborts == []
            assert _count(env.proxy, "/v1/completions", 200) == 1
            assert _count(env.proxy, "/v1/completions", 499) == 0
    run(go())


def test_client_closing_mid_stream_is_still_an_abort():
    async def go():
        coord = FakeCoord()
        async with deployment(coord=coord) as env:
            env.d[0].gate = asyncio.Event()  # the stream stalls after its first event
            async with env.client.post(env.url + "/v1/completions", json={**REQ, "stream": True}) as r:
                await r.content.readany()
            await eventually(lambda: len(coord.aborts) == 1)
            assert "client went away" in coord.aborts[0][1]
    run(go())


def test_pd_proxy_api_key_file_flag(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli_main(["proxy", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2",
                     "--api-key-file", str(missing)]) == 2
    assert "--api-key-file" in capsys.readouterr().err


def test_a_connection_dropped_before_any_answer_is_sent_again_once():
    """An instance that closes the connection under a request without answering (vLLM closing a
    kept-alive connection when it wakes from a stall) gets the request once more on a new
    connection; a second drop is a 502 naming the instance."""
    async def go():
        async with deployment() as env:
            env.p[0].drop, env.d[0].drop = 1, 1
            async with env.client.post(env.url + "/v1/completions", json=REQ) as r:
                assert r.status == 200 and (await r.json())["choices"][0]["text"] == "from d0"
            assert len(env.p[0].bodies) == len(env.d[0].bodies) == 2
            retries = env.proxy.metrics.upstream_retries
            assert retries.labels("prefill")._value.get() == retries.labels("decode")._value.get() == 1
            env.d[0].drop = 2
            async with env.client.post(env.url + "/v1/completions", json=REQ) as r:
                assert r.status == 502
                assert env.d[0].url in (await r.json())["error"]["message"]
    run(go())


# ---- issue 18: what a request may cost before it is parsed; small leaks -------------------------

def test_a_body_of_too_many_json_elements_is_refused_before_it_is_parsed():
    """63 MB of ``[{},{},...]`` parsed into about 2 GB: the elements are counted on the bytes
    first, and the request is a 413 that names the limit."""
    from pd.proxy.relay import MAX_JSON_ITEMS

    async def go():
        async with deployment() as env:
            raw = b'{"model": "m", "prompt": [' + b"{}," * (MAX_JSON_ITEMS + 10) + b'{}]}'
            async with env.client.post(env.url + "/v1/completions", data=raw,
                                       headers={"Content-Type": "application/json"}) as r:
                assert r.status == 413
                assert f"allowed at most {MAX_JSON_ITEMS}" in (await r.json())["error"]["message"]
            assert env.p[0].bodies == [] and env.d[0].bodies == []
            async with env.client.post(env.url + "/v1/completions", json=REQ) as r:  # still serving
                assert r.status == 200
    run(go())


def test_nan_and_infinity_do_not_pass_the_proxy():
    async def go():
        async with deployment() as env:
            for bad in (b'{"model": "m", "prompt": "hi", "temperature": NaN}',
                        b'{"model": "m", "prompt": "hi", "top_p": -Infinity}'):
                async with env.client.post(env.url + "/v1/completions", data=bad,
                                           headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 400
                    assert "not a JSON number" in (await r.json())["error"]["message"]
            assert env.p[0].bodies == []
    run(go())


def test_transfer_records_need_the_key_and_the_clients_key_stays_at_the_proxy():
    async def go():
        async with deployment() as env:
            env.proxy.api_key = "sk-proxy"
            async with env.client.get(env.url + "/pd/transfers/abc") as r:
                assert r.status == 401
            ok = {"Authorization": "Bearer sk-proxy"}
            async with env.client.post(env.url + "/v1/completions", json=REQ, headers=ok) as r:
                assert r.status == 200
            # no upstream key (vllm.api_key_file): the instances get no Authorization, not the proxy's key
            assert env.p[0].auth == [None] and env.d[0].auth == [None]
    run(go())


def test_a_transfer_record_is_asked_only_for_a_valid_pd_id():
    """A pd_id in /pd/transfers/ that the coordinator would refuse (too long, other characters) is a
    400 naming the rule, not a 503 "the coordinator did not answer" (a real coordinator)."""
    coordinator = Coordinator(CoordinatorConfig(port=0)).start_in_thread()

    async def go():
        client = AsyncCoordinatorClient(coordinator.address, timeout_s=2)
        async with deployment(coord=client) as env:
            for bad in ("x" * 129, "a%20b", "%C3%A9t%C3%A9"):
                async with env.client.get(env.url + "/pd/transfers/" + bad) as r:
                    assert r.status == 400, bad
                    assert "is not a pd_id: at most 128 characters" in (await r.json())["error"]["message"]
            async with env.client.get(env.url + "/pd/transfers/" + "f" * 128) as r:
                assert r.status == 404  # valid, and asked: no such record
        client.close()

    try:
        run(go())
    finally:
        coordinator.stop()
    assert coordinator.counters["malformed"] == 0


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Whether the peer closed the connection (EOF or reset) within 3 s."""
    try:
        return await asyncio.wait_for(reader.read(), 3) == b""
    except ConnectionResetError:
        return True


def test_connections_beyond_the_limit_are_closed_at_once_and_idle_ones_are_let_go():
    """Issue 18, item 2: 1,100 idle connections used up the proxy's 1,024 descriptors and locked
    every client out. Now at most ``limit`` are open (one more is closed as soon as accepted and
    counted), and one that sends nothing is closed after the keep-alive time."""
    from aiohttp import web

    from pd.config import ProxyConfig
    from pd.proxy.server import Proxy
    from tests.unit.test_proxy import FakeVLLM

    async def go():
        fake = FakeVLLM("c0")
        frunner = web.AppRunner(fake.app())
        await frunner.setup()
        await web.TCPSite(frunner, "127.0.0.1", 0).start()
        fake.url = f"http://127.0.0.1:{frunner.addresses[0][1]}"
        proxy = Proxy([], [fake.url], ProxyConfig(first_token="decode"), None, mode="colocated")
        prunner, port = await proxy.start(limit=4, keepalive_s=0.5)
        try:
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]  # they send nothing
            await asyncio.sleep(0.2)
            extra, _w = await asyncio.open_connection("127.0.0.1", port)
            assert await _closed(extra) and proxy.site.limiter.refused.count == 1
            for reader, _ in idle:  # let go after the keep-alive time
                assert await _closed(reader)
            async with aiohttp.ClientSession() as c:
                async with c.post(f"http://127.0.0.1:{port}/v1/completions", json=REQ) as r:
                    assert r.status == 200
        finally:
            await prunner.cleanup()
            await frunner.cleanup()
    run(go())


def test_metrics_answer_while_the_coordinator_hangs():
    """Issue 18, item 10: with a coordinator that accepts but never answers, five scrapes at once
    queued behind each other's 2 s timeouts (the client's one socket); now they share one query
    and each waits at most a second for it, then answers without the coordinator's counters."""
    import time

    import zmq

    from pd.coordinator.client import AsyncCoordinatorClient

    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)  # a real ZMQ peer that reads and never replies
    port = silent.bind_to_random_port("tcp://127.0.0.1")

    async def go():
        async with deployment() as env:
            env.proxy.coord = AsyncCoordinatorClient(f"tcp://127.0.0.1:{port}")
            t0 = time.monotonic()

            async def scrape() -> int:
                async with env.client.get(env.url + "/metrics") as r:
                    await r.read()
                    return r.status

            assert await asyncio.gather(*(scrape() for _ in range(5))) == [200] * 5
            assert time.monotonic() - t0 < 5  # was 10 s and more (2 s each, one after the other)
            env.proxy.coord.close()
    try:
        run(go())
    finally:
        silent.close(0)


def test_several_sequences_are_answered_by_a_decode_instance_alone():
    """Issue 18, item 7: n/best_of > 1 and prompt lists went out with one pd_id, so their
    sequences' chunks collided. Now a decode instance answers them alone: no prefill request,
    no kv_transfer_params, no transfer."""
    async def go():
        async with deployment() as env:
            for extra in ({"n": 2}, {"best_of": 2}, {"prompt": ["a b", "c d"]}, {"prompt": [[1, 2], [3, 4]]}):
                async with env.client.post(env.url + "/v1/completions", json={**REQ, **extra}) as r:
                    assert r.status == 200, extra
            assert env.p[0].bodies == []
            assert len(env.d[0].bodies) == 4 and all("kv_transfer_params" not in b for b in env.d[0].bodies)
            async with env.client.post(env.url + "/v1/completions", json={**REQ, "prompt": [1, 2, 3]}) as r:
                assert r.status == 200  # one prompt of token ids: P/D as usual
            assert len(env.p[0].bodies) == 1
    run(go())
