"""The fault matrix (docs/reliability.md, "Fault matrix"): each case breaks one part of a running
1P1D deployment (real vLLM CPU instances, coordinator, proxy, shm transport, local store) while
several requests are in flight, then checks that every request was answered as colocated vLLM
answers or failed with a clear error in bounded time, that the event was counted, and that nothing
was left behind (transport keys, coordinator entries, vLLM KV blocks, store temp files).

The cases share one deployment and run in file order; a case that kills a process restarts it.
"""
from __future__ import annotations

import asyncio
import random
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import pytest

from tests.integration.conftest import STEP_TOKENS, pd_config
from tests.integration.faults import (
    BOUND_S,
    STORE_GB,
    TTL_S,
    WAIT_S,
    Matrix,
    counted,
    prompt,
    start_matrix,
)
from tests.integration.faults import delta as _delta

pytestmark = pytest.mark.integration

PORT_BASE = 17300
LONG = (1100, 1500, 1900)  # prefilled over several steps: chunks stream out while the rest computes


@pytest.fixture(scope="module")
def matrix(model_path, tmp_path_factory, deployments):
    _, co = deployments

    def cfg_fn(store_dir):
        store = {"backend": "local", "paths": [f"file://{store_dir}"], "size_gb": STORE_GB}
        cfg = pd_config(model_path, "faults", PORT_BASE, "shm", store)
        cfg["connector"]["wait_timeout_s"] = WAIT_S
        cfg["coordinator"]["entry_ttl_s"] = TTL_S
        cfg["proxy"]["upstream_timeout_s"] = BOUND_S - 10
        cfg["vllm"]["extra_args"] = ["--max-num-batched-tokens", str(STEP_TOKENS)]  # as the reference
        return cfg

    m, stop = start_matrix(model_path, tmp_path_factory.mktemp("faults"), co.url, cfg_fn)
    try:
        yield m
    finally:
        left = stop()
        assert not left, f"the shm pool was not removed at a clean stop: {left}"


def _counted(m: Matrix, name: str, before: dict, at_least: float = 1, timeout_s: float = 10) -> bool:
    return counted(m.url, name, before, at_least, timeout_s)


def _run_with_fault(m: Matrix, work, fault, threads: int = 8, **extra):
    """Send ``work`` (several requests in flight), call ``fault()`` meanwhile; the outcomes."""
    with ThreadPoolExecutor(threads) as ex:
        futures = m.start_load(work, ex, **extra)
        fault()
        return [f.result() for f in futures]


@pytest.mark.parametrize("flow", ["old", "first_token"])
def test_prefill_stalled_past_the_wait_timeout_ready_comes_late(matrix, flow):
    """Prefill stopped (SIGSTOP) longer than decode waits. Old flow (a seeded request: decode is
    sent with the prefill): decode recomputes, the late READY is freed. First-token path: decode
    is sent only once the prefill answered, so the stall only delays the answers."""
    m = matrix
    work = m.workload(4, seed=11, lengths=(300, 700))
    before = m.metrics()
    outs = _run_with_fault(m, work, lambda: (m.signal("prefill-0", signal.SIGSTOP), time.sleep(WAIT_S + 3),
                                             m.signal("prefill-0", signal.SIGCONT)),
                           **({"seed": 0} if flow == "old" else {}))
    answered, _ = m.check_outcomes(work, outs)
    assert answered == len(work), [o for o in outs if not o.ok]
    m.assert_idle()
    after = m.metrics()
    if flow == "old":
        assert _delta(before, after, "pdkv_coordinator_done_failed") >= len(work)
        assert _delta(before, after, "pdkv_coordinator_freed_keys") >= 1  # the late READYs' chunks
    else:
        assert _delta(before, after, "pdkv_coordinator_done_failed") == 0
        assert _delta(before, after, "pdkv_coordinator_done_ok") >= len(work)
    m.healthy_round(seed=12)


def test_decode_stalled_past_the_entry_ttl(matrix):
    """Decode stopped (SIGSTOP) while prefill publishes, longer than READY entries live: the
    coordinator frees the chunks; decode, back, waits, then loads from the store or recomputes."""
    m = matrix
    work = m.workload(6, seed=21, lengths=LONG)
    for tokens, _ in work:
        m.reference(tokens)
    before = m.metrics()
    m.signal("decode-0", signal.SIGSTOP)
    try:
        # SIGCONT from the fault, while the clients wait: no answer can come before it.
        outs = _run_with_fault(m, work, lambda: (time.sleep(TTL_S + 3), m.signal("decode-0", signal.SIGCONT)))
    finally:
        m.signal("decode-0", signal.SIGCONT)
    # Requests the proxy sent to the stopped decode on kept-alive connections are reset when it
    # wakes up (up to 4 of the 6 per run): a clear 502 naming decode, never a wrong answer.
    m.check_outcomes(work, outs)
    assert all(m.instance_url("decode") in o.error for o in outs if not o.ok), [o.error for o in outs if not o.ok]
    m.assert_idle()
    after = m.metrics()
    assert _delta(before, after, "pdkv_coordinator_expired") >= 1
    assert _delta(before, after, "pdkv_coordinator_freed_keys") >= 1
    m.healthy_round(seed=22)


async def _storm(url: str, n: int, seed: int) -> int:
    """``n`` streamed requests, each closed by its client after a random 0-3 s; how many got an answer."""
    rng = random.Random(seed)
    began = 0

    async def one(i: int) -> None:
        nonlocal began
        body = {"model": "tiny-llama", "prompt": prompt(rng.choice((40, 300, 700)), seed * 1000 + i),
                "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
        try:
            async with asyncio.timeout(rng.uniform(0, 3)):
                async with session.post(f"{url}/v1/completions", json=body) as r:
                    began += r.status == 200
                    async for _ in r.content:
                        pass
        except TimeoutError:
            pass

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(one(i) for i in range(n)))
    return began


def test_abort_storm_and_clients_gone_mid_stream(matrix):
    m = matrix
    before = m.metrics()
    began = asyncio.run(_storm(m.url, 200, seed=31))
    m.assert_idle(timeout_s=120)
    after = m.metrics()
    statuses = {k: _delta(before, after, k) for k in after if k.startswith("pdkv_proxy_requests_total")}
    gone = statuses.get('pdkv_proxy_requests_total{endpoint="/v1/completions",status="499"}', 0)
    # Every client went away before its 400 tokens: those whose answer had begun, at least, were
    # seen going (a client gone before the proxy read its request never reached a handler).
    assert gone >= max(began, 100), (began, statuses)
    # Each gone client's transfer is aborted, after the proxy's grace (Relay.abort_grace_s, 2 s; 10 s
    # more for an early decode that had not loaded): the case can be idle before the last ones come.
    deadline = time.monotonic() + 30
    while _delta(before, after, "pdkv_coordinator_aborts") < gone and time.monotonic() < deadline:
        time.sleep(0.5)
        after = m.metrics()
    assert _delta(before, after, "pdkv_coordinator_aborts") >= gone
    m.healthy_round(seed=32)


def test_store_disk_full_then_its_directory_removed(matrix):
    m = matrix
    if not m.mounted:
        pytest.skip("no tmpfs for the store (mounting needs root)")
    filler = m.store_dir / "filler.kv"  # named like a store file, so the leftover check ignores it
    before = m.metrics()
    try:
        with open(filler, "wb") as f:  # fill the disk
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        work = m.workload(6, seed=41, lengths=LONG)
        outs = _run_with_fault(m, work, lambda: None)
        assert m.check_outcomes(work, outs)[0] == len(work), [o for o in outs if not o.ok]  # via the transport
        m.assert_idle()
        assert _counted(m, "pdkv_coordinator_prefill_store_write_errors", before), "the full disk was not counted"
    finally:
        filler.unlink(missing_ok=True)
    for d in [p for p in m.store_dir.iterdir() if p.is_dir()]:  # the store's directories, under it
        shutil.rmtree(d)
    work = m.workload(6, seed=42, lengths=LONG)
    outs = _run_with_fault(m, work, lambda: None)
    assert m.check_outcomes(work, outs)[0] == len(work), [o for o in outs if not o.ok]
    m.assert_idle()
    assert any(p.suffix == ".kv" for p in m.store_dir.rglob("*")), "the store does not write again"


def test_coordinator_killed_and_restarted(matrix):
    m = matrix
    work = m.workload(8, seed=51, lengths=LONG)

    def fault():
        assert m.wait_for_links(1), "no chunk reached the transport"
        m.signal("coordinator", signal.SIGKILL)
        time.sleep(2)
        m.dep.respawn("coordinator")

    outs = _run_with_fault(m, work, fault)
    answered, _ = m.check_outcomes(work, outs)
    assert answered == len(work), [o for o in outs if not o.ok]  # decode falls back to the store, then recomputes: never an error
    # The new coordinator knows both instances again (their heartbeats register them).
    deadline = time.monotonic() + 15
    while m.metrics().get("pdkv_coordinator_instances_alive", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert m.metrics()["pdkv_coordinator_instances_alive"] == 2
    m.healthy_round(seed=52)
    m.assert_idle()


@pytest.mark.parametrize("victim", ["decode-0", "prefill-0"])
def test_instance_killed_while_its_kv_moves(matrix, victim):
    """SIGKILL decode while it loads, or prefill while it gathers and puts chunks: the clients of
    the requests in flight get an error naming the instance (not a hang), the restarted instance
    serves again, nothing of the dead one stays in the pool."""
    m = matrix
    role = victim.split("-")[0]
    work = m.workload(8, seed=61 if role == "decode" else 71, lengths=LONG)
    before = m.metrics()

    def fault():
        assert m.wait_for_links(1), "no chunk reached the transport"
        m.signal(victim, signal.SIGKILL)

    outs = _run_with_fault(m, work, fault)
    _, failed = m.check_outcomes(work, outs)
    assert failed >= 1
    assert all(m.instance_url(role) in o.error for o in outs if not o.ok), [o.error for o in outs if not o.ok]
    after = m.metrics()
    assert _delta(before, after, f'pdkv_proxy_upstream_errors_total{{role="{role}"}}') >= failed
    m.dep.respawn(victim)
    m.healthy_round(seed=62 if role == "decode" else 72)
    m.assert_idle()
