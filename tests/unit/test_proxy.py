"""The proxy over real HTTP: fake vLLM instances on free ports, the proxy, an aiohttp client."""
from __future__ import annotations

import asyncio
import json
import socket
from contextlib import asynccontextmanager
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from launch.cli import main as cli_main
from pd.config import ProxyConfig
from pd.coordinator.protocol import QueryReply, TransferRecord
from pd.proxy.server import Proxy

N_CHUNKS = 4


def sse(i: int) -> bytes:
    return b"data: " + json.dumps({"id": "cmpl-1", "choices": [{"index": 0, "text": f" t{i}"}]}).encode() + b"\n\n"


STREAM = b"".join(sse(i) for i in range(N_CHUNKS)) + b"data: [DONE]\n\n"


class FakeVLLM:
    """Answers like vLLM and records what it gets. ``hold``: answers wait for it; ``gate``: a
    stream stops after its first event until it is set; ``cancelled``: the proxy hung up on us."""

    def __init__(self, name: str):
        self.name = name
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []  # each request's Authorization header (None: none)
        self.headers: list[dict] = []
        self.paths: list[str] = []
        self.status = 200
        self.hold: asyncio.Event | None = None
        self.gate: asyncio.Event | None = None
        self.cancelled = asyncio.Event()
        self.cut = False  # drop the connection after the first event of a stream
        self.linger = 0.0  # seconds between a stream's [DONE] and its end (the network's delay)
        self.down = False  # /health answers 503 (the instance is still starting)
        self.drop = 0  # close the connection without an answer for this many requests
        self.url = ""

    def error(self) -> dict:
        return {"error": {"message": f"{self.name} refuses", "type": "BadRequestError", "param": None,
                          "code": self.status}}

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization"))
        self.headers.append(dict(request.headers))
        self.paths.append(request.path)
        if self.drop > 0:  # as a server closing a kept-alive connection under a request
            self.drop -= 1
            request.transport.close()
            return web.Response(status=500)
        try:
            if self.hold is not None:
                await self.hold.wait()
            if self.status >= 400:
                return web.json_response(self.error(), status=self.status)
            if not body.get("stream"):
                return web.json_response({"id": "cmpl-1", "object": "text_completion", "model": "m",
                                          "choices": [{"index": 0, "text": f"from {self.name}",
                                                       "finish_reason": "length"}]})
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            for i in range(N_CHUNKS):
                await out.write(sse(i))
                if i == 0 and self.gate is not None:
                    await self.gate.wait()
                if i == 0 and self.cut:
                    request.transport.close()
                    return out
            await out.write(b"data: [DONE]\n\n")
            await asyncio.sleep(self.linger)
            await out.write_eof()
            return out
        except (asyncio.CancelledError, ConnectionError):
            self.cancelled.set()
            raise

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "owned_by": self.name}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="", status=503 if self.down else 200)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app


class FakeCoord:
    """Stands in for AsyncCoordinatorClient."""

    def __init__(self):
        self.aborts: list[tuple[str, str]] = []
        self.records: dict[str, TransferRecord] = {}
        self.closed = False
        # FIRST_OUTCOME (how token 1 was handed to an early decode): what it answers (-1: the decode
        # computes token 1, the coordinator's answer when no prefill handed it over; a token: handed
        # over; None: no answer); each question is recorded.
        self.outcome: int | None = -1
        self.outcomes: list[str] = []

    async def abort(self, pd_id: str, reason: str = "") -> bool:
        self.aborts.append((pd_id, reason))
        return True

    async def first_outcome(self, pd_id: str, timeout_s: float) -> int | None:
        self.outcomes.append(pd_id)
        return self.outcome

    async def query(self, pd_id: str = "") -> QueryReply:
        return QueryReply(counters={"ready": 3.0, "wait_timeouts": 1.0}, instances=[],
                          transfer=self.records.get(pd_id))

    def close(self) -> None:
        self.closed = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


async def eventually(cond, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


@asynccontextmanager
async def deployment(n_p: int = 1, n_d: int = 1, mode: str = "pd", coord: FakeCoord | None = None,
                     prefill_urls: list[str] | None = None, decode_urls: list[str] | None = None,
                     cancel_handlers: bool = True, **cfg):
    """The old flow unless ``first_token="prefill"`` (these fakes give no token ids; see
    test_proxy_first_token for the first-token path)."""
    cfg.setdefault("first_token", "decode")
    fakes_p = [FakeVLLM(f"p{i}") for i in range(n_p)]
    fakes_d = [FakeVLLM(f"d{i}") for i in range(n_d)]
    runners = []
    for f in fakes_p + fakes_d:
        runner = web.AppRunner(f.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        f.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    proxy = Proxy([f.url for f in fakes_p] if prefill_urls is None else prefill_urls,
                  [f.url for f in fakes_d] if decode_urls is None else decode_urls, ProxyConfig(**cfg), mode=mode)
    proxy.coord = coord
    proxy.abort_grace_s = 0.0  # aborts at once (tests/unit/test_proxy_first_token.py tests the grace)
    if cancel_handlers:
        prunner, port = await proxy.start()
    else:  # a plain runner: the proxy notices a client gone only when writing to it
        prunner = web.AppRunner(proxy.make_app())
        await prunner.setup()
        await web.TCPSite(prunner, "127.0.0.1", 0).start()
        port = prunner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as client:
            yield SimpleNamespace(p=fakes_p, d=fakes_d, proxy=proxy, url=f"http://127.0.0.1:{port}", client=client)
    finally:
        for f in fakes_p + fakes_d:  # let held handlers finish so the runners close quickly
            for ev in (f.hold, f.gate):
                if ev is not None:
                    ev.set()
        await prunner.cleanup()
        for r in runners:
            await r.cleanup()


REQ = {"model": "m", "prompt": "hello there", "max_tokens": 16, "min_tokens": 4, "temperature": 0}


# ---- the split ---------------------------------------------------------------------------


def test_non_streaming_split_rewrites_the_prefill_half_and_returns_decode_answer():
    async def go():
        async with deployment() as env:
            hdr = {"Authorization": "Bearer sk-test"}
            async with env.client.post(env.url + "/v1/completions", json=REQ, headers=hdr) as r:
                assert r.status == 200
                answer = await r.json()
                pd_id = r.headers["x-pd-id"]
            assert answer["choices"][0]["text"] == "from d0"
            (pb,), (db,) = env.p[0].bodies, env.d[0].bodies
            assert pb["max_tokens"] == 1 and pb["stream"] is False and "min_tokens" not in pb
            assert pb["kv_transfer_params"] == {"pd_id": pd_id, "do_remote_decode": True}
            assert db == {**REQ, "kv_transfer_params": {"pd_id": pd_id, "do_remote_prefill": True}}
            assert len(pd_id) == 32
            assert env.p[0].headers[0]["Authorization"] == env.d[0].headers[0]["Authorization"] == "Bearer sk-test"
            # the prefill half may still be finishing: the decode's answer does not wait for it
            await eventually(lambda: env.proxy.prefill.outstanding == {env.p[0].url: 0})
    run(go())


def test_upstream_token_replaces_the_clients_authorization():
    async def go():
        async with deployment() as env:
            env.proxy.upstream_token = "tok-1"  # vllm.api_key_file: pd proxy --upstream-api-key-file
            async with env.client.post(env.url + "/v1/completions", json=REQ,
                                       headers={"Authorization": "Bearer client"}) as r:
                assert r.status == 200
            async with env.client.get(env.url + "/v1/models") as r:
                assert r.status == 200
            assert env.p[0].headers[0]["Authorization"] == env.d[0].headers[0]["Authorization"] == "Bearer tok-1"
    run(go())


def test_streaming_passes_events_through_as_they_arrive():
    async def go():
        async with deployment() as env:
            env.d[0].gate = asyncio.Event()
            req = {**REQ, "stream": True, "stream_options": {"include_usage": True}}
            async with env.client.post(env.url + "/v1/completions", json=req) as r:
                assert r.status == 200 and r.content_type == "text/event-stream"
                got = b""
                while not got.endswith(b"\n\n"):  # the first event comes before decode sends the rest
                    got += await r.content.readany()
                assert got == sse(0)
                env.d[0].gate.set()
                got += await r.content.read()
            assert got == STREAM
            pb = env.p[0].bodies[0]
            assert pb["stream"] is False and "stream_options" not in pb and pb["max_tokens"] == 1
            assert env.d[0].bodies[0]["stream_options"] == {"include_usage": True}
    run(go())


def test_chat_completions_endpoint_and_max_completion_tokens():
    async def go():
        async with deployment() as env:
            req = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9,
                   "min_completion_tokens": 2}
            async with env.client.post(env.url + "/v1/chat/completions", json=req) as r:
                assert r.status == 200
                assert (await r.json())["choices"][0]["text"] == "from d0"
            pb = env.p[0].bodies[0]
            assert env.p[0].paths == env.d[0].paths == ["/v1/chat/completions"]
            assert pb["max_completion_tokens"] == 1 and pb["max_tokens"] == 1 and "min_completion_tokens" not in pb
            assert env.d[0].bodies[0]["max_completion_tokens"] == 9
    run(go())


# ---- errors --------------------------------------------------------------------------------


def test_prefill_error_is_returned_and_cancels_decode():
    async def go():
        coord = FakeCoord()
        async with deployment(coord=coord) as env:
            env.p[0].status = 400
            env.d[0].hold = asyncio.Event()  # decode waits for KV that will never come
            async with env.client.post(env.url + "/v1/completions", json=REQ) as r:
                assert r.status == 400
                assert await r.json() == env.p[0].error()
                pd_id = r.headers["x-pd-id"]
            await asyncio.wait_for(env.d[0].cancelled.wait(), 5)
            await eventually(lambda: [a[0] for a in coord.aborts] == [pd_id])
    run(go())


def test_decode_error_is_returned_and_aborted():
    async def go():
        coord = FakeCoord()
        async with deployment(coord=coord) as env:
            env.d[0].status = 500
            async with env.client.post(env.url + "/v1/completions", json={**REQ, "stream": True}) as r:
                assert r.status == 500
                assert await r.json() == env.d[0].error()
                pd_id = r.headers["x-pd-id"]
            await eventually(lambda: pd_id in [a[0] for a in coord.aborts])
    run(go())


@pytest.mark.parametrize("dead", ["prefill", "decode"])
def test_unreachable_upstream_gives_502_naming_it(dead):
    async def go():
        url = f"http://127.0.0.1:{free_port()}"
        urls = {"prefill_urls": [url]} if dead == "prefill" else {"decode_urls": [url]}
        async with deployment(**urls) as env:
            if dead == "prefill":
                env.d[0].hold = asyncio.Event()
            async with env.client.post(env.url + "/v1/completions", json=REQ) as r:
                assert r.status == 502
                err = (await r.json())["error"]
            assert url in err["message"] and dead in err["message"] and err["code"] == 502
    run(go())


def test_upstream_timeout_gives_504():
    async def go():
        async with deployment(upstream_timeout_s=0.3) as env:
            env.d[0].hold = asyncio.Event()
            async with env.client.post(env.url + "/v1/completions", json=REQ) as r:
                assert r.status == 504
                assert "timed out" in (await r.json())["error"]["message"]
    run(go())


@pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b""])
def test_malformed_or_non_object_body_gives_openai_style_400(data):
    async def go():
        async with deployment() as env:
            async with env.client.post(env.url + "/v1/completions", data=data,
                                       headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400
                err = (await r.json())["error"]
            assert err["type"] == "invalid_request_error" and err["code"] == 400 and err["param"] is None
            assert env.p[0].bodies == env.d[0].bodies == []
    run(go())


def test_prefill_failing_after_decode_began_aborts_but_keeps_the_stream():
    async def go():
        coord = FakeCoord()
        async with deployment(coord=coord) as env:
            env.p[0].hold, env.p[0].status = asyncio.Event(), 500
            async with env.client.post(env.url + "/v1/completions", json={**REQ, "stream": True}) as r:
                assert r.status == 200 and await r.read() == STREAM
                pd_id = r.headers["x-pd-id"]
            assert coord.aborts == []
            env.p[0].hold.set()
            await eventually(lambda: [a[0] for a in coord.aborts] == [pd_id])
    run(go())


def test_decode_dropping_mid_stream_ends_the_stream_with_an_error_event():
    async def go():
        coord = FakeCoord()
        async with deployment(coord=coord) as env:
            env.d[0].cut = True
            async with env.client.post(env.url + "/v1/completions", json={**REQ, "stream": True}) as r:
                assert r.status == 200
                events = (await r.read()).split(b"\n\n")
                pd_id = r.headers["x-pd-id"]
            assert events[0] == sse(0)[:-2]
            err = json.loads(events[1].removeprefix(b"data: "))["error"]
            assert err["code"] == 502 and env.d[0].url in err["message"]
            await eventually(lambda: [a[0] for a in coord.aborts] == [pd_id])
    run(go())


# ---- the client going away ---------------------------------------------------------------


@pytest.mark.parametrize("cancel_handlers", [True, False])
def test_client_gone_mid_stream_cancels_decode_and_aborts(cancel_handlers):
    async def go():
        coord = FakeCoord()
        async with deployment(coord=coord, cancel_handlers=cancel_handlers) as env:
            env.d[0].gate = asyncio.Event()  # the stream stalls after its first event
            r = await env.client.post(env.url + "/v1/completions", json={**REQ, "stream": True})
            pd_id = r.headers["x-pd-id"]
            assert (await r.content.readline()).startswith(b"data: ")
            r.close()  # hang up
            if cancel_handlers:
                await asyncio.wait_for(env.d[0].cancelled.wait(), 5)
            else:  # noticed at the next write
                await asyncio.sleep(0.1)
                env.d[0].gate.set()
            await eventually(lambda: [a[0] for a in coord.aborts] == [pd_id])
            await eventually(lambda: env.proxy.decode.outstanding[env.d[0].url] == 0)
            text = await (await env.client.get(env.url + "/metrics")).text()
            assert 'pdkv_proxy_requests_total{endpoint="/v1/completions",status="499"} 1.0' in text
    run(go())


def test_client_gone_before_the_answer_cancels_both_halves():
    async def go():
        coord = FakeCoord()
        async with deployment(coord=coord) as env:
            env.p[0].hold = env.d[0].hold = asyncio.Event()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(env.client.post(env.url + "/v1/completions", json=REQ), 0.5)
            await asyncio.wait_for(env.p[0].cancelled.wait(), 5)
            await asyncio.wait_for(env.d[0].cancelled.wait(), 5)
            pd_id = env.d[0].bodies[0]["kv_transfer_params"]["pd_id"]
            await eventually(lambda: [a[0] for a in coord.aborts] == [pd_id])
    run(go())


# ---- choosing instances ------------------------------------------------------------------


@pytest.mark.parametrize("policy,third", [("least_outstanding", 1), ("round_robin", 0)])
def test_policy_with_a_busy_instance_across_2p2d(policy, third):
    async def go():
        async with deployment(2, 2, policy=policy) as env:
            hold = env.p[0].hold = env.d[0].hold = asyncio.Event()
            post = lambda: env.client.post(env.url + "/v1/completions", json=REQ)  # noqa: E731
            a = asyncio.ensure_future(post())
            await eventually(lambda: env.p[0].bodies and env.d[0].bodies)  # A is busy on p0/d0
            async with post() as r:  # B
                assert r.status == 200
            c = asyncio.ensure_future(post())
            await eventually(lambda: sum(len(f.bodies) for f in env.d) == 3)
            assert len(env.p[third].bodies) == len(env.d[third].bodies) == 2
            hold.set()
            for resp in await asyncio.gather(a, c):
                assert resp.status == 200
                resp.release()
            await eventually(lambda: not any({**env.proxy.prefill.outstanding,
                                              **env.proxy.decode.outstanding}.values()))
    run(go())


def test_idle_instances_take_turns():
    async def go():
        async with deployment(2, 2) as env:
            for _ in range(4):
                async with env.client.post(env.url + "/v1/completions", json=REQ) as r:
                    assert (await r.json())["choices"][0]["text"] in ("from d0", "from d1")
            assert [len(f.bodies) for f in env.p + env.d] == [2, 2, 2, 2]
    run(go())


# ---- colocated ---------------------------------------------------------------------------


def test_colocated_forwards_unchanged_round_robin():
    async def go():
        async with deployment(0, 2, mode="colocated") as env:
            async with env.client.post(env.url + "/v1/completions", json=REQ) as r:
                assert r.status == 200 and "x-pd-id" not in r.headers
                assert (await r.json())["choices"][0]["text"] == "from d0"
            async with env.client.post(env.url + "/v1/completions", json={**REQ, "stream": True}) as r:
                assert await r.read() == STREAM
            assert env.d[0].bodies == [REQ] and env.d[1].bodies == [{**REQ, "stream": True}]
            async with env.client.get(env.url + "/health") as r:
                assert r.status == 200 and set((await r.json())["upstreams"]) == {"colocated"}
    run(go())


# ---- other routes ------------------------------------------------------------------------


def test_models_forwarded_to_decode():
    async def go():
        async with deployment() as env:
            async with env.client.get(env.url + "/v1/models") as r:
                assert r.status == 200
                assert (await r.json())["data"][0]["owned_by"] == "d0"
    run(go())


def test_health_lists_upstreams_and_503_when_a_role_is_down():
    async def go():
        async with deployment(2, 1) as env:
            async with env.client.get(env.url + "/health") as r:
                assert r.status == 200
                h = await r.json()
            assert h["upstreams"] == {"prefill": {env.p[0].url: True, env.p[1].url: True},
                                      "decode": {env.d[0].url: True}}
        dead = f"http://127.0.0.1:{free_port()}"
        async with deployment(1, 0, decode_urls=[dead]) as env:
            async with env.client.get(env.url + "/health") as r:
                assert r.status == 503
                assert (await r.json())["upstreams"]["decode"] == {dead: False}
    run(go())


def test_metrics_series_and_coordinator_counters():
    async def go():
        async with deployment(coord=FakeCoord()) as env:
            async with env.client.post(env.url + "/v1/completions", json={**REQ, "stream": True}) as r:
                await r.read()
            env.p[0].status = 400
            env.d[0].hold = asyncio.Event()
            async with env.client.post(env.url + "/v1/chat/completions", json=REQ) as r:
                assert r.status == 400
            async with env.client.get(env.url + "/metrics") as r:
                assert r.status == 200 and r.content_type == "text/plain"
                text = await r.text()
        for line in ('pdkv_proxy_requests_total{endpoint="/v1/completions",status="200"} 1.0',
                     'pdkv_proxy_requests_total{endpoint="/v1/chat/completions",status="400"} 1.0',
                     'pdkv_proxy_upstream_errors_total{role="prefill"} 1.0',
                     f'pdkv_proxy_inflight{{role="decode",url="{env.d[0].url}"}}',
                     "pdkv_proxy_ttft_seconds_count 1.0",
                     "pdkv_proxy_request_latency_seconds_count 1.0",
                     "pdkv_coordinator_ready 3.0", "pdkv_coordinator_wait_timeouts 1.0"):
            assert line in text, line
    run(go())


def test_transfer_records_from_the_coordinator():
    async def go():
        async with deployment() as env:
            async with env.client.get(env.url + "/pd/transfers/abc") as r:
                assert r.status == 503
        coord = FakeCoord()
        coord.records["abc"] = TransferRecord(pd_id="abc", ready=True, done=True, ok=True, n_chunks=2)
        async with deployment(coord=coord) as env:
            async with env.client.get(env.url + "/pd/transfers/abc") as r:
                assert r.status == 200
                rec = await r.json()
            assert rec["pd_id"] == "abc" and rec["ok"] is True and rec["n_chunks"] == 2
            async with env.client.get(env.url + "/pd/transfers/nope") as r:
                assert r.status == 404
    run(go())


# ---- CLI ---------------------------------------------------------------------------------


def test_cli_port_in_use_and_bad_urls_exit_2_with_one_line(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = cli_main(["proxy", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2",
                       "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and "already in use" in err and "Traceback" not in err and err.count("\n") == 1
    for argv in (["--prefill", "127.0.0.1:8100", "--decode", "http://127.0.0.1:8200"],
                 ["--prefill", "http://h:notaport", "--decode", "http://127.0.0.1:8200"],
                 ["--decode", "http://127.0.0.1:8200"],
                 ["--colocated", "http://a:1", "--prefill", "http://b:2"]):
        assert cli_main(["proxy", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pd proxy: error:") and err.count("\n") == 1, err
