"""The first token from the prefill, end to end: every API case against a colocated answer (real vLLM).

Each case is sent to the 1P1D deployment and to the colocated instance; the answers must agree
in text, token ids, usage, finish and stop reasons, and logprobs, streamed or not. The proxy's
``pdkv_proxy_first_token_path`` counter says which path each request took (prefill: token 1 from
the prefill; prefill_only: token 1 ended the answer, no decode request; decode: the old flow).
A greedy request on the first-token path is sent its decode half with its prefill half (the
early decode; ``proxy.early_decode: greedy``, the deployment's proxy: the prefill's scheduler hands
token 1 to the early decode through the coordinator, so that its answer starts at token 2); a
second proxy in front of the same instances has ``--early-decode never`` and a third
``--early-decode greedy_recompute`` (the early decode computes token 1 itself), so each greedy case
runs every way.
"""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time

import pytest
import requests
import yaml

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(16, 4000) for _ in range(n)]


def _ask(url: str, path: str, body: dict) -> dict:
    """The answer in one shape, streamed or not: text, token ids, usage, finish/stop reason, logprobs."""
    body = {"model": MODEL, "temperature": 0, **body}
    stream = bool(body.get("stream"))
    if stream:
        body.setdefault("stream_options", {"include_usage": True})
    r = requests.post(url + path, json=body, timeout=600, stream=stream)
    assert r.status_code == 200, r.text
    chat = path.endswith("chat/completions")
    if not stream:
        ans = r.json()
        out = []
        for c in ans["choices"]:
            out.append({"text": c["message"]["content"] if chat else c["text"], "ids": c.get("token_ids"),
                        "finish": c["finish_reason"], "stop": c.get("stop_reason"), "logprobs": c.get("logprobs")})
        return {"choices": out, "usage": _usage(ans["usage"])}
    choices: dict[int, dict] = {}
    usage = None
    for line in r.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        ev = json.loads(line[6:])
        assert "error" not in ev, ev
        if ev.get("usage"):
            usage = _usage(ev["usage"])
        for c in ev["choices"]:
            o = choices.setdefault(c["index"], {"text": "", "ids": None, "finish": None, "stop": None,
                                                "logprobs": None})
            o["text"] += (c["delta"].get("content") or "") if chat else c["text"]
            if c.get("token_ids") is not None:
                o["ids"] = (o["ids"] or []) + c["token_ids"]
            if c.get("finish_reason") is not None:
                o["finish"], o["stop"] = c["finish_reason"], c.get("stop_reason")
            lp = c.get("logprobs")
            if lp and not chat:
                o["logprobs"] = {k: (o["logprobs"] or {}).get(k, []) + lp[k] for k in lp}
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def _usage(u: dict) -> dict:
    return {k: u[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def _paths(url: str) -> dict[tuple[str, str], float]:
    text = requests.get(url + "/metrics", timeout=10).text
    out = {}
    for m in re.finditer(r'^pdkv_proxy_first_token_path_total\{path="([^"]*)",why="([^"]*)"\} (\S+)$', text, re.M):
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def _early(url: str, outcome: str = "used") -> float:
    m = re.search(r'^pdkv_proxy_early_decode_total\{outcome="%s"\} (\S+)$' % outcome,
                  requests.get(url + "/metrics", timeout=10).text, re.M)
    return float(m.group(1)) if m else 0.0


def _early_answered(url: str) -> float:
    """Early decodes whose answer was used: handed token 1, or checked against it."""
    return _early(url, "handed") + _early(url, "used")


class _Proxy:
    url: str


def _proxy(pd, tmp_path_factory, name: str, port: int, early_decode: str) -> tuple[subprocess.Popen, _Proxy]:
    """Another proxy in front of the deployment's instances, with ``--early-decode early_decode``."""
    log = tmp_path_factory.mktemp(f"proxy-{name}") / "proxy.log"
    argv = [sys.executable, "-m", "launch.cli", "proxy", "--port", str(port), "--prefill", pd.instance_url("prefill"),
            "--decode", pd.instance_url("decode"), "--coordinator", f"tcp://127.0.0.1:{pd.cfg['coordinator']['port']}",
            "--first-token", "prefill", "--early-decode", early_decode]
    coord = yaml.safe_load((pd.run_dir / "config.yaml").read_text())["coordinator"]  # as pd launch resolved it
    if coord.get("auth") == "curve":
        argv += ["--coordinator-keys-dir", coord["keys_dir"], "--coordinator-client-key", coord["client_key"]]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    p = _Proxy()
    p.url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(p.url + "/health", timeout=2).status_code == 200:
                return proc, p
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(log.read_text())
        time.sleep(0.2)


@pytest.fixture(scope="module")
def flows(deployments, tmp_path_factory):
    """{"handoff": the deployment's proxy (token 1 handed to the early decode), "after": a proxy with
    --early-decode never, "early": one with --early-decode greedy_recompute (the early decode computes token 1)}."""
    pd, co = deployments
    procs, proxies = [], {"handoff": pd}
    try:
        for name, port, mode in (("after", 18002, "never"), ("early", 18003, "greedy_recompute")):
            proc, proxies[name] = _proxy(pd, tmp_path_factory, name, port, mode)
            procs.append(proc)
        yield proxies, co
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)


def _took(before: dict, after: dict) -> set[str]:
    return {k[0] for k, v in after.items() if v > before.get(k, 0.0)}


def _same(pd, co, path: str, body: dict) -> tuple[dict, set[str]]:
    """The P/D answer equals the colocated one; (the answer, the paths the P/D request took)."""
    ref = _ask(co.url, path, body)
    before = _paths(pd.url)
    got = _ask(pd.url, path, body)
    took = _took(before, _paths(pd.url))
    for g, r in zip(got["choices"], ref["choices"]):
        assert g["text"] == r["text"], (body, g, r)
        assert (g["ids"], g["finish"], g["stop"]) == (r["ids"], r["finish"], r["stop"]), (body, g, r)
        if r["logprobs"] is not None:
            assert g["logprobs"]["tokens"] == r["logprobs"]["tokens"]
            assert g["logprobs"]["text_offset"] == r["logprobs"]["text_offset"]
            assert g["logprobs"]["token_logprobs"] == pytest.approx(r["logprobs"]["token_logprobs"], abs=1e-3)
            assert [sorted(t) for t in g["logprobs"]["top_logprobs"]] == [sorted(t) for t in r["logprobs"]["top_logprobs"]]
    assert len(got["choices"]) == len(ref["choices"])
    assert got["usage"] == ref["usage"], (body, got["usage"], ref["usage"])
    return got, took


LONG = _prompt(700, seed=5)  # three chunks of KV


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", [
    {"max_tokens": 12},
    {"return_token_ids": True},  # no max_tokens: vLLM's 16 in all, token 1 included
    {"max_tokens": 12, "return_token_ids": True},
    {"max_tokens": 8, "logprobs": 3},
    {"max_tokens": 10, "ignore_eos": True, "min_tokens": 4},
    {"max_tokens": 6, "temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.2, "ignore_eos": True,
     "return_token_ids": True},
])
@pytest.mark.parametrize("flow", ["early", "after", "handoff"])
def test_completions_take_the_first_token_path_and_match(flows, flow, case, stream):
    proxies, co = flows
    pd = proxies[flow]
    if case.get("temperature", 0) > 0:  # sampled without a seed: nothing to compare, only the path and counts
        before = _paths(pd.url)
        got = _ask(pd.url, "/v1/completions", {"prompt": LONG, "stream": stream, **case})
        assert got["usage"]["completion_tokens"] == len(got["choices"][0]["ids"]) == case["max_tokens"]
        assert _took(before, _paths(pd.url)) == {"prefill"}
        return
    answered = _early_answered(pd.url)
    _, took = _same(pd, co, "/v1/completions", {"prompt": LONG, "stream": stream, **case})
    assert took == {"prefill"}
    assert _early_answered(pd.url) == answered + (flow != "after")  # handed token 1, or its own was the prefill's


@pytest.mark.parametrize("flow", ["early", "after", "handoff"])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_takes_the_first_token_path_and_matches(flows, flow, stream):
    proxies, co = flows
    pd = proxies[flow]
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 30}]
    _, took = _same(pd, co, "/v1/chat/completions", {"messages": msgs, "max_tokens": 12, "stream": stream})
    assert took == {"prefill"}


def _first_two(co, prompt) -> tuple[list[int], str, str]:
    """Colocated's first two tokens: their ids and texts."""
    ans = _ask(co.url, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "logprobs": 0,
                                           "return_token_ids": True})["choices"][0]
    return ans["ids"], ans["logprobs"]["tokens"][0], ans["logprobs"]["tokens"][1]


@pytest.mark.parametrize("stream", [False, True])
def test_token_1_that_ends_the_answer_needs_no_decode(deployments, stream):
    pd, co = deployments
    ids, _, _ = _first_two(co, LONG)
    eos = 1  # pd make-model's eos_token_id
    for extra in ({"max_tokens": 1}, {"stop_token_ids": [ids[0]]}, {"logit_bias": {str(eos): 100}}):
        got, took = _same(pd, co, "/v1/completions", {"prompt": LONG, "max_tokens": 12, "stream": stream, **extra})
        assert took == {"prefill_only"}, extra
        assert got["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_holds_back_eos_on_both_halves(deployments, stream):
    pd, co = deployments
    got, took = _same(pd, co, "/v1/completions", {"prompt": LONG, "max_tokens": 12, "min_tokens": 3,
                                                  "logit_bias": {"1": 100}, "stream": stream})
    assert took == {"prefill"} and got["usage"]["completion_tokens"] == 4 and got["choices"][0]["finish"] == "stop"  # 3, then EOS


@pytest.mark.parametrize("flow", ["early", "after", "handoff"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_across_tokens_1_and_2_is_caught(flows, flow, stream):
    proxies, co = flows
    pd = proxies[flow]
    for seed in range(40):  # a prompt whose first two tokens both have text
        prompt = _prompt(300, seed=1000 + seed)
        _, t1, t2 = _first_two(co, prompt)
        if t1 and t2 and (t1[-1] + t2[0]) not in t1 + t2[:-1]:
            break
    stop = t1[-1] + t2[0]
    for extra in ({}, {"include_stop_str_in_output": True}):
        got, took = _same(pd, co, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "stop": [stop],
                                                      "stream": stream, **extra})
        assert took == {"prefill"} and got["choices"][0]["stop"] == stop
        assert got["usage"]["completion_tokens"] == 2
    later = _ask(co.url, "/v1/completions", {"prompt": prompt, "max_tokens": 8})["choices"][0]["text"][-3:]
    got, _ = _same(pd, co, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "stop": [later], "stream": stream})
    assert got["choices"][0]["finish"] == "stop"


@pytest.mark.parametrize("case", [
    ("n", {"n": 2, "seed": 1, "temperature": 0.9}), ("echo", {"echo": True}), ("prompt list", {"prompt": [LONG[:300], LONG[:200]]}),
    ("seed", {"seed": 7, "temperature": 0.9}), ("penalties", {"presence_penalty": 0.5}),
])
def test_requests_it_cannot_answer_exactly_take_the_old_flow(deployments, case):
    """Several sequences (n, best_of > 1, a prompt list; issue 18: one pd_id for all of them let
    their chunks collide) are answered by the decode instance alone, without a transfer."""
    pd, co = deployments
    name, extra = case
    _, took = _same(pd, co, "/v1/completions", {"prompt": LONG, "max_tokens": 8, **extra})
    assert took == ({"decode_only"} if name in ("n", "prompt list") else {"decode"}), case


def test_the_context_length_is_respected_as_colocated_respects_it(deployments):
    pd, co = deployments
    # No max_tokens and one token of room: colocated gives that token ("length"); so does the prefill alone.
    got, took = _same(pd, co, "/v1/completions", {"prompt": _prompt(2047, seed=9)})
    assert took == {"prefill_only"} and got["usage"]["completion_tokens"] == 1
    # max_tokens beyond the context: vLLM 0.32 stops at the context's end ("length"); so does P/D.
    for stream in (False, True):
        got, took = _same(pd, co, "/v1/completions", {"prompt": _prompt(2000, seed=10), "max_tokens": 100,
                                                      "stream": stream})
        assert took == {"prefill"} and got["usage"]["completion_tokens"] == 48


def _record(url: str, pd_id: str) -> dict:
    deadline = time.monotonic() + 10
    while True:
        r = requests.get(f"{url}/pd/transfers/{pd_id}", timeout=10)
        if r.status_code == 200 and r.json().get("done"):
            return r.json()
        assert time.monotonic() < deadline, f"no finished transfer record for {pd_id}: {r.text}"
        time.sleep(0.1)


@pytest.mark.parametrize("flow", ["early", "after"])
def test_the_decode_loads_kv_already_published_within_its_first_step(flows, flow):
    """After the prefill (the second proxy), the decode's request goes out once the prefill has
    answered, so its KV is usually all in the shm pool by then; the early decode's request waits
    in vLLM's queue until it is (``connector.sync_wait_s``). Either way the decode loads it in the
    engine step that admits the request (``connector.sync_load: ready``: no WAIT, no step to
    report it), and the answer is colocated's. Each record says which way it was loaded; at least
    one of four was in-step."""
    proxies, co = flows
    pd = proxies[flow]
    sync = []
    for i in range(4):
        body = {"model": MODEL, "prompt": _prompt(700, seed=60 + 10 * (flow == "after") + i), "max_tokens": 8,
                "temperature": 0}  # prompts of its own: no prefix-cache hit from the other flow's
        ref = requests.post(co.url + "/v1/completions", json=body, timeout=600)
        got = requests.post(pd.url + "/v1/completions", json=body, timeout=600)
        assert got.status_code == ref.status_code == 200
        assert got.json()["choices"][0]["text"] == ref.json()["choices"][0]["text"]
        rec = _record(pd.url, got.headers["x-pd-id"])
        assert rec["ok"] and rec["n_chunks"] == 3, rec
        names = {e["name"] for e in rec["timeline"]}
        assert ("wait_first" in names) != rec["sync_load"], rec  # an in-step load never WAITs
        sync.append(rec["sync_load"])
    assert all(sync) if flow == "early" else any(sync), sync  # the early decode waits for all of it


def test_the_early_decode_is_handed_token_1_and_answers_as_colocated(flows):
    """The prefill's scheduler hands its token 1 to the early decode (issue 16): the decode's scheduler
    appends it to the prompt and its first step yields token 2. The proxy uses that answer unless
    token 1's text is not at a character boundary (``pd.proxy.early.handoff_allowed``; the decode
    after the prefill answers then); the coordinator counts each FIRST, and every answer is colocated's."""
    proxies, co = flows
    pd = proxies["handoff"]
    handed, firsts = _early(pd.url, "handed"), _coordinator_counter(pd.url, "firsts")
    # Seeds of their own: test_pd_e2e.py's prompts are _prompt(n, seed=n), and a prompt that starts
    # like one of them (same seed) leaves its first blocks in the decode's prefix cache.
    for i in range(4):
        for stream in (False, True):
            got, took = _same(pd, co, "/v1/completions", {"prompt": _prompt(500, seed=7300 + i), "max_tokens": 10,
                                                          "return_token_ids": True, "stream": stream})
            assert took == {"prefill"} and got["usage"]["completion_tokens"] == 10
    assert _coordinator_counter(pd.url, "firsts") == firsts + 8  # one offer a request
    assert _early(pd.url, "handed") >= handed + 6, "token 1 was handed to fewer than 6 of 8 early decodes"


@pytest.mark.parametrize("flow,seed,stream", [("early", 9001, False), ("after", 9031, True), ("handoff", 9115, True),
                                              ("handoff", 9119, False)])
def test_token_1_that_is_part_of_a_character_is_computed_by_the_decode_and_the_answer_is_colocateds(
        flows, flow, seed, stream):
    """Prompts (found by probing this model greedily) whose token 1 is part of a character: vLLM's
    text for it is empty, and colocated's answer starts with U+FFFD. A decode request for prompt +
    token 1 would answer with the prompt's text first (vLLM primes its detokenizer with ids that end
    inside a character); the proxy gives the client's request to the decode instead (path "decode",
    why "token 1 without text"), and the answer is colocated's in every flow."""
    proxies, co = flows
    pd = proxies[flow]
    before = _paths(pd.url)
    got, took = _same(pd, co, "/v1/completions", {"prompt": _prompt(96, seed=seed), "max_tokens": 6,
                                                  "return_token_ids": True, "stream": stream})
    assert took == {"decode"} and _paths(pd.url).get(("decode", "token 1 without text"), 0) == \
        before.get(("decode", "token 1 without text"), 0) + 1
    assert got["choices"][0]["text"].startswith("\ufffd") and got["usage"]["completion_tokens"] == 6


def _coordinator_counter(url: str, name: str) -> float:
    m = re.search(r'^pdkv_coordinator_%s(?:_total)? (\S+)$' % name, requests.get(url + "/metrics", timeout=10).text,
                  re.M)
    assert m, f"no coordinator counter {name} in the proxy's /metrics"
    return float(m.group(1))
