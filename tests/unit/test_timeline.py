"""A request's timeline: the proxy, the coordinator and the connector halves each add their events.

A real proxy (HTTP) in front of two engine doubles whose requests drive real worker halves
(``WorkerSide`` on CPU caches, the shm transport) through a real ZMQ coordinator: the prefill
double saves the prompt in three READY parts, the decode double loads it and streams an answer.
``GET /pd/transfers/{pd_id}`` must then list every event in order and spans that add up.
"""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import msgspec
import pytest
import zmq
from aiohttp import web

from launch.cli import main as cli_main
from pd.config import ProxyConfig
from pd.connector.scheduler import LoadSpec, PDMetadata
from pd.coordinator import timeline
from pd.coordinator.client import CoordinatorClient
from pd.coordinator.protocol import (
    PROTOCOL_TAG,
    AwaitFirst,
    Done,
    Error,
    FirstToken,
    LoadPart,
    Ready,
    decode_client,
    decode_reply,
    encode,
)
from pd.proxy.server import Proxy
from pd.proxy.timeline import ProxyTimeline
from tests.unit.test_connector_worker import DST, PROMPT, _save, _until, coord, pair  # noqa: F401
from tests.unit.test_proxy import REQ, deployment, run

PARTS = ((0, 2, False), (2, 4, False), (4, 5, True))  # the prompt's 5 chunks in three engine steps


def _engine_doubles(p, d, coordinator: str) -> tuple[web.Application, web.Application]:
    """vLLM stand-ins: the prefill saves the prompt's chunks step by step (its worker half), the
    decode loads them (its worker half) before it streams its answer."""

    def finished(pd_id: str) -> bool:
        c = CoordinatorClient(coordinator)
        try:
            return c.query(pd_id).transfer.done
        finally:
            c.close()

    def give_up_token_1(pd_id: str):
        c = CoordinatorClient(coordinator)
        try:
            return c.call(AwaitFirst(pd_id, 0.0, give_up=True))
        finally:
            c.close()

    async def prefill(request: web.Request) -> web.Response:
        pd_id = (await request.json())["kv_transfer_params"]["pd_id"]

        def steps() -> None:
            for first, last, final in PARTS:
                p.after_forward(_save(pd_id, first, last, final))
                time.sleep(0.02)  # the next engine step
            p._save_jobs["p1"].result(10)

        await asyncio.get_running_loop().run_in_executor(None, steps)
        return web.json_response({"id": "cmpl-p", "object": "text_completion", "created": 1, "model": "m",
                                  "choices": [{"index": 0, "text": " a", "token_ids": [5], "prompt_token_ids": PROMPT,
                                               "finish_reason": "length"}],
                                  "usage": {"prompt_tokens": len(PROMPT), "completion_tokens": 1}})

    async def decode(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        pd_id = body["kv_transfer_params"]["pd_id"]
        if body["kv_transfer_params"].get("handoff"):
            # This decode computes token 1 itself: it gives token 1's hand-off up at the coordinator,
            # as vLLM's scheduler half does for a request that cannot wait for it.
            settled = await asyncio.get_running_loop().run_in_executor(None, give_up_token_1, pd_id)
            assert settled == FirstToken(pd_id, -1), settled
        d.start_step(PDMetadata(loads=[LoadSpec("d1", pd_id, PROMPT, DST, 0)]))
        # The engine's next step begins once the load is over (and its DONE is at the coordinator).
        loaded = await asyncio.get_running_loop().run_in_executor(
            None, lambda: _until(lambda: "d1" in d.loads._done_recving and finished(pd_id)))
        assert loaded
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        # The early decode (the client's prompt, not prompt + token 1) samples token 1 itself: the prefill's.
        tokens = ([(" a", 5)] if isinstance(body["prompt"], str) else []) + [(f" t{i}", 10 + i) for i in range(3)]
        for i, (text, tok) in enumerate(tokens):
            c = {"index": 0, "text": text, "token_ids": [tok], "finish_reason": "length" if i == len(tokens) - 1 else None}
            await out.write(b"data: " + json.dumps({"id": "cmpl-d", "choices": [c]}).encode() + b"\n\n")
            await asyncio.sleep(0.01)
        await out.write(b"data: " + json.dumps({"id": "cmpl-d", "choices": [], "usage": {}}).encode() + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    apps = []
    for handler in (prefill, decode):
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        apps.append(app)
    return apps[0], apps[1]


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _one_request(pair, coord, first_token: str) -> tuple[dict, dict]:  # noqa: F811
    """One streamed request through the proxy; (its /pd/transfers answer, the proxy's events)."""
    p, d = pair
    runners = []
    try:
        (rp, p_url), (rd, d_url) = [await _serve(a) for a in _engine_doubles(p, d, coord.address)]
        runners += [rp, rd]
        cfg = ProxyConfig(first_token="decode") if first_token == "decode" else ProxyConfig(
            first_token="prefill", early_decode="greedy" if first_token == "early" else "never")
        proxy = Proxy([p_url], [d_url], cfg, coordinator=coord.address)
        prunner, port = await proxy.start()
        runners.append(prunner)
        async with aiohttp.ClientSession() as client:
            async with client.post(f"http://127.0.0.1:{port}/v1/completions", json={**REQ, "stream": True}) as r:
                assert r.status == 200
                assert (await r.read()).endswith(b"data: [DONE]\n\n")
                pd_id = r.headers["x-pd-id"]
            async with client.get(f"http://127.0.0.1:{port}/pd/transfers/{pd_id}") as r:
                assert r.status == 200
                return await r.json(), proxy.timeline.events(pd_id)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


@pytest.mark.parametrize("first_token", ["prefill", "early", "decode"])
def test_a_transfer_timeline_has_every_event_in_order_and_its_spans_add_up(pair, coord, first_token):  # noqa: F811
    got = {}

    async def go():
        got["rec"], got["proxy"] = await _one_request(pair, coord, first_token)

    run(go())
    rec = got["rec"]
    assert rec["ok"] and rec["n_chunks"] == 5 and rec["n_ready_parts"] == 3  # the record's fields as before
    events = rec["timeline"]
    times = [e["t_ms"] for e in events]
    assert times == sorted(times) and events[0]["rel_ms"] == 0
    assert [e["rel_ms"] for e in events] == pytest.approx([t - times[0] for t in times], abs=0.001)
    names = [(e["source"], e["name"]) for e in events]
    first = {k: names.index(k) for k in dict.fromkeys(names)}
    # The proxy's own events, in the order they happen.
    proxy_order = ["received", "decode_sent", "decode_first_byte", "last_token"]
    assert [first[("proxy", n)] for n in proxy_order] == sorted(first[("proxy", n)] for n in proxy_order)
    assert first[("proxy", "received")] < first[("proxy", "prefill_sent")] < first[("proxy", "prefill_answered")]
    if first_token == "prefill":  # token 1 reached the client, then the decode half went out
        assert first[("proxy", "prefill_answered")] < first[("proxy", "first_token")] < first[("proxy", "decode_sent")]
    if first_token == "early":  # the decode half went out with the prefill half; token 2 after token 1
        assert first[("proxy", "decode_sent")] < first[("proxy", "prefill_answered")] < first[("proxy", "first_token")]
        assert first[("proxy", "first_token")] < first[("proxy", "token_2")] <= first[("proxy", "last_token")]
        assert first[("proxy", "token_2")] < first[("proxy", "early_used")]  # its path: the decode's token 1 was used
    else:
        assert not any(n.startswith("early_") for _, n in names)
    # Every READY part: the prefill's part (gather/put) before its arrival at the coordinator.
    saved = [e for e in events if e["name"] == "part_saved"]
    assert [e["source"] for e in saved] == ["prefill 0"] * 3
    assert [e["chunks"] for e in saved] == [2, 2, 1]
    assert all(e["gather_ms"] > 0 and e["put_ms"] > 0 for e in saved)
    assert [n for s, n in names if s == "coordinator" and n.startswith("ready")] == ["ready", "ready", "ready_final"]
    # Decode's parts (get/scatter), then DONE; the decode's first token after the load.
    loaded = [e for e in events if e["name"] == "part_loaded"]
    assert loaded and sum(e["chunks"] for e in loaded) == 5 and all(e["source"] == "decode 0" for e in loaded)
    assert all(e["get_ms"] > 0 and e["scatter_ms"] > 0 for e in loaded)
    assert first[("proxy", "decode_sent")] < first[("coordinator", "wait_first")] < first[("coordinator", "done")]
    assert first[("coordinator", "ready_final")] < first[("coordinator", "done")] < first[("proxy", "decode_first_byte")]
    assert names.index(("coordinator", "done")) > max(i for i, n in enumerate(names) if n[1] == "part_loaded")

    s = rec["spans"]
    assert s["dispatch"] + s["decode_first_token"] + s["stream"] == pytest.approx(s["total"], abs=0.01)
    assert s["ready_first_to_final"] + s["tail"] == pytest.approx(s["transfer"], abs=0.01)
    assert s["tail"] == pytest.approx(rec["tail_ms"], abs=2.0)  # the same span, monotonic vs wall clock
    assert s["gather"] == pytest.approx(sum(e["gather_ms"] for e in saved), abs=0.01)
    assert s["scatter"] == pytest.approx(sum(e["scatter_ms"] for e in loaded), abs=0.01)
    assert s["load"] == pytest.approx(rec["load_ms"], abs=0.001) and s["prefill"] > 0 and s["decode_first_token"] > 0
    p = got["proxy"]
    assert s["total"] == pytest.approx(p["last_token"] - p["received"], abs=0.01)
    if first_token != "decode":
        assert s["first_token"] + s["gap_1_2"] == pytest.approx(p["token_2"] - p["received"], abs=0.01)
        assert s["first_token"] < s["total"] and s["gap_1_2"] > 0
    else:
        assert "first_token" not in s and "gap_1_2" not in s
    cross = rec["cross_spans"]  # one host: the clocks agree
    assert cross["decode_sent_to_wait"] >= 0 and cross["done_to_first_token"] >= 0


def test_the_proxys_store_keeps_the_most_recent_requests_only():
    async def go():
        async with deployment() as env:
            env.proxy.timeline = ProxyTimeline(max_requests=3)
            ids = []
            for _ in range(5):
                async with env.client.post(env.url + "/v1/completions", json=REQ) as r:
                    assert r.status == 200
                    ids.append(r.headers["x-pd-id"])
            assert len(env.proxy.timeline) == 3
            assert [env.proxy.timeline.events(i) == {} for i in ids] == [True, True, False, False, False]
            last = env.proxy.timeline.events(ids[-1])
            assert set(last) == {"received", "prefill_sent", "decode_sent", "prefill_answered",
                                 "decode_first_byte", "last_token"}

    run(go())


def _ready(pd_id: str, part: int, final: bool) -> Ready:
    return Ready(pd_id, 0, [f"k{part}"], 64, chunks_ready=part + 1, final=final, instance_id="p",
                 part_chunks=1, gather_ms=1.0, put_ms=0.5, sent_ms=timeline.wall_ms())


def test_a_records_events_are_bounded_and_keep_the_final_ones(coord):  # noqa: F811
    c = CoordinatorClient(coord.address)
    try:
        n = timeline.MAX_EVENTS * 2
        for i in range(n):
            assert c.ready(_ready("long", i, i == n - 1))
        part = LoadPart(timeline.wall_ms(), n, get_ms=2.0, scatter_ms=3.0)
        assert c.done(Done("long", 0, True, n_chunks=n, parts=[part], get_ms=2.0, scatter_ms=3.0))
        rec = c.query("long").transfer
    finally:
        c.close()
    # past the bound: the final part (prefill and coordinator) and DONE
    assert len(rec.timeline) == timeline.MAX_EVENTS + 3 and rec.events_dropped == 2 * n + 2 - len(rec.timeline)  # + part_loaded, done
    names = [e.name for e in rec.timeline]
    assert names[:2] == ["part_saved", "ready"] and names[-1] == "done" and "ready_final" in names
    # The sums count every part, listed or not.
    assert rec.spans["gather"] == pytest.approx(n * 1.0) and rec.spans["put"] == pytest.approx(n * 0.5)
    assert rec.spans["get"] == 2.0 and rec.spans["scatter"] == 3.0 and rec.spans["tail"] >= 0


def test_old_peer_is_refused_with_both_versions_named(coord):  # noqa: F811
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(coord.address)
    try:
        old = msgspec.msgpack.encode({"type": "ready", "pd_id": "v2", "rank": 0, "keys": [], "n_tokens": 4})
        sock.send_multipart([b"pdkv/2", old])
        assert sock.poll(3000)
        reply = decode_reply(sock.recv_multipart())
    finally:
        sock.close(0)
    assert isinstance(reply, Error) and "pdkv/2" in reply.reason and PROTOCOL_TAG.decode() in reply.reason


def test_this_versions_timings_travel_in_ready_and_done():
    ready = _ready("v3", 0, True)
    assert encode(ready)[0] == PROTOCOL_TAG and decode_client(encode(ready)) == ready
    done = Done("v3", 0, True, parts=[LoadPart(1.0, 2, 0.5, 0.0, 0.25, 0)], get_ms=0.5, scatter_ms=0.25)
    assert decode_client(encode(done)) == done
    too_many = Done("v3", 0, True, parts=[LoadPart(1.0)] * 65)
    with pytest.raises(ValueError, match="parts"):
        decode_client(encode(too_many))


def test_percentiles_and_the_summary():
    xs = [float(i) for i in range(1, 101)]
    assert timeline.percentile(xs, 50) == 50.5 and timeline.percentile(xs, 99) == 99.01
    assert timeline.percentile([7.0], 99) == 7.0
    s = timeline.summarize([{"a": 1.0, "b": 4.0}, {"a": 3.0}])
    assert list(s) == ["a", "b"] and (s["a"].n, s["a"].p50) == (2, 2.0) and s["b"].p99 == 4.0


def test_pd_stats_prints_p50_p99_of_each_span(coord, capsys, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PDKV_KEYS_HOME", str(tmp_path))  # no keys of another deployment on this port
    c = CoordinatorClient(coord.address)
    try:
        for i, load_ms in enumerate((10.0, 20.0, 30.0)):
            assert c.ready(_ready(f"s{i}", 0, True))
            assert c.done(Done(f"s{i}", 0, True, n_chunks=1, load_ms=load_ms, get_ms=1.0 + i))
        summary = c.query(spans=True).spans
    finally:
        c.close()
    assert summary["load"].n == 3 and summary["load"].p50 == 20.0 and summary["load"].p99 == 29.8
    assert cli_main(["stats", "--coordinator", coord.address, "--pd-id", "s1"]) == 0
    out = capsys.readouterr().out
    assert "spans (ms, over the last 3 finished transfers" in out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("load "))
    assert row == ["load", "3", "20.000", "29.800"]
    assert any(line.split()[:1] == ["get"] and line.split()[2:] == ["2.000", "2.980"] for line in out.splitlines())
    assert "ready_final" in out and "spans (ms): gather 1" in out  # the transfer's own timeline
