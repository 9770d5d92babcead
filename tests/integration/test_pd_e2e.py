"""End to end: 1P1D through the launcher and proxy vs a colocated instance, token for token."""
from __future__ import annotations

import json
import os
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import STEP_TOKENS

pytestmark = pytest.mark.integration

CHUNK = 256
MAX_LEN = 2048
GEN = 12
# Shorter than a block, block edges, exactly one chunk, many chunks with a partial last one,
# and close to the model's max length (MAX_LEN - GEN).
LENGTHS = [3, 9, 15, 16, 17, 33, 100, 255, 256, 257, 300, 511, 512, 513, 640, 767, 768, 1000, 1300,
           1700, 2000, MAX_LEN - GEN]


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(16, 4000) for _ in range(n)]


def _complete(url: str, prompt, stream=False, **extra) -> tuple[list[int], str, str]:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": GEN, "temperature": 0,
            "return_token_ids": True, "stream": stream, **extra}
    r = requests.post(f"{url}/v1/completions", json=body, timeout=600, stream=stream)
    assert r.status_code == 200, r.text
    pd_id = r.headers.get("x-pd-id", "")
    if not stream:
        choice = r.json()["choices"][0]
        return choice.get("token_ids") or [], choice["text"], pd_id
    text, ids = "", []
    for line in r.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        choice = json.loads(line[6:])["choices"][0]
        text += choice.get("text", "")
        ids += choice.get("token_ids") or []
    return ids, text, pd_id


def _chat(url: str, content: str, stream=False) -> tuple[str, str]:
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": content}],
            "max_tokens": GEN, "temperature": 0, "stream": stream}
    r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=600, stream=stream)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["choices"][0]["message"]["content"], r.headers.get("x-pd-id", "")
    text = ""
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    return text, r.headers.get("x-pd-id", "")


def _transfer(url: str, pd_id: str, wait_s: float = 10, prefill_answered: bool = False) -> dict:
    """The finished record (with ``prefill_answered``: once the proxy also has the prefill's answer,
    which may come in after the decode's). A transfer the decode did not need (its prefix cache
    held all the prompt but the token it computes itself: a repeated prompt) ends aborted."""
    deadline = time.monotonic() + wait_s
    while True:
        r = requests.get(f"{url}/pd/transfers/{pd_id}", timeout=10)
        unneeded = r.status_code == 200 and "decode had the KV in its prefix cache" in (r.json().get("error") or "")
        if r.status_code == 200 and (r.json().get("done") or unneeded) and (not prefill_answered or any(
                e["name"] == "prefill_answered" for e in r.json()["timeline"])):
            return r.json()
        if time.monotonic() > deadline:
            raise AssertionError(f"no finished transfer record for {pd_id}: {r.status_code} {r.text}")
        time.sleep(0.2)


PROXY_EVENTS = {"received", "prefill_sent", "decode_sent", "prefill_answered", "decode_first_byte", "last_token"}
SPANS = {"dispatch", "prefill", "decode_first_token", "stream", "total", "ready_first_to_final", "tail",
         "transfer", "load", "wait_for_ready", "gather", "put", "get", "store", "scatter"}


def _check_timeline(rec: dict) -> None:
    """A real request's /pd/transfers timeline: every event of every process, spans that add up."""
    events = rec["timeline"]
    assert [e["t_ms"] for e in events] == sorted(e["t_ms"] for e in events)
    names = {(e["source"], e["name"]) for e in events}
    assert {("proxy", n) for n in PROXY_EVENTS} <= names, names
    # a load within the decode's first step (connector.sync_load) has no WAIT
    waited = () if rec["sync_load"] else ("wait_first",)
    assert {("coordinator", n) for n in ("ready_final", "done", *waited)} <= names, names
    saved = [e for e in events if e["name"] == "part_saved"]
    loaded = [e for e in events if e["name"] == "part_loaded"]
    assert {e["source"] for e in saved} == {"prefill 0"} and {e["source"] for e in loaded} == {"decode 0"}
    if not rec["events_dropped"]:
        assert len(saved) == rec["n_ready_parts"]
        assert sum(e["chunks"] for e in saved) == sum(e["chunks"] for e in loaded) == rec["n_chunks"]
    proxy = {e["name"]: e["t_ms"] for e in events if e["source"] == "proxy"}
    order = ["received", "decode_sent", "decode_first_byte", "last_token"]
    assert [proxy[n] for n in order] == sorted(proxy[n] for n in order)
    s = rec["spans"]
    assert SPANS <= set(s), s
    assert s["dispatch"] + s["decode_first_token"] + s["stream"] == pytest.approx(s["total"], abs=0.01)
    assert s["ready_first_to_final"] + s["tail"] == pytest.approx(s["transfer"], abs=0.01)
    assert s["load"] == pytest.approx(rec["load_ms"], abs=0.001) and s["gather"] > 0 and s["scatter"] > 0
    assert set(rec["cross_spans"]) == {"decode_sent_to_loaded", "done_to_first_token", *(
        () if rec["sync_load"] else ("decode_sent_to_wait",))}


def test_completions_match_colocated_and_kv_was_loaded(deployments):
    pd, co = deployments
    cases = [(n, _prompt(n, seed=n), i % 2 == 1) for i, n in enumerate(LENGTHS)]

    def run(case):
        n, prompt, stream = case
        return _complete(co.url, prompt, stream), _complete(pd.url, prompt, stream)

    with ThreadPoolExecutor(10) as ex:  # at least 8 requests in flight at once
        results = list(ex.map(run, cases))
    for (n, _, stream), ((ref_ids, ref_text, _), (ids, text, pd_id)) in zip(cases, results):
        assert ref_ids, "the server did not return token ids"
        assert ids == ref_ids, f"prompt of {n} tokens (stream={stream}): {ids} != {ref_ids}"
        assert text == ref_text
        rec = _transfer(pd.url, pd_id, prefill_answered=True)
        assert rec["ok"], f"prompt of {n} tokens: load failed: {rec}"
        assert rec["n_chunks"] == -(-n // CHUNK), (n, rec)
        assert rec["n_bytes"] > 0
        if n > STEP_TOKENS + CHUNK:  # prefilled over several steps: chunks went out before the end
            assert rec["n_ready_parts"] >= 2, (n, rec)
        _check_timeline(rec)


def test_outputs_depend_on_the_prompt(deployments):
    """Guards the check above: equal outputs must not come from a model that ignores its KV."""
    pd, _ = deployments
    outs = {tuple(_complete(pd.url, _prompt(300, seed=s))[0]) for s in range(4)}
    assert len(outs) == 4


@pytest.mark.parametrize("stream", [False, True])
def test_chat_matches_colocated(deployments, stream):
    pd, co = deployments
    texts = ["hello there", "def add(a, b):\n    return a + b\n" * 20,
             "The quick brown fox jumps over the lazy dog. " * 40]
    for content in texts:
        ref, _ = _chat(co.url, content, stream)
        got, pd_id = _chat(pd.url, content, stream)
        assert got == ref, content[:40]
        assert _transfer(pd.url, pd_id)["ok"]


def test_corrupt_chunk_is_recomputed_and_counted(deployments):
    """Break a chunk between prefill and decode: the output is still right, the error counted."""
    pd, co = deployments
    prompt = _prompt(700, seed=99)
    pd_id = f"corrupt-{uuid.uuid4().hex}"
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 1, "temperature": 0}
    r = requests.post(f"{pd.instance_url('prefill')}/v1/completions", timeout=600,
                      json={**body, "kv_transfer_params": {"pd_id": pd_id, "do_remote_decode": True}})
    assert r.status_code == 200, r.text
    files = []
    deadline = time.monotonic() + 30
    while len(files) < 3 and time.monotonic() < deadline:  # 700 tokens = 3 chunks
        files = sorted(p for p in pd.pool_dir.iterdir() if pd_id in p.name and not p.name.startswith("."))
        time.sleep(0.1)
    assert len(files) == 3, [p.name for p in pd.pool_dir.iterdir()]
    # A middle chunk: chunk 0 stays valid, 1 and 2 are recomputed. Its index link names the
    # producer's arena and the slot (64-byte slot header, then the chunk).
    arena, off, length, _seq = os.readlink(files[1]).rsplit(":", 3)
    with open(pd.pool_dir / arena, "r+b") as f:
        f.seek(int(off) + 64 + int(length) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))

    before = requests.get(f"{pd.url}/metrics", timeout=10).text
    ids, _, _ = _complete(pd.instance_url("decode"), prompt,
                          kv_transfer_params={"pd_id": pd_id, "do_remote_prefill": True})
    ref_ids, _, _ = _complete(co.url, prompt)
    assert ids == ref_ids
    rec = _transfer(pd.url, pd_id)
    assert not rec["ok"] and "checksum" in rec["error"], rec
    assert rec["n_chunks"] == 1  # the valid first chunk was still used
    after = requests.get(f"{pd.url}/metrics", timeout=10).text
    assert _metric(after, "pdkv_coordinator_done_failed") == _metric(before, "pdkv_coordinator_done_failed") + 1


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exported")


def test_pool_is_drained_after_consumption(deployments):
    """Consumed chunks are deleted by decode, failed ones freed through the coordinator."""
    pd, _ = deployments
    _complete(pd.url, _prompt(600, seed=5))
    deadline = time.monotonic() + 10
    left = ["?"]
    while left and time.monotonic() < deadline:
        # Index links of chunks not yet read (the producer's arena, a dot file, stays).
        left = [p.name for p in pd.pool_dir.iterdir() if not p.name.startswith(".")] if pd.pool_dir.exists() else []
        time.sleep(0.2)
    assert not left, left


def _vllm_metric(url: str, name: str, label: str = "") -> float:
    total = 0.0
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and label in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_decode_took_the_prompt_from_the_transfer_not_from_compute(deployments):
    """vLLM's own counters on the decode instance: prompt tokens came from the external KV, all
    but one computed there: the prompt's last (the early decode, whose prompt is the client's) or
    token 1 (a decode half after the prefill, whose prompt is the client's plus token 1)."""
    pd, _ = deployments
    dec = pd.instance_url("decode")
    name, src = "vllm:prompt_tokens_by_source_total", 'source="external_kv_transfer"'
    ext0 = _vllm_metric(dec, name, src)
    comp0 = _vllm_metric(dec, name, 'source="local_compute"')
    n = 900
    _complete(pd.url, _prompt(n, seed=1234))
    ext, comp = _vllm_metric(dec, name, src) - ext0, _vllm_metric(dec, name, 'source="local_compute"') - comp0
    assert (ext, comp) in ((n - 1, 1), (n, 1)), (ext, comp)


def test_client_disconnect_aborts_both_halves(deployments):
    pd, _ = deployments
    dec = pd.instance_url("decode")
    aborts0 = _metric(requests.get(f"{pd.url}/metrics", timeout=10).text, "pdkv_coordinator_aborts")
    body = {"model": "tiny-llama", "prompt": _prompt(400, seed=77), "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True, "stream": True}
    r = requests.post(f"{pd.url}/v1/completions", json=body, stream=True, timeout=60)
    pd_id = r.headers.get("x-pd-id", "?")
    lines = r.iter_lines()
    assert next(line for line in lines if line.startswith(b"data: "))
    r.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    running = None
    while time.monotonic() < deadline:
        running = _vllm_metric(dec, "vllm:num_requests_running")
        aborts = _metric(requests.get(f"{pd.url}/metrics", timeout=10).text, "pdkv_coordinator_aborts")
        if running == 0 and aborts > aborts0:
            break
        time.sleep(0.3)
    seen = [line for name in ("proxy.log", "coordinator.log") if (pd.run_dir / name).exists()
            for line in (pd.run_dir / name).read_text(errors="replace").splitlines() if pd_id in line]
    assert running == 0, f"decode kept generating for a client that went away; logs: {seen}"
    assert aborts > aborts0, f"no ABORT reached the coordinator for pd_id {pd_id}; logs: {seen}"


def test_decode_keeps_serving_while_a_load_waits(deployments):
    """A decode request whose KV has not arrived does not block other requests on that instance."""
    pd, co = deployments
    prompt = _prompt(500, seed=4242)
    pd_id = f"late-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(1) as ex:
        waiting = ex.submit(_complete, pd.instance_url("decode"), prompt,
                            kv_transfer_params={"pd_id": pd_id, "do_remote_prefill": True})
        time.sleep(1)
        t0 = time.monotonic()
        other, _, _ = _complete(pd.url, _prompt(300, seed=4243))  # a whole P/D request meanwhile
        assert time.monotonic() - t0 < 60
        assert not waiting.done(), "the waiting request should still be waiting for its KV"
        r = requests.post(f"{pd.instance_url('prefill')}/v1/completions", timeout=600, json={
            "model": "tiny-llama", "prompt": prompt, "max_tokens": 1, "temperature": 0,
            "kv_transfer_params": {"pd_id": pd_id, "do_remote_decode": True}})
        assert r.status_code == 200
        ids, _, _ = waiting.result(timeout=120)
    assert ids == _complete(co.url, prompt)[0]
    rec = _transfer(pd.url, pd_id)
    assert rec["ok"] and rec["n_chunks"] == 2


def test_bench_serve_load_generator_on_both_deployments(deployments):
    """`pd bench serve`'s load generator through both proxies: every request answers, the
    per-request figures exist, and P/D answers as colocated does."""
    from launch.bench.serve import make_workload, run_load, summarize

    pd, co = deployments
    work = make_workload(6, 4.0, 0.34, 600, 64, 12, seed=11)
    texts = []
    for dep in (pd, co):
        results, wall = run_load(dep.url, "tiny-llama", work)
        assert all(r.ok for r in results), [r.error for r in results]
        s = summarize(results, wall, 60.0, 10.0)
        assert s["failed"] == 0 and s["slo_met"] == 6 and s["ttft_long_p50"] is not None
        # vLLM may merge a busy stream's tokens into fewer events; some must come apart.
        assert all(r.token_times for r in results) and any(r.tpot is not None for r in results)
        texts.append([r.text for r in results])
    assert texts[0] == texts[1]
