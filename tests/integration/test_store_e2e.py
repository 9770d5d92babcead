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


@pytest.fixture(scope="module")
def store_deployments(model_path, tmp_path_factory, deployments):
    """(shm transport + local store) and (no transport, store only), beside the main ones."""
    tmp = tmp_path_factory.mktemp("store")
    cfgs = {}
    store_dir = tmp / "kv"  # shared: chunks one prefill stored are found by the other
    store_dir.mkdir()
    for name, transport, base in (("shm_store", "shm", 18700), ("store_only", "none", 18800)):
        cfg = {**yaml.safe_load(yaml.safe_dump(BASE)), "model": str(model_path), "mode": "pd",
               "prefill": {"count": 1, "port_base": base}, "decode": {"count": 1, "port_base": base + 50},
               "proxy": {"port": base + 90}, "coordinator": {"port": base + 91}}
        cfg["connector"]["transport"] = {"kind": transport, "name": f"{name}{time.time_ns()}"}
        cfg["connector"]["store"] = {"backend": "local", "paths": [f"file://{store_dir}"], "size_gb": 1}
        cfg["vllm"]["cpu_bind"] = "0;1"
        cfgs[name] = (cfg, store_dir)
    procs = [start(cfg, tmp, name) + (cfg,) for name, (cfg, _) in cfgs.items()]
    started: list[Launched] = []
    try:
        for proc, log, cfg in procs:
            started.append(wait_ready(proc, log, cfg))
        yield {name: (dep, cfgs[name][1]) for name, dep in zip(cfgs, started)}
    finally:
        codes = [d.stop() for d in started]
        for proc, _, _ in procs:
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


def test_prefix_stored_by_one_prefill_is_loaded_by_another(store_deployments, deployments):
    """Prefix reuse: a long context seen before is loaded from the store, only the rest computed."""
    first, _ = store_deployments["store_only"]
    second, _ = store_deployments["shm_store"]
    _, co = deployments
    context = _prompt(1000, seed=505)  # 3 full chunks + a partial one, stored by `first`
    ids, _, _ = _complete(first.url, context)
    assert ids == _complete(co.url, context)[0]
    follow_up = context[:768] + _prompt(300, seed=506)  # shares the 3 full chunks
    pre = second.instance_url("prefill")
    name, src = "vllm:prompt_tokens_by_source_total", 'source="external_kv_transfer"'
    before = _vllm_metric(pre, name, src)
    ids, _, pd_id = _complete(second.url, follow_up)
    assert ids == _complete(co.url, follow_up)[0]
    assert _vllm_metric(pre, name, src) - before == 768  # loaded on the prefill instance, not computed
    assert _transfer(second.url, pd_id)["ok"]
