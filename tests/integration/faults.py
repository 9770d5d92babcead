"""The fault matrix's deployment and checks (tests/integration/test_faults.py).

One 1P1D deployment (shm transport, local store on a small tmpfs where the test may mount one),
started through ``launch.supervise.Deployment`` in this process, so a case can SIGKILL, SIGSTOP or
restart any one of its processes (``pd launch`` would stop everything when a child dies).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from launch.supervise import Deployment
from pd.config import load_yaml

GEN = 12
WAIT_S = 6.0    # connector.wait_timeout_s: decode gives up waiting for READY after this
TTL_S = 8.0     # coordinator.entry_ttl_s: unconsumed READY entries are freed after this
BOUND_S = 90.0  # every request of a case ends (answer or error) within this
TMPFS_MB = 48
# The store's budget is larger than its disk: it never evicts to make room, so a full disk is
# a full disk (with a budget under the disk size, evicting its own files would free the space).
STORE_GB = 0.1


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(16, 4000) for _ in range(n)]


@dataclass
class Outcome:
    """What one client saw."""
    status: int            # HTTP status; 0: no HTTP answer at all
    ids: list[int] = field(default_factory=list)
    error: str = ""        # the error message the client got ('' for a complete answer)
    seconds: float = 0.0
    pd_id: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


def _error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return ""
    if isinstance(err, dict):
        return str(err.get("message") or "")
    return str(err or "")


def complete(url: str, tokens: list[int], stream: bool, max_tokens: int = GEN, timeout: float = BOUND_S,
             **extra) -> Outcome:
    """One completion through ``url``; never raises (a transport error is status 0)."""
    body = {"model": "tiny-llama", "prompt": tokens, "max_tokens": max_tokens, "temperature": 0,
            "return_token_ids": True, "stream": stream, **extra}
    t0 = time.monotonic()
    try:
        r = requests.post(f"{url}/v1/completions", json=body, timeout=timeout, stream=stream)
        pd_id = r.headers.get("x-pd-id", "")
        if r.status_code != 200:
            return Outcome(r.status_code, error=_error_message(r.text) or f"(no message) {r.text[:200]}",
                           seconds=time.monotonic() - t0, pd_id=pd_id)
        if not stream:
            return Outcome(200, r.json()["choices"][0].get("token_ids") or [], seconds=time.monotonic() - t0,
                           pd_id=pd_id)
        ids, error, done = [], "", False
        for line in r.iter_lines():
            if line == b"data: [DONE]":
                done = True
            elif line.startswith(b"data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    error = _error_message(line[6:].decode()) or "(error event without a message)"
                else:
                    ids += event["choices"][0].get("token_ids") or []
        if not done and not error:
            error = "UNCLEAR: the stream ended without [DONE] and without an error event"
        return Outcome(200, ids, error, time.monotonic() - t0, pd_id)
    except requests.RequestException as e:
        return Outcome(0, error=f"{type(e).__name__}: {e}", seconds=time.monotonic() - t0)


class Matrix:
    """The deployment under test, its reference answers and the checks every case makes."""

    def __init__(self, dep: Deployment, store_dir: Path, mounted: bool, reference_url: str):
        self.dep, self.store_dir, self.mounted, self.ref_url = dep, store_dir, mounted, reference_url
        self._refs: dict[tuple, list[int]] = {}
        t = dep.dep.connector.transport
        self.pool_dir = Path(t.shm_dir) / f"pdkv-{t.name}"

    @property
    def url(self) -> str:
        return self.dep.proxy_url

    def instance_url(self, group: str) -> str:
        return f"http://127.0.0.1:{getattr(self.dep.dep, group).port_base}"

    def pid(self, name: str) -> int:
        return self.dep.procs[name][1].pid

    def signal(self, name: str, sig: int) -> None:
        """``sig`` to the process group of child ``name`` (vLLM's engine processes too)."""
        os.killpg(self.pid(name), sig)

    def reference(self, tokens: list[int]) -> list[int]:
        key = tuple(tokens)
        if key not in self._refs:
            out = complete(self.ref_url, tokens, False)
            assert out.ok and out.ids, f"the colocated reference failed: {out}"
            self._refs[key] = out.ids
        return self._refs[key]

    # ---- load ------------------------------------------------------------------------------

    def workload(self, n: int, seed: int, lengths=(40, 300, 700, 1100, 1500, 1900)) -> list[tuple[list[int], bool]]:
        """``n`` requests of mixed lengths, every other one streamed."""
        rng = random.Random(seed)
        return [(prompt(rng.choice(lengths), seed * 1000 + i), i % 2 == 1) for i in range(n)]

    def start_load(self, work, ex: ThreadPoolExecutor, **extra):
        """Send ``work``; ``extra``: more request fields (``seed=0``: the old flow, where decode is
        sent with the prefill and waits for its KV; greedy answers stay the same)."""
        for tokens, _ in work:  # reference answers first (the colocated instance, no fault)
            self.reference(tokens)
        return [ex.submit(complete, self.url, tokens, stream, **extra) for tokens, stream in work]

    def check_outcomes(self, work, outcomes: list[Outcome], bound_s: float = BOUND_S) -> tuple[int, int]:
        """Every request answered right or failed with a clear error in time; (answered, failed)."""
        answered = failed = 0
        for (tokens, stream), o in zip(work, outcomes):
            ref = self.reference(tokens)
            assert o.seconds <= bound_s, f"a request took {o.seconds:.0f}s (bound {bound_s:.0f}s): {o}"
            assert o.status != 0, f"the proxy gave no HTTP answer: {o.error}"
            assert "UNCLEAR" not in o.error, o
            assert o.ids == ref[: len(o.ids)], f"an answer differs from colocated (wrong KV?): {o.ids} vs {ref}"
            if o.ok:
                assert o.ids == ref, f"a complete answer differs from colocated: {o.ids} vs {ref}"
                answered += 1
            else:
                assert o.status >= 400 or stream, o
                assert len(o.error) > 10, f"the error does not say what happened: {o}"
                failed += 1
        return answered, failed

    def healthy_round(self, seed: int, n: int = 4) -> None:
        """After the fault: a round of requests all answered, equal to colocated."""
        work = self.workload(n, seed)
        with ThreadPoolExecutor(n) as ex:
            outs = [f.result() for f in self.start_load(work, ex)]
        answered, _ = self.check_outcomes(work, outs)
        assert answered == n, [o for o in outs if not o.ok]

    # ---- metrics ---------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        return proxy_metrics(self.url)

    def assert_idle(self, timeout_s: float = TTL_S + 20) -> None:
        assert_idle(self.url, [self.instance_url(g) for g in ("prefill", "decode")], self.store_dir, self.pool_dir,
                    timeout_s)

    def wait_for_links(self, n: int, timeout_s: float = 60) -> bool:
        """Until ``n`` chunks are in the transport (prefill is putting): True, or False at the timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.pool_dir.exists() and sum(not p.name.startswith(".") for p in self.pool_dir.iterdir()) >= n:
                return True
            time.sleep(0.005)
        return False


def proxy_metrics(url: str) -> dict[str, float]:
    """The proxy's /metrics (its own series and the coordinator's counters), summed per name+labels."""
    out: dict[str, float] = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = out.get(name, 0.0) + float(value)
    return out


def series_sum(url: str, name: str) -> float:
    """The sum of Prometheus series ``name`` (all its labels) at ``url``/metrics."""
    total = 0.0
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def counted(proxy_url: str, name: str, before: dict, at_least: float = 1, timeout_s: float = 10) -> bool:
    """Whether counter ``name`` rose by ``at_least`` since ``before`` (instances' counters come with
    their heartbeats: poll)."""
    deadline = time.monotonic() + timeout_s
    while delta(before, proxy_metrics(proxy_url), name) < at_least:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def leftovers(proxy_url: str, instance_urls: list[str], store_dir: Path | None = None,
              pool_dir: Path | None = None) -> dict:
    """Everything that must be back to idle after a case (empty values when it is): the shm pool's
    transport keys (``pool_dir``), the coordinator's entries and waiters, the proxy's requests in
    flight, each vLLM instance's KV usage and running / waiting requests, the store's temp files."""
    state: dict = {}
    links = [p.name for p in pool_dir.iterdir() if not p.name.startswith(".")] if pool_dir and pool_dir.exists() else []
    if links:
        state["transport keys"] = links[:5] + ([f"... {len(links)} in all"] if len(links) > 5 else [])
    m = proxy_metrics(proxy_url)
    for gauge in ("pdkv_coordinator_entries", "pdkv_coordinator_waiters"):
        if m.get(gauge, -1) != 0:
            state[gauge] = m.get(gauge, "not exported")
    # Upstream requests still open at the proxy (a late prefill half, say).
    state.update({k: v for k, v in m.items() if k.startswith("pdkv_proxy_inflight") and v})
    for url in instance_urls:
        for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"):
            v = series_sum(url, name)
            if v:
                state[f"{url} {name}"] = v
    temps = [p.name for p in store_dir.rglob("*") if p.is_file() and not p.name.endswith(".kv")] if store_dir else []
    if temps:
        state["store temp files"] = temps[:5]
    return state


def assert_idle(proxy_url: str, instance_urls: list[str], store_dir: Path | None = None, pool_dir: Path | None = None,
                timeout_s: float = TTL_S + 20) -> None:
    """``leftovers`` polled until empty; fails with what was left after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (left := leftovers(proxy_url, instance_urls, store_dir, pool_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"left behind after the case: {left}"


def start_matrix(model_path: Path, tmp: Path, reference_url: str, cfg_fn) -> tuple[Matrix, callable]:
    """Start the deployment; (Matrix, stop) where stop() tears it down and returns what it left."""
    store_dir = tmp / "kv"
    store_dir.mkdir(parents=True)
    # A small tmpfs of its own, so a case can fill it (root only; otherwise that case is skipped).
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m,mode=0700", "pdkv-faults",
                              str(store_dir)], capture_output=True).returncode == 0
    cfg = cfg_fn(store_dir)
    cfg["run_dir"] = str(tmp / "run")
    (tmp / "faults.yaml").write_text(yaml.safe_dump(cfg))
    dep = Deployment(load_yaml(str(tmp / "faults.yaml")))
    try:
        dep.start()
    except BaseException:
        dep.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(store_dir)])
        raise
    matrix = Matrix(dep, store_dir, mounted, reference_url)

    def stop() -> list[str]:
        dep.stop()
        left = [p.name for p in matrix.pool_dir.iterdir()] if matrix.pool_dir.exists() else []
        if mounted:
            subprocess.run(["umount", "-l", str(store_dir)])
        return left

    return matrix, stop
