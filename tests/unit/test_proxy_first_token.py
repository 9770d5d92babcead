"""The first token from the prefill: which requests take it, the two halves, the answer put together,
and the flow over real HTTP against vLLM-validated doubles (pd.proxy.first_token, relay_first).

Equality with a colocated vLLM, case by case, is tests/integration/test_first_token_e2e.py.
"""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from vllm_http_double import SERVED, VllmHttpDouble

from pd.config import ProxyConfig
from pd.proxy import early
from pd.proxy import first_token as ft
from pd.proxy.server import Proxy
from tests.unit.test_proxy import FakeCoord, eventually, run

C, CHAT = "/v1/completions", "/v1/chat/completions"


# ---- which path -----------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint,body", [
    (C, {"prompt": "hi", "max_tokens": 5}),
    (C, {"prompt": [1, 2, 3], "stream": True, "logprobs": 2, "return_token_ids": True}),
    (C, {"prompt": "hi", "stop": ["x"], "ignore_eos": True, "temperature": 0.7}),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "tool_choice": "none"}),
])
def test_plain_requests_take_the_first_token_path(endpoint, body):
    assert ft.path_for(endpoint, body) == ""


@pytest.mark.parametrize("endpoint,body,why", [
    (C, {"prompt": "hi", "n": 2}, "n > 1"),
    (C, {"prompt": "hi", "best_of": 3}, "best_of"),
    (C, {"prompt": "hi", "echo": True}, "echo"),
    (C, {"prompt": ["a", "b"]}, "prompt list"),
    (C, {"prompt": [[1, 2], [3]]}, "prompt list"),
    (C, {"prompt": "hi", "seed": 0}, "seed"),
    (C, {"prompt": "hi", "presence_penalty": 0.5}, "penalties"),
    (C, {"prompt": "hi", "frequency_penalty": -1}, "penalties"),
    (C, {"prompt": "hi", "prompt_logprobs": 1}, "prompt_logprobs"),
    (C, {"prompt": "hi", "structured_outputs": {"regex": "a+"}}, "structured"),
    (CHAT, {"messages": [], "response_format": {"type": "json_object"}}, "structured"),
    (C, {"prompt": "hi", "stop": "x", "min_tokens": 2}, "stop strings with min_tokens"),
    (C, {"prompt": "hi", "max_tokens": 0}, "out of range"),
    (C, {"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, "out of range"),
    (C, {"prompt": "hi", "max_tokens": "5"}, "not integers"),
    (C, {"prompt": "hi", "stream": True, "stream_options": {"continuous_usage_stats": True}}, "continuous"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "chat logprobs"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "non-text"),
    (CHAT, {"messages": True}, "malformed"),
])
def test_what_it_cannot_answer_exactly_takes_the_old_flow_with_a_reason(endpoint, body, why):
    assert why in ft.path_for(endpoint, body)


def test_chat_takes_the_old_flow_when_the_instances_parse_tools_or_reasoning():
    assert ft.path_for(CHAT, {"messages": [{"role": "user", "content": "hi"}]}, chat=False) != ""
    assert ft.path_for(C, {"prompt": "hi"}, chat=False) == ""


# ---- the two halves -----------------------------------------------------------------------


def _first(text="ab", chat=False, body=None, logprobs=None, token_str=None) -> ft.First:
    ans = {"id": "cmpl-9", "created": 5, "model": "m", "usage": {"prompt_tokens": 3},
           "choices": [{"index": 0, "finish_reason": "length", "token_ids": [42], "logprobs": logprobs,
                        **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}]}
    if chat:
        ans["prompt_token_ids"] = [1, 2, 3]
    else:
        ans["choices"][0]["prompt_token_ids"] = [1, 2, 3]
    f = ft.parse_prefill(CHAT if chat else C, body or {}, json.dumps(ans).encode())
    f.token_str = text if token_str is None else token_str
    return f


def test_the_prefill_half_asks_for_one_token_and_the_prompt_ids():
    b = ft.prefill_body({"prompt": "hi", "stream": True, "stream_options": {"include_usage": True},
                         "max_tokens": 9, "min_tokens": 4, "stop": ["x"], "logprobs": 2}, "P")
    assert b == {"prompt": "hi", "stream": False, "max_tokens": 1, "min_tokens": 1, "stop": ["x"], "logprobs": 2,
                 "return_token_ids": True, "kv_transfer_params": {"pd_id": "P", "do_remote_decode": True}}


def test_the_decode_half_continues_from_token_1_as_token_ids():
    f = _first()
    b = ft.decode_body(C, {"prompt": "hi", "max_tokens": 9, "min_tokens": 4, "truncate_prompt_tokens": 5,
                           "temperature": 0.5}, f, "P")
    assert b["prompt"] == [1, 2, 3, 42] and b["max_tokens"] == 8 and b["min_tokens"] == 3
    assert "truncate_prompt_tokens" not in b and b["temperature"] == 0.5 and b["stream"] is True
    assert b["kv_transfer_params"] == {"pd_id": "P", "do_remote_prefill": True, "kv_tokens": 3}
    assert "logprobs" not in b
    chat = ft.decode_body(CHAT, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 4,
                                 "cache_salt": "s", "stop": ["b!"]}, _first(chat=True), "P")
    assert "messages" not in chat and chat["max_tokens"] == 3 and chat["cache_salt"] == "s"
    assert chat["logprobs"] == 0  # "b!" may start in token 1's "ab": the proxy needs each token's text
    assert ft.decode_body(C, {"prompt": "hi"}, f, "P")["max_tokens"] == 15  # vLLM's default 16, less token 1


def test_token_1_ends_the_answer_on_a_natural_end_or_max_tokens_1():
    f = _first()
    assert not ft.ends_at_token_1({"max_tokens": 5}, f)
    assert ft.ends_at_token_1({"max_tokens": 1}, f)
    f.finish_reason = "stop"
    assert ft.ends_at_token_1({"max_tokens": 5}, f)


def test_a_prompt_that_leaves_room_for_token_1_only_ends_there():
    f = _first()  # a 3-token prompt
    assert ft.ends_at_token_1({}, f, max_model_len=4)  # no max_tokens: room for token 1 only
    assert not ft.ends_at_token_1({}, f, max_model_len=5) and not ft.ends_at_token_1({}, f)
    # vLLM caps max_tokens at the context's end (vLLM 0.32 entrypoints/serve/utils/api_utils.py): one token
    assert ft.ends_at_token_1({"max_tokens": 9}, f, max_model_len=4)
    assert not ft.ends_at_token_1({"max_tokens": 9}, f, max_model_len=5)


# ---- the answer put together ---------------------------------------------------------------


def _decode(text, ids, finish=None, tokens=None):
    c = {"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}
    if tokens is not None:
        c["logprobs"] = {"tokens": tokens, "text_offset": [0] * len(tokens), "token_logprobs": [0.0] * len(tokens),
                         "top_logprobs": [{}] * len(tokens)}
    return {"id": "cmpl-d", "choices": [c]}


def test_a_stop_string_from_token_1_into_the_decode_text_ends_the_answer_there():
    body = {"stop": ["bcd"], "stream": True, "stream_options": {"include_usage": True}}
    st = ft.StreamState(_first("xab", body=body), body)
    opening = ft.opening(st, ends=False)
    assert opening[0]["choices"][0]["text"] == "xa"  # "b" may begin the stop string: held back
    out, over = ft.decode_chunk(st, _decode("", [7], tokens=["c"]))  # the decode held "c" back
    assert not over and out[0]["choices"][0]["text"] == ""
    out, over = ft.decode_chunk(st, _decode("cde", [8], tokens=["de"]))
    assert over and out[0]["choices"][0]["text"] == "" and out[0]["choices"][0]["finish_reason"] == "stop"
    assert out[0]["choices"][0]["stop_reason"] == "bcd"
    assert out[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}  # "d" is token 3
    assert "logprobs" not in json.dumps([c["choices"] for c in out if c["choices"]]).replace('"logprobs": null', "")


def test_held_text_is_sent_once_no_stop_string_can_start_in_token_1():
    body = {"stop": ["bq"]}
    st = ft.StreamState(_first("ab", body=body), body)
    assert ft.opening(st, ends=False)[0]["choices"][0]["text"] == "a"
    out, over = ft.decode_chunk(st, _decode("cd", [7], tokens=["cd"]))
    assert not over and out[0]["choices"][0]["text"] == "bcd" and st.held == ""
    out, _ = ft.decode_chunk(st, _decode("bq", [8], "stop"))  # the decode's own stop: relayed
    assert out[0]["choices"][0]["text"] == "bq"
    ans = ft.collect(st, ft.opening(ft.StreamState(_first("ab", body=body), body), ends=False) +
                     [_chunk_text("bcd"), _chunk_text("", "stop")])
    assert ans["choices"][0]["text"] == "abcd"


def _chunk_text(text, finish=None):
    return {"choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def test_the_whole_answer_joins_logprobs_usage_and_token_ids_as_colocated_gives_them():
    body = {"logprobs": 1, "return_token_ids": True}
    lp1 = {"text_offset": [0], "tokens": ["ab"], "token_logprobs": [-1.0], "top_logprobs": [{"ab": -1.0}]}
    st = ft.StreamState(_first("ab", body=body, logprobs=lp1), body)
    chunks = ft.opening(st, ends=False)
    for text, i in (("c", 7), ("de", 8)):
        c = _decode(text, [i], "length" if i == 8 else None, tokens=[text])
        c["choices"][0]["logprobs"]["text_offset"] = [0 if i == 7 else 1]
        chunks += ft.decode_chunk(st, c)[0]
    ans = ft.collect(st, chunks)
    ch = ans["choices"][0]
    assert ch["text"] == "abcde" and ch["token_ids"] == [42, 7, 8] and ch["prompt_token_ids"] == [1, 2, 3]
    assert ch["logprobs"]["text_offset"] == [0, 2, 3] and ch["logprobs"]["tokens"] == ["ab", "c", "de"]
    assert ans["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert ch["finish_reason"] == "length" and ans["id"] == "cmpl-9"


def test_chat_chunks_are_rebuilt_in_the_chat_format():
    st = ft.StreamState(_first("Hi", chat=True), {"stream": True})
    role, tok1 = ft.opening(st, ends=False)
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert tok1["object"] == "chat.completion.chunk" and tok1["choices"][0]["delta"] == {"content": "Hi"}
    out, _ = ft.decode_chunk(st, _decode(" there", [7], "length"))
    assert out[0]["choices"][0]["delta"] == {"content": " there"} and out[0]["choices"][0]["finish_reason"] == "length"
    ans = ft.collect(st, [role, tok1] + out)
    assert ans["choices"][0]["message"]["content"] == "Hi there" and ans["prompt_token_ids"] is None


# ---- the flow over HTTP ----------------------------------------------------------------------


class Double(VllmHttpDouble):
    """vLLM's request validation and answer shapes; ``hold`` delays answers, ``fail`` answers 400;
    ``early_first``/``early_fail``: the same for a request with the client's prompt (an early
    decode half; a decode half after the prefill has token ids)."""

    def __init__(self, name):
        super().__init__(name)
        self.hold: asyncio.Event | None = None
        self.fail = self.early_fail = False
        self.early_first: int | None = None
        self.paths: list[str] = []
        self.coord: FakeCoord | None = None  # a decode: where an early half flagged ``handoff`` waits for token 1

    async def _answer(self, request, req, chat):
        self.paths.append(request.path)
        early = not isinstance(getattr(req, "prompt", None), list)
        self.first = self.early_first if early and self.early_first is not None else 7
        kv = req.kv_transfer_params or {}
        if kv.get("handoff") and kv.get("do_remote_prefill") and self.coord is not None:
            # As pd.connector.handoff does once the coordinator settled the hand-off (the double's
            # FakeCoord says how): a token handed over becomes the prompt's last, so the answer
            # starts at the next token and has one token fewer.
            token = self.coord.outcome
            if token is not None and token >= 0:
                self.first = token + 1
                for key in ("max_tokens", "max_completion_tokens"):
                    if getattr(req, key, None):
                        setattr(req, key, getattr(req, key) - 1)
        if self.hold is not None:
            await self.hold.wait()
        if self.fail or (early and self.early_fail):
            return web.json_response({"error": {"message": f"{self.name} refuses", "type": "BadRequestError",
                                                "param": None, "code": 400}}, status=400)
        return await super()._answer(request, req, chat)


@asynccontextmanager
async def flow(early_decode: str = "greedy"):
    p, d, coord = Double("p"), Double("d"), FakeCoord()
    runners = []
    for dbl in (p, d):
        r = web.AppRunner(dbl.app(), handler_cancellation=True, access_log=None)
        await r.setup()
        await web.TCPSite(r, "127.0.0.1", 0).start()
        runners.append(r)
        dbl.url = f"http://127.0.0.1:{r.addresses[0][1]}"
    proxy = Proxy([p.url], [d.url], ProxyConfig(upstream_timeout_s=10, early_decode=early_decode))
    proxy.coord = d.coord = coord
    proxy.abort_grace_s = 0.0  # aborts at once (the grace has a test of its own)
    prunner, port = await proxy.start()
    try:
        async with aiohttp.ClientSession() as client:
            yield SimpleNamespace(p=p, d=d, coord=coord, proxy=proxy, url=f"http://127.0.0.1:{port}", client=client)
    finally:
        for dbl in (p, d):
            if dbl.hold is not None:
                dbl.hold.set()
        await prunner.cleanup()
        for r in runners:
            await r.cleanup()


REQ = {"model": SERVED, "prompt": "hello", "max_tokens": 3}


def test_streamed_token_1_reaches_the_client_before_the_decode_answers():
    async def go():
        async with flow() as env:
            env.d.hold = asyncio.Event()
            async with env.client.post(env.url + C, json={**REQ, "stream": True}) as r:
                first = await r.content.readuntil(b"\n\n")
                assert json.loads(first[6:])["choices"][0]["text"] == " w7"  # the prefill's token
                await eventually(lambda: env.d.paths)  # the decode half is out, its answer held
                env.d.hold.set()
                rest = (await r.read()).decode()
            texts = [json.loads(e[6:])["choices"][0]["text"] for e in rest.split("\n\n") if e.startswith("data: {")]
            assert texts == [" w7", " w8"] and rest.endswith("data: [DONE]\n\n")
            sent = env.d.bodies[-1]
            assert sent["prompt"] == [1, 2, 3, 7] and sent["max_tokens"] == 2
            assert sent["kv_transfer_params"]["kv_tokens"] == 3
            assert env.coord.aborts == []
    run(go())


def test_max_tokens_1_answers_from_the_prefill_and_aborts_the_unused_transfer():
    async def go():
        async with flow() as env:
            for stream in (False, True):
                async with env.client.post(env.url + C, json={**REQ, "max_tokens": 1, "stream": stream}) as r:
                    assert r.status == 200
                    data = await r.read()
                    pd_id = r.headers["x-pd-id"]
                if stream:
                    assert data.endswith(b"data: [DONE]\n\n") and b" w7" in data
                else:
                    ans = json.loads(data)
                    assert ans["choices"][0]["text"].startswith(" w7") and ans["usage"]["completion_tokens"] == 1
                assert env.d.paths == []
                await eventually(lambda pd_id=pd_id: any(a[0] == pd_id for a in env.coord.aborts))
    run(go())


def test_a_prompt_that_fills_the_context_but_one_token_ends_at_token_1():
    async def go():
        async with flow() as env:
            env.d.max_model_len = 4  # the doubles' prompts are 3 tokens
            async with env.client.post(env.url + C, json={"model": SERVED, "prompt": "hi"}) as r:
                ans = await r.json()
                assert r.status == 200 and ans["usage"]["completion_tokens"] == 1
            assert env.d.paths == [] and len(env.coord.aborts) == 1
    run(go())


def test_a_prefill_error_is_returned_and_no_decode_is_sent():
    async def go():
        async with flow() as env:
            env.p.fail = True
            async with env.client.post(env.url + C, json=REQ) as r:
                assert r.status == 400 and "p refuses" in (await r.json())["error"]["message"]
            assert env.d.paths == []
            await eventually(lambda: env.coord.aborts)
    run(go())


def test_a_decode_error_after_token_1_ends_the_stream_with_an_error_event_and_aborts():
    async def go():
        async with flow() as env:
            env.d.fail = True
            async with env.client.post(env.url + C, json={**REQ, "stream": True}) as r:
                data = (await r.read()).decode()
                pd_id = r.headers["x-pd-id"]
            events = [e for e in data.split("\n\n") if e]
            assert " w7" in events[0] and "d refuses" in events[-1] and "[DONE]" not in data
            await eventually(lambda: any(a[0] == pd_id for a in env.coord.aborts))
            async with env.client.post(env.url + C, json=REQ) as r:  # not streamed: the decode's error as is
                assert r.status == 400 and "d refuses" in (await r.json())["error"]["message"]
    run(go())


def test_a_client_gone_after_token_1_closes_the_decode_and_aborts():
    async def go():
        async with flow() as env:
            env.d.hold = asyncio.Event()
            async with env.client.post(env.url + C, json={**REQ, "stream": True}) as r:
                await r.content.readuntil(b"\n\n")
                pd_id = r.headers["x-pd-id"]
                await eventually(lambda: env.d.paths)
                r.close()
            await eventually(lambda: any(a[0] == pd_id for a in env.coord.aborts))
            await eventually(lambda: not any(env.proxy.decode.outstanding.values()))
    run(go())


# ---- the early decode (pd.proxy.early) --------------------------------------------------------

GREEDY = {**REQ, "temperature": 0}


def _early(outcome: str, env) -> float:
    return env.proxy.metrics.early_decodes.labels(outcome)._value.get()


async def _texts(r, chat=False) -> list[str]:
    data = (await r.read()).decode()
    assert data.endswith("data: [DONE]\n\n"), data
    out = []
    for e in data.split("\n\n"):
        if e.startswith("data: {"):
            for c in json.loads(e[6:])["choices"]:
                out.append((c["delta"].get("content") or "") if chat else c["text"])
    return [t for t in out if t]


@pytest.mark.parametrize("endpoint", [C, CHAT])
@pytest.mark.parametrize("stream", [False, True])
def test_a_greedy_requests_decode_half_goes_out_with_its_prefill_half_and_its_answer_is_used(endpoint, stream):
    async def go():
        async with flow() as env:
            env.p.hold = asyncio.Event()  # the prefill is still computing...
            body = ({**GREEDY, "stream": stream} if endpoint == C else
                    {"model": SERVED, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
                     "temperature": 0, "stream": stream, "stream_options": {"include_usage": True}} if stream else
                    {"model": SERVED, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
                     "temperature": 0})
            sending = asyncio.ensure_future(env.client.post(env.url + endpoint, json=body))
            await eventually(lambda: env.d.paths)  # ...and the decode half is already out
            env.p.hold.set()
            async with await sending as r:
                assert r.status == 200
                if stream:
                    assert await _texts(r, endpoint == CHAT) == [" w7", " w8", " w9"]
                else:
                    ans = await r.json()
                    ch = ans["choices"][0]
                    assert (ch["message"]["content"] if endpoint == CHAT else ch["text"]) == " w7 w8 w9"
                    assert ans["usage"]["completion_tokens"] == 3 and ch["finish_reason"] == "length"
            (sent,) = env.d.bodies  # one decode request: the early one
            assert sent.get("prompt", sent.get("messages")) == body.get("prompt", body.get("messages"))
            assert sent["kv_transfer_params"]["do_remote_prefill"] and sent["stream"] and sent["return_token_ids"]
            assert sent["max_tokens"] == 3 and env.d.paths == [endpoint]
            assert _early("used", env) == 1 and env.coord.aborts == []
    run(go())


@pytest.mark.parametrize("stream", [False, True])
def test_an_early_decode_whose_token_1_differs_is_closed_and_a_decode_after_the_prefill_answers(stream):
    async def go():
        async with flow() as env:
            env.d.early_first = 6  # its token 1 is 6, the prefill's 7
            async with env.client.post(env.url + C, json={**GREEDY, "stream": stream, "return_token_ids": True}) as r:
                assert r.status == 200
                if stream:
                    assert await _texts(r) == [" w7", " w7", " w8"]  # token 1, then the second decode's 7, 8
                else:
                    ans = await r.json()
                    assert ans["choices"][0]["text"] == " w7 w7 w8" and ans["choices"][0]["token_ids"] == [7, 7, 8]
                    assert ans["usage"]["completion_tokens"] == 3
                pd_id = r.headers["x-pd-id"]
            early, after = env.d.bodies
            assert early["prompt"] == "hello" and after["prompt"] == [1, 2, 3, 7] and after["max_tokens"] == 2
            assert "kv_transfer_params" not in after  # its transfer went to the early one
            assert _early("differed", env) == 1 and _early("used", env) == 0
            await eventually(lambda: any(a[0] == pd_id for a in env.coord.aborts))
    run(go())


def test_an_early_decode_that_fails_before_token_1_leaves_the_answer_to_a_decode_after_the_prefill():
    async def go():
        async with flow() as env:
            env.d.early_fail = True
            async with env.client.post(env.url + C, json={**GREEDY, "stream": True}) as r:
                assert r.status == 200 and await _texts(r) == [" w7", " w7", " w8"]
            assert len(env.d.bodies) == 2 and _early("failed", env) == 1
    run(go())


@pytest.mark.parametrize("endpoint", [C, CHAT])
@pytest.mark.parametrize("stream", [False, True])
def test_an_early_decode_handed_token_1_answers_from_token_2(endpoint, stream):
    async def go():
        async with flow() as env:
            env.coord.outcome = 7  # the prefill's token 1, handed over
            body = ({**GREEDY, "stream": stream, "return_token_ids": True} if endpoint == C else
                    {"model": SERVED, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
                     "temperature": 0, "stream": stream, "return_token_ids": True})
            if stream:
                body["stream_options"] = {"include_usage": True}
            async with env.client.post(env.url + endpoint, json=body) as r:
                assert r.status == 200
                pd_id = r.headers["x-pd-id"]
                if stream:
                    data = (await r.read()).decode()
                    events = [json.loads(e[6:]) for e in data.split("\n\n") if e.startswith("data: {")]
                    texts = [(c["delta"].get("content") or "") if endpoint == CHAT else c["text"]
                             for e in events for c in e["choices"]]
                    assert [t for t in texts if t] == [" w7", " w8", " w9"]
                    assert [i for e in events for c in e["choices"] for i in c.get("token_ids") or []] == [7, 8, 9]
                    assert events[-1]["usage"]["completion_tokens"] == 3
                else:
                    ans = await r.json()
                    ch = ans["choices"][0]
                    assert (ch["message"]["content"] if endpoint == CHAT else ch["text"]) == " w7 w8 w9"
                    assert ch["token_ids"] == [7, 8, 9] and ans["usage"]["completion_tokens"] == 3
            (sent,) = env.d.bodies  # the early decode only: its answer was used
            assert sent["kv_transfer_params"]["handoff"] is True and env.coord.outcomes == [pd_id]
            assert env.p.bodies[-1]["kv_transfer_params"]["handoff"] is True  # its prefill sends FIRST
            assert _early("handed", env) == 1 and _early("used", env) == 0 and env.coord.aborts == []
    run(go())


def test_a_handed_token_1_a_stop_string_could_start_in_is_not_used():
    async def go():
        async with flow() as env:
            env.coord.outcome = 7
            body = {**GREEDY, "stop": ["7 w"], "stream": True}  # " w7" + " w8": the stop string spans them
            async with env.client.post(env.url + C, json=body) as r:
                assert (await _texts(r))[0] == " w"  # token 1's text up to where the stop string may start
                pd_id = r.headers["x-pd-id"]  # (the double applies no stop strings: the rest is not checked)
            # The early decode's server would not see the stop string: the decode after the prefill answers.
            assert env.coord.outcomes == [pd_id] and _early("handed", env) == 0 and _early("differed", env) == 1
            assert env.d.bodies[-1]["prompt"] == [1, 2, 3, 7]
            await _handed_not_used(env, pd_id)
    run(go())


def test_a_vetoed_early_decode_with_no_first_event_in_time_is_closed_and_aborted_later(monkeypatch):
    """It may be loading its KV in a long engine step: its transfer's abort waits LOAD_WAIT_S more
    than the grace (freed under a load, the blocks would stay in vLLM's prefix cache unwritten)."""
    from pd.proxy import relay_first

    monkeypatch.setattr(relay_first, "LOAD_WAIT_S", 0.5)

    async def go():
        async with flow() as env:
            env.coord.outcome = 7
            answer = env.d._answer

            async def slow_early_half(request, req, chat):
                if (req.kv_transfer_params or {}).get("handoff"):
                    await asyncio.sleep(2.0)  # no first event within LOAD_WAIT_S
                return await answer(request, req, chat)

            env.d._answer = slow_early_half
            body = {**GREEDY, "stop": ["7 w"], "stream": True}  # vetoed: a stop string may begin in token 1
            async with env.client.post(env.url + C, json=body) as r:
                assert (await _texts(r))[0] == " w"
                pd_id = r.headers["x-pd-id"]
            assert _early("differed", env) == 1 and env.d.bodies[-1]["prompt"] == [1, 2, 3, 7]
            assert not any(a[0] == pd_id for a in env.coord.aborts)  # closed 0.5 s after the prefill; abort 0.5 s on
            await eventually(lambda: any(a[0] == pd_id for a in env.coord.aborts))
    run(go())


@pytest.mark.parametrize("text,token_str,body,allowed", [
    (" w7", None, {}, True), ("", None, {}, False), ("ab\ufffd", None, {}, False), ("ab", None, {"stop": ["bq"]}, False),
    ("ab", None, {"stop": ["ab"]}, True),  # a stop string within token 1 ends the answer at the prefill
    ("ab", None, {"stop": ["xy"]}, True),
    ("xab", "ab", {}, False),  # its text took in the prompt's pending bytes: not at a character boundary
    ("ab", "", {}, False),
])
def test_which_tokens_may_be_handed_over(text, token_str, body, allowed):
    st = ft.StreamState(_first(text, body=body, token_str=token_str), body)
    if token_str == "":
        st.first.token_str = None  # the prefill's answer had no logprobs entry
    assert early.handoff_allowed(st) is allowed


@pytest.mark.parametrize("chat", [False, True])
def test_token_1s_own_text_is_asked_of_the_prefill_and_never_reaches_the_client(chat):
    body = ({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    b = ft.prefill_body(body, "x", handoff=True)
    assert b["kv_transfer_params"] == {"pd_id": "x", "do_remote_decode": True, "handoff": True}
    assert (b["logprobs"], b["top_logprobs"]) == (True, 0) if chat else b["logprobs"] == 0
    lp = {"content": [{"token": "ab", "logprob": -0.1, "bytes": [97, 98], "top_logprobs": []}]} if chat else {
        "text_offset": [0], "tokens": ["ab"], "token_logprobs": [-0.1], "top_logprobs": [{}]}
    f = _first("ab", chat=chat, body=body, logprobs=lp)
    assert f.choice["logprobs"] is None and f.logprobs is None
    st = ft.StreamState(f, body)
    assert ft.parse_prefill(CHAT if chat else C, body, json.dumps({**f.answer, "choices": [
        {**f.choice, "logprobs": lp}]}).encode()).token_str == "ab"
    assert "logprobs" not in json.dumps(ft.collect(st, ft.opening(st, ends=True))).replace('"logprobs": null', "")
    asked = {**body, "logprobs": 0} if not chat else body
    assert ft.prefill_body(asked, "x", handoff=True).get("logprobs") == (0 if not chat else True)
    if not chat:  # the client's logprobs 0 are the client's: kept in its answer
        f = _first("ab", body=asked, logprobs=lp)
        assert f.logprobs == lp and f.choice["logprobs"] == lp


def test_an_unanswered_hand_off_is_not_trusted_and_the_decode_after_the_prefill_answers():
    """Unknown (no answer, or a coordinator restarted since it handed token 1 over): the early
    decode may be loading the transfer, so it is let run to its first event before it is closed
    and the decode after the prefill goes out (closed mid-load, its blocks could stay in vLLM's
    prefix cache unwritten, and that decode, on the same instance, would read them)."""
    async def go():
        async with flow() as env:
            env.coord.outcome = None  # the coordinator did not answer: which way the decode went is unknown
            answer, seen = env.d._answer, []

            async def slow_early_half(request, req, chat):
                early_half = bool((req.kv_transfer_params or {}).get("handoff"))
                seen.append(("early" if early_half else "after", time.monotonic()))
                if early_half:
                    await asyncio.sleep(0.3)  # loading
                    seen.append(("early answers", time.monotonic()))
                return await answer(request, req, chat)

            env.d._answer = slow_early_half
            async with env.client.post(env.url + C, json={**GREEDY, "return_token_ids": True}) as r:
                ans = await r.json()
                pd_id = r.headers["x-pd-id"]
            # token 1, then the decode after the prefill (the double starts every answer at 7)
            assert ans["choices"][0]["text"] == " w7 w7 w8" and ans["choices"][0]["token_ids"] == [7, 7, 8]
            early_half, after = env.d.bodies
            assert early_half["kv_transfer_params"]["handoff"] is True and after["prompt"] == [1, 2, 3, 7]
            assert "kv_transfer_params" not in after and _early("differed", env) == 1
            assert [w for w, _ in seen] == ["early", "early answers", "after"]  # let load, then the decode after
            await _handed_not_used(env, pd_id)
    run(go())


async def _handed_not_used(env, pd_id: str) -> None:
    """An early decode handed token 1 and not used: let run to its first event (its load is done),
    closed, and only then its transfer aborted (what the coordinator still holds of it is freed)."""
    await eventually(lambda: not any(env.proxy.decode.outstanding.values()))
    await eventually(lambda: any(a[0] == pd_id for a in env.coord.aborts))


def test_an_abort_reaches_the_coordinator_after_its_grace():
    async def go():
        async with flow() as env:
            env.proxy.abort_grace_s = 0.5
            env.p.fail = True  # the prefill refuses: the transfer is given up
            async with env.client.post(env.url + C, json=REQ) as r:
                assert r.status == 400
                pd_id = r.headers["x-pd-id"]
            await asyncio.sleep(0.3)
            assert not any(a[0] == pd_id for a in env.coord.aborts)  # a decode may still be reading its chunks
            await eventually(lambda: any(a[0] == pd_id for a in env.coord.aborts))
    run(go())


def test_greedy_recompute_never_hands_token_1_over():
    async def go():
        async with flow("greedy_recompute") as env:
            env.coord.outcome = 7
            async with env.client.post(env.url + C, json={**GREEDY, "stream": True}) as r:
                assert await _texts(r) == [" w7", " w8", " w9"]
            (sent,) = env.d.bodies
            assert "handoff" not in sent["kv_transfer_params"] and env.coord.outcomes == []
            assert "handoff" not in env.p.bodies[-1]["kv_transfer_params"]
            assert _early("used", env) == 1
    run(go())


async def _early_discarded(env, pd_id: str) -> None:
    """The early decode sent for ``pd_id`` was let go: its transfer aborted, no decode in flight."""
    await eventually(lambda: any(a[0] == pd_id for a in env.coord.aborts))
    await eventually(lambda: not any(env.proxy.decode.outstanding.values()))


def test_token_1_that_ends_a_greedy_answer_closes_the_early_decode_and_aborts():
    async def go():
        async with flow() as env:
            env.d.hold = asyncio.Event()
            env.d.max_model_len = 4  # the doubles' prompts are 3 tokens: room for token 1 only
            async with env.client.post(env.url + C, json={"model": SERVED, "prompt": "hi", "temperature": 0}) as r:
                ans = await r.json()
                assert r.status == 200 and ans["usage"]["completion_tokens"] == 1
                pd_id = r.headers["x-pd-id"]
            assert env.d.paths == [C]  # it had gone out; the answer did not wait for it
            await _early_discarded(env, pd_id)
    run(go())


def test_a_prefill_error_discards_the_early_decode_and_aborts():
    async def go():
        async with flow() as env:
            env.d.hold = asyncio.Event()
            env.p.fail = True
            async with env.client.post(env.url + C, json={**REQ, "temperature": 0}) as r:
                assert r.status == 400 and "p refuses" in (await r.json())["error"]["message"]
                pd_id = r.headers["x-pd-id"]
            assert env.d.paths == [C]  # it had gone out with the prefill half
            await _early_discarded(env, pd_id)
    run(go())


def test_an_empty_prefill_pool_sends_no_early_decode():
    async def go():
        async with flow() as env:
            env.proxy.prefill.set_urls([])  # its only instance is being restarted
            async with env.client.post(env.url + C, json={**REQ, "temperature": 0}) as r:
                assert r.status >= 500
            await asyncio.sleep(0.2)
            assert env.d.paths == [] and env.coord.aborts == []
    run(go())


def test_max_tokens_1_sends_no_early_decode():
    async def go():
        async with flow() as env:
            async with env.client.post(env.url + C, json={**GREEDY, "max_tokens": 1}) as r:
                assert (await r.json())["usage"]["completion_tokens"] == 1
            assert env.d.paths == []
    run(go())


def test_an_early_decode_that_tokenized_the_prompt_otherwise_is_not_used():
    e = _opened("ab")
    with pytest.raises(early.Differs, match="tokenized"):
        early.early_event(e, {"choices": [{"index": 0, "text": "ab", "token_ids": [42], "prompt_token_ids": [1, 2],
                                           "finish_reason": None}]})
    e = _opened("ab")  # the same prompt ids (_first's are 1, 2, 3): checked, then used
    assert early.early_event(e, {"choices": [{"index": 0, "text": "ab", "token_ids": [42],
                                              "prompt_token_ids": [1, 2, 3], "finish_reason": None}]}) == ([], False)


def test_without_max_tokens_the_decode_half_gives_what_vllm_gives_by_default():
    f = _first()
    assert ft.decode_body(C, {"prompt": "x"}, f, "P")["max_tokens"] == 15  # completions: 16 in all
    assert ft.decode_body(C, {"prompt": "x", "max_tokens": None}, f, "P", 100)["max_tokens"] == 15
    chat = {"messages": [{"role": "user", "content": "x"}]}
    assert ft.decode_body(CHAT, chat, f, "P", 100)["max_tokens"] == 100 - 3 - 1  # chat: to the context's end
    assert "max_tokens" not in ft.decode_body(CHAT, chat, f, "P")  # (the context length unknown)


@pytest.mark.parametrize("body", [{"temperature": 0.7}, {}, {"temperature": 0.7, "top_k": 5}])
def test_sampled_requests_and_early_decode_never_send_the_decode_half_after_the_prefill(body):
    async def go():
        for mode, req in (("greedy", {**REQ, **body}), ("never", GREEDY)):
            async with flow(early_decode=mode) as env:
                async with env.client.post(env.url + C, json=req) as r:
                    assert (await r.json())["choices"][0]["text"] == " w7 w7 w8"
                (sent,) = env.d.bodies
                assert sent["prompt"] == [1, 2, 3, 7] and _early("used", env) == 0
    run(go())


def test_greedy_means_temperature_0_or_top_k_1():
    assert early.greedy({"temperature": 0}) and early.greedy({"temperature": 0.0, "top_k": 9})
    assert early.greedy({"top_k": 1, "temperature": 1.0})
    assert not any(early.greedy(b) for b in ({}, {"temperature": 0.1}, {"temperature": False}, {"top_k": True},
                                             {"temperature": "0"}, {"top_k": -1}))


def _opened(text="ab", stop=None, logprobs=None, chat=False) -> early.Early:
    body = {"prompt": "x", **({"stop": stop} if stop else {}), **({"logprobs": 1} if logprobs else {})}
    st = ft.StreamState(_first(text, chat=chat, logprobs=logprobs), body)
    ft.opening(st, ends=False)
    return early.Early.after_opening(st)


def _ev(text, ids, finish=None, lp=None, chat=False):
    c = {"index": 0, "finish_reason": finish, "token_ids": ids}
    c.update({"delta": {"content": text}} if chat else {"text": text, "logprobs": lp})
    return {"choices": [c]}


def test_the_decodes_token_1_is_checked_and_not_given_twice():
    e = _opened("ab")
    chunks, over = early.early_event(e, _ev("ab", [42]))  # token 1: the client has it
    assert chunks == [] and not over and e.checked
    chunks, _ = early.early_event(e, _ev(" c", [43], finish="length"))
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [(" c", "length")]
    assert e.st.n_decode == 1
    with pytest.raises(early.Differs, match="token 1 is 41"):
        early.early_event(_opened("ab"), _ev("ab", [41]))
    with pytest.raises(early.Differs, match="text"):
        early.early_event(_opened("ab"), _ev("aX", [42]))


def test_once_past_token_1s_text_the_decodes_text_is_passed_on_without_being_kept():
    e = _opened("ab")
    assert early.early_event(e, _ev("a", [42]))[0] == []  # token 1 split over two events
    (c,), _ = early.early_event(e, _ev("bc", [43]))
    assert c["choices"][0]["text"] == "c" and e.past and e.text == ""
    texts = [early.early_event(e, _ev(f" w{i}", [44 + i]))[0][0]["choices"][0]["text"] for i in range(2000)]
    assert texts == [f" w{i}" for i in range(2000)] and e.text == "" and e.sent == "ab"
    assert e.st.n_decode == 2001


def test_chats_role_event_is_skipped_and_logprobs_lose_token_1s_entries():
    e = _opened("ab", chat=True)
    assert early.early_event(e, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]}) == ([], False)
    assert early.early_event(e, _ev("a", [42], chat=True))[0] == []
    (c,), _ = early.early_event(e, _ev("bc", [43], chat=True))
    assert c["choices"][0]["delta"]["content"] == "c"  # "b" was token 1's, given by the prefill
    lp1 = {"tokens": ["ab"], "token_logprobs": [-0.1], "text_offset": [0], "top_logprobs": [{"ab": -0.1}]}
    e = _opened("ab", logprobs=lp1)
    lp = {"tokens": ["ab", "c"], "token_logprobs": [-0.1, -0.2], "text_offset": [0, 2],
          "top_logprobs": [{"ab": -0.1}, {"c": -0.2}]}
    (c,), _ = early.early_event(e, _ev("abc", [42, 43], lp=lp))
    assert c["choices"][0]["logprobs"] == {"tokens": ["c"], "token_logprobs": [-0.2], "text_offset": [2],
                                           "top_logprobs": [{"c": -0.2}]}
    assert c["choices"][0]["text"] == "c"


def test_text_held_back_for_a_stop_string_comes_from_the_decode_which_ends_at_it():
    e = _opened("ab", stop=["bc"])  # "b" may begin the stop string: the client has "a" only
    assert e.sent == "a"
    assert early.early_event(e, _ev("a", [42]))[0] == []  # the decode holds "b" back too
    (c,), _ = early.early_event(e, _ev("", [43], finish="stop"))  # it found "bc": the answer is "a"
    assert c["choices"][0]["text"] == "" and c["choices"][0]["finish_reason"] == "stop"
    e = _opened("ab", stop=["bd"])
    early.early_event(e, _ev("a", [42]))
    (c,), _ = early.early_event(e, _ev("bc", [43]))  # not the stop string: "b" is given now, with "c"
    assert c["choices"][0]["text"] == "bc"


# ---- token 1 with no text of its own (part of a character) -----------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_token_1_without_text_leaves_the_whole_answer_to_a_decode_that_computes_it(stream):
    """A sampled request whose token 1 shows no text (``unshown``: vLLM holds back part of a
    character): no decode request for prompt + token 1 (vLLM would prime its detokenizer with ids
    whose text ends inside a character, and its answer would start with the prompt's text); the
    client's own request goes to the decode, loading the transfer, and its answer is the client's."""
    async def go():
        async with flow() as env:
            env.p.unshown = {7}
            async with env.client.post(env.url + C, json={**REQ, "stream": stream, "return_token_ids": True}) as r:
                assert r.status == 200
                if stream:
                    assert await _texts(r) == [" w7", " w8", " w9"]  # the decode's, token 1 included
                else:
                    ans = await r.json()
                    assert ans["choices"][0]["text"] == " w7 w8 w9" and ans["choices"][0]["token_ids"] == [7, 8, 9]
                    assert ans["usage"]["completion_tokens"] == 3
                pd_id = r.headers["x-pd-id"]
            (sent,) = env.d.bodies
            assert sent["prompt"] == "hello" and sent["max_tokens"] == 3 and sent["stream"] is stream
            assert sent["kv_transfer_params"] == {"pd_id": pd_id, "do_remote_prefill": True}
            paths = env.proxy.metrics.paths
            assert paths.labels("decode", "token 1 without text")._value.get() == 1
            assert paths.labels("prefill", "")._value.get() == 0
            assert env.coord.aborts == []  # the decode loads the transfer (its DONE frees it)
    run(go())


@pytest.mark.parametrize("mode", ["greedy", "greedy_recompute"])
def test_token_1_without_text_lets_the_early_decode_load_then_asks_the_decode_for_the_whole_answer(mode):
    """The same for a greedy request: its early decode (handed token 1 or computing it) is let load,
    closed, and its transfer aborted; then the client's request goes to the same decode instance
    without the transfer (the prompt's KV is in its prefix cache), and its answer is the client's."""
    async def go():
        async with flow(mode) as env:
            env.p.unshown = {7}
            env.coord.outcome = 7 if mode == "greedy" else None
            async with env.client.post(env.url + C, json={**GREEDY, "stream": True}) as r:
                assert r.status == 200 and await _texts(r) == [" w7", " w8", " w9"]
                pd_id = r.headers["x-pd-id"]
            early_half, after = env.d.bodies
            assert early_half["prompt"] == after["prompt"] == "hello" and after["max_tokens"] == 3
            assert ("handoff" in early_half["kv_transfer_params"]) == (mode == "greedy")
            assert "kv_transfer_params" not in after
            assert _early("unshown", env) == 1 and _early("differed", env) == 0
            await _handed_not_used(env, pd_id)
    run(go())


def test_a_client_gone_while_token_1_without_text_waits_for_the_early_decode_closes_it_and_aborts():
    async def go():
        async with flow() as env:
            env.p.unshown = {7}
            env.d.hold = asyncio.Event()  # the early decode gives no first event
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(env.client.post(env.url + C, json={**GREEDY, "stream": True}), 1.0)
            await eventually(lambda: env.coord.aborts)
            await eventually(lambda: not any(env.proxy.decode.outstanding.values()))
            assert len(env.d.bodies) == 1  # the decode request after it never went out
    run(go())
