"""Decode fallback and prefix reuse through the persistent store, with real vLLM instances.

store/local on a local directory; store/hf3fs on the USRBIO emulator (tests/doubles)."""
from __future__ import annotations

import os
import re
import socket
import time
import uuid
from pathlib import Path

import pytest
import requests

from launch.bench import vllm_bench
from store.config import StoreConfig
from store.dram import default_dir
from store.dram_arena import remove_arena
from store.tiered import dram_name
from tests.doubles import usrbio_emulator as emu

# this host's writer directories (<host>.w<k>, store/hf3fs.py)
W0, W1 = (re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) + f".w{k}" for k in (0, 1))
from tests.integration.conftest import ROOT, Launched, deployment_set, pd_config
from tests.integration.test_pd_e2e import _complete, _prompt, _transfer, _vllm_metric

pytestmark = pytest.mark.integration


BUDGET_GB = 0.03  # shm_store's store: small, so that eviction is exercised
DRAM_GB = 0.1  # store_only's DRAM tier
DOUBLES = ROOT / "tests" / "doubles"
STORE_ONLY = ["store_only", "hf3fs_only"]  # P/D through the store alone: store/local, store/hf3fs


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
        store = {"backend": "local", "paths": [f"file://{store_dir}"], "size_gb": size}
        if name == "store_only":  # with the DRAM tier: its hits are scattered in place
            store["dram_gb"] = DRAM_GB
        cfgs[name] = (pd_config(model_path, name, base, transport, store), store_dir)
    # store/hf3fs on the USRBIO emulator (a test double of hf3fs_fuse.io, not 3FS): every vLLM
    # process imports it as hf3fs_fuse.io from tests/doubles, exactly as it would import the client.
    mount = Path(emu.emulate_mount(str(tmp / "3fs")))
    store = {"backend": "hf3fs", "paths": [str(mount / "kv")], "size_gb": 1,
             "hf3fs": {"iov_size_mb": 100, "io_threads": 2}}
    cfgs["hf3fs_only"] = (pd_config(model_path, "hf3fs_only", 18600, "none", store), mount / "kv")
    try:
        yield from deployment_set(cfgs, tmp, env={"PYTHONPATH": str(DOUBLES)})
    finally:  # the DRAM tier outlives its processes by design (until the host reboots): not a test's
        remove_arena(os.path.join(default_dir(), f"{dram_name(StoreConfig(**cfgs['store_only'][0]['connector']['store']))}"
                                                 f"-{int(DRAM_GB * 1e9)}.dram"))


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
        files = [p for p in directory.rglob(pattern)  # shm index links, store files
                 if (p.is_symlink() or p.is_file()) and not p.name.startswith(".")]
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


@pytest.mark.parametrize("name", STORE_ONLY)
def test_pd_through_the_store_alone(store_deployments, deployments, name):
    dep, _ = store_deployments[name]
    _, co = deployments
    for n, seed in ((40, 503), (700, 504)):
        ids, _, pd_id = _complete(dep.url, _prompt(n, seed))
        assert ids == _complete(co.url, _prompt(n, seed))[0]
        rec = _transfer(dep.url, pd_id)
        chunks = -(-n // 256)
        assert rec["ok"] and rec["n_chunks"] == chunks and rec["n_store_chunks"] == chunks, rec
        if name == "store_only":  # every chunk went through the DRAM tier (write-through) and back in place
            assert _log_has(dep.run_dir, f"pd_id={pd_id}: loaded {chunks} chunks",
                            f"{chunks} chunks from the store, {chunks} of them in place from its DRAM tier")


@pytest.mark.parametrize("name", STORE_ONLY)
def test_restarted_instance_loads_a_repeated_prompt_from_the_store(store_deployments, deployments, name):
    """Prefix reuse across a restart: vLLM's own cache is gone, pdkv's store is not."""
    dep, _ = store_deployments[name]
    _, co = deployments
    context = _prompt(1000, seed=505)
    ids, _, _ = _complete(dep.url, context)
    ref = _complete(co.url, context)[0]
    assert ids == ref
    dep = store_deployments["restart"](name)
    pre = dep.instance_url("prefill")
    metric, src = "vllm:prompt_tokens_by_source_total", 'source="external_kv_transfer"'
    # A follow-up sharing the context's 3 full chunks: loaded from the store, the rest computed.
    follow_up = context[:768] + _prompt(300, seed=506)
    ids, _, pd_id = _complete(dep.url, follow_up)
    assert ids == _complete(co.url, follow_up)[0]
    assert _metric_reaches(pre, metric, src, 768)
    assert _transfer(dep.url, pd_id)["ok"]
    # The context itself: 768 tokens now in vLLM's own cache, the other 232 from the store.
    ids, _, _ = _complete(dep.url, context)
    assert ids == ref
    assert _metric_reaches(pre, metric, src, 768 + 232)


def _log_has(run_dir: Path, *parts: str, timeout: float = 10) -> bool:
    """Whether one line of the decode instances' logs holds every one of ``parts`` (polled: logs lag)."""
    deadline = time.monotonic() + timeout
    while True:
        for log in run_dir.rglob("decode-*.log"):
            if any(all(p in line for p in parts) for line in log.read_text(errors="replace").splitlines()):
                return True
        if time.monotonic() > deadline:
            raise AssertionError(f"no decode log line under {run_dir} has {parts}")
        time.sleep(0.2)


def _metric_reaches(url: str, name: str, label: str, value: float, timeout: float = 10) -> bool:
    """vLLM's API server can update its counters after the client has its answer (seen here: the
    store load logged, the counter still behind): poll, and never accept another value."""
    deadline = time.monotonic() + timeout
    while (got := _vllm_metric(url, name, label)) < value and time.monotonic() < deadline:
        time.sleep(0.2)
    assert got == value, f"{name}{{{label}}} = {got}, expected {value}"
    return True


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


def test_hf3fs_layout_is_a_few_big_files_shared_by_reader_processes(store_deployments):
    """The prefill worker owns one writer directory; decode and the schedulers only read it."""
    _, kv = store_deployments["hf3fs_only"]
    writers = sorted(p.name for p in (kv / "dev0").iterdir())
    assert writers == [W0], writers  # decode workers and schedulers claimed nothing
    data = sorted((kv / "dev0" / W0).glob("data-*.bin"))
    assert len(data) == 1 and (kv / "dev0" / W0 / "index.log").stat().st_size > 16
    assert not list(kv.rglob("*.kv"))  # not a file per chunk


def test_vllm_bench_serve_workflow_cold_then_warm(store_deployments, model_path):
    """Seed 004's workflow (`pd bench ttft --vllm-bench`): vLLM's own serving benchmark client,
    random prompts of one seed, run twice through the proxy: every request of both runs is
    answered and its TTFT and TPOT are read back from the benchmark's result."""
    dep, _ = store_deployments["shm_store"]
    runs = vllm_bench.cold_then_warm(vllm_bench.command(dep.url, "tiny-llama", str(model_path), 4, 600, 16, 7),
                                     pause_s=1.0, timeout_s=600)
    for run, r in runs.items():
        assert r["completed"] == 4 and not r.get("failed"), (run, r)
        assert r["mean_ttft_ms"] > 0 and r["median_tpot_ms"] > 0 and r["total_input_tokens"] >= 4 * 500, (run, r)
    assert "cold/warm mean TTFT" in vllm_bench.report(runs, "run")
