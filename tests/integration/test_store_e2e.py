"""Decode fallback to the persistent store (store/local) with real vLLM instances."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from tests.integration.conftest import BASE, Launched, start, wait_ready
from tests.integration.test_pd_e2e import _complete, _prompt, _transfer, _vllm_metric

pytestmark = pytest.mark.integration


BUDGET_GB = 0.03  # shm_store's store: small, so that eviction is exercised


@pytest.fixture(scope="module")
def store_deployments(model_path, tmp_path_factory, deployments):
    """(shm transport + local store) and (no transport, store only), beside the main ones.

    Yields {name: (Launched, store_dir)}; ``restart(name)`` stops one and starts it again.
    """
    tmp = tmp_path_factory.mktemp("store")
    cfgs = {}
    for name, transport, base, size in (("shm_store", "shm", 18700, BUDGET_GB), ("store_only", "none", 18800, 1)):
        store_dir = tmp / f"kv-{name}"
        store_dir.mkdir()
        cfg = {**yaml.safe_load(yaml.safe_dump(BASE)), "model": str(model_path), "mode": "pd",
               "prefill": {"count": 1, "port_base": base}, "decode": {"count": 1, "port_base": base + 50},
               "proxy": {"port": base + 90}, "coordinator": {"port": base + 91}}
        cfg["connector"]["transport"] = {"kind": transport, "name": f"{name}{time.time_ns()}"}
        cfg["connector"]["store"] = {"backend": "local", "paths": [f"file://{store_dir}"], "size_gb": size}
        cfg["vllm"]["cpu_bind"] = "0;1"
        cfgs[name] = (cfg, store_dir)
    procs = {name: start(cfg, tmp, name) for name, (cfg, _) in cfgs.items()}
    current: dict = {}
    codes = []

    def restart(name: str) -> Launched:
        codes.append(current.pop(name)[0].stop())
        cfg = cfgs[name][0]
        proc, log = start(cfg, tmp, name + "-again")
        try:
            current[name] = (wait_ready(proc, log, cfg), cfgs[name][1])
        except BaseException:
            proc.kill()
            raise
        return current[name][0]

    try:
        for name, (proc, log) in procs.items():
            current[name] = (wait_ready(proc, log, cfgs[name][0]), cfgs[name][1])
        current["restart"] = restart
        yield current
    finally:
        current.pop("restart", None)
        codes += [dep.stop() for dep, _ in current.values()]
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
        assert all(c == 0 for c in codes), codes


def _prefill_only(dep: Launched, prompt: list[int], pd_id: str) -> None:
    r = requests.post(f"{dep.instance_url('prefill')}/v1/completions", timeout=600, json={
        "model": "tiny-llama", "prompt": prompt, "max_tokens": 1, "temperature": 0,
        "kv_transfer_params": {"pd_id": pd_id, "do_remote_decode": True}})
    assert r.status_code == 200, r.text


def _decode_only(dep: Launched, prompt: list[int], pd_id: str):
    return _complete(dep.instance_url("decode"), prompt,
                     kv_transfer_params={"pd_id": pd_id, "do_remote_prefill": True})[0]


def _wait_files(directory: Path, pattern: str, n: int, timeout: float = 30) -> list[Path]:
    deadline = time.monotonic() + timeout
    files: list[Path] = []
    while time.monotonic() < deadline:
        files = [p for p in directory.rglob(pattern) if p.is_file() and not p.name.startswith(".")]
        if len(files) >= n:
            return files
        time.sleep(0.1)
    return files


def test_transport_evicted_decode_loads_from_store(store_deployments, deployments):
    dep, store_dir = store_deployments["shm_store"]
    _, co = deployments
    prompt = _prompt(800, seed=501)  # 4 chunks
    pd_id = f"evicted-{uuid.uuid4().hex}"
    _prefill_only(dep, prompt, pd_id)
    shm = _wait_files(dep.pool_dir, f"*{pd_id}*", 4)
    assert len(shm) == 4
    assert len(_wait_files(store_dir, "*.kv", 4)) >= 4
    for p in shm:  # the transport lost them (evicted, restarted)
        p.unlink()
    assert _decode_only(dep, prompt, pd_id) == _complete(co.url, prompt)[0]
    rec = _transfer(dep.url, pd_id)
    assert rec["ok"] and rec["n_chunks"] == 4 and rec["n_store_chunks"] == 4, rec


def test_transport_and_store_both_miss_recompute(store_deployments, deployments):
    dep, store_dir = store_deployments["shm_store"]
    _, co = deployments
    prompt = _prompt(600, seed=502)
    pd_id = f"bothmiss-{uuid.uuid4().hex}"
    before = {p for p in store_dir.rglob("*.kv")}
    _prefill_only(dep, prompt, pd_id)
    shm = _wait_files(dep.pool_dir, f"*{pd_id}*", 3)
    deadline = time.monotonic() + 30
    while len(set(store_dir.rglob("*.kv")) - before) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    new = set(store_dir.rglob("*.kv")) - before
    assert len(shm) == 3 and len(new) == 3
    for p in [*shm, *new]:
        p.unlink()
    assert _decode_only(dep, prompt, pd_id) == _complete(co.url, prompt)[0]
    rec = _transfer(dep.url, pd_id)
    assert not rec["ok"] and "not in the store" in rec["error"], rec


def test_pd_through_the_store_alone(store_deployments, deployments):
    dep, _ = store_deployments["store_only"]
    _, co = deployments
    for n, seed in ((40, 503), (700, 504)):
        ids, _, pd_id = _complete(dep.url, _prompt(n, seed))
        assert ids == _complete(co.url, _prompt(n, seed))[0]
        rec = _transfer(dep.url, pd_id)
        chunks = -(-n // 256)
        assert rec["ok"] and rec["n_chunks"] == chunks and rec["n_store_chunks"] == chunks, rec


def test_restarted_instance_loads_a_repeated_prompt_from_the_store(store_deployments, deployments):
    """Prefix reuse across a restart: vLLM's own cache is gone, pdkv's store is not."""
    dep, _ = store_deployments["store_only"]
    _, co = deployments
    context = _prompt(1000, seed=505)
    ids, _, _ = _complete(dep.url, context)
    ref = _complete(co.url, context)[0]
    assert ids == ref
    dep = store_deployments["restart"]("store_only")
    pre = dep.instance_url("prefill")
    name, src = "vllm:prompt_tokens_by_source_total", 'source="external_kv_transfer"'
    # A follow-up sharing the context's 3 full chunks: loaded from the store, the rest computed.
    follow_up = context[:768] + _prompt(300, seed=506)
    ids, _, pd_id = _complete(dep.url, follow_up)
    assert ids == _complete(co.url, follow_up)[0]
    assert _vllm_metric(pre, name, src) == 768
    assert _transfer(dep.url, pd_id)["ok"]
    # The context itself: 768 tokens now in vLLM's own cache, the other 232 from the store.
    ids, _, _ = _complete(dep.url, context)
    assert ids == ref
    assert _vllm_metric(pre, name, src) == 768 + 232


def test_store_stays_within_its_budget_and_never_serves_bad_kv(store_deployments, deployments):
    dep, store_dir = store_deployments["shm_store"]
    _, co = deployments
    prompts = [_prompt(1800, seed=600 + i) for i in range(10)]  # ~8 MB of chunks each, 30 MB budget
    for p in prompts:
        assert _complete(dep.url, p)[0] == _complete(co.url, p)[0]
    time.sleep(1)
    used = sum(f.stat().st_size for f in store_dir.rglob("*.kv"))
    assert 0 < used <= BUDGET_GB * 1e9, used
    # The first prompts' chunks were evicted from the store; their repeats are still right.
    for p in prompts[:2]:
        assert _complete(dep.url, p)[0] == _complete(co.url, p)[0]
