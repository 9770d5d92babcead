"""P/D across two hosts: prefill on host a, decode on host b (network namespaces, tests/integration/netns.py).

One 2P2D deployment from one YAML file with a ``hosts:`` section, each host's share started by
``pd launch --host``: host a runs the control plane (coordinator with CurveZMQ, proxy, the
Mooncake master) and two prefill instances, host b two decode instances. The KV crosses the veth
pair through Mooncake Store (TCP); a local store on a directory both hosts see is the fallback.
Answers are compared token for token with the colocated reference of the shared fixture.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from pd.config import load_yaml
from tests.integration import netns
from tests.integration.conftest import BASE, READY, ROOT, STEP_TOKENS
from tests.integration.faults import (
    assert_idle,
    counted,
    delta,
    proxy_metrics,
    series_sum,
)
from tests.integration.test_pd_e2e import _complete, _prompt, _transfer
from transport.mooncake_master import run_master

pytestmark = pytest.mark.integration

PORTS = {"prefill": 19100, "decode": 19150, "proxy": 19190, "coordinator": 19191, "master": 19192,
         "metadata": 19193, "metrics": 19194}


def _launch(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def launched_on_two_hosts(h, cfg: dict, tmp: Path, keys: Path, binds_a: str, binds_b: str, ready_s: float):
    """``cfg`` (with a hosts: section naming a and b) launched with ``pd launch --host`` on both
    hosts, host b with its client key bundle; yields (the proxy URL once host a is ready, a list
    for processes a test starts: they are killed once both launches have stopped), and checks at
    the end that both launches stopped cleanly."""
    cfg_file = tmp / "deployment.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    launch = [sys.executable, "-m", "launch.cli", "launch", "--config", str(cfg_file)]
    a = _launch(launch + ["--host", "a", "--set", f"run_dir={tmp / 'run-a'}", "--set", f"vllm.cpu_bind={binds_a}"],
                tmp / "a.out")
    b = _launch(h.exec_b(launch + ["--host", "b", "--keys-dir", str(keys / "clients" / "b"),
                                   "--set", f"run_dir={tmp / 'run-b'}", "--set", f"vllm.cpu_bind={binds_b}"]),
                tmp / "b.out")
    started: list[subprocess.Popen] = []
    try:
        deadline, url = time.monotonic() + ready_s, None
        while time.monotonic() < deadline and url is None:
            m = READY.search((tmp / "a.out").read_text())
            url = m.group(1) if m else None
            for name, p in (("a", a), ("b", b)):
                if p.poll() is not None:
                    raise RuntimeError(f"host {name}'s pd launch exited {p.returncode}:\n"
                                       f"{(tmp / f'{name}.out').read_text()[-4000:]}")
            time.sleep(1)
        if url is None:
            raise RuntimeError(f"host a not ready in time:\n{(tmp / 'a.out').read_text()[-4000:]}")
        yield url, started
    finally:
        codes = [_stop(b), _stop(a)]
        for p in started:
            p.kill()
            p.wait(10)
    assert codes == [0, 0], f"pd launch exit codes (b, a): {codes}\n{(tmp / 'a.out').read_text()[-3000:]}"


@pytest.fixture(scope="module")
def two_hosts():
    why = netns.available()
    if why:
        pytest.skip(f"two hosts need network namespaces: {why}")
    hosts = netns.make()
    yield hosts
    hosts.close()


@pytest.fixture(scope="module")
def crosshost(two_hosts, model_path, tmp_path_factory):
    """The 2P2D deployment across the two hosts; yields (proxy URL, config, tmp dir, a list of
    processes a test started, killed once the deployment has stopped)."""
    h = two_hosts
    tmp = tmp_path_factory.mktemp("crosshost")
    keys = tmp / "keys"
    subprocess.run([sys.executable, "-m", "launch.cli", "keys", str(keys), "--client", "b"], cwd=ROOT, check=True,
                   capture_output=True)
    cfg = {**yaml.safe_load(yaml.safe_dump(BASE)), "model": str(model_path), "mode": "pd",
           "hosts": {"a": {"address": h.addr_a, "roles": ["control", "prefill"]},
                     "b": {"address": h.addr_b, "roles": ["decode"]}},
           "prefill": {"count": 2, "port_base": PORTS["prefill"]},
           "decode": {"count": 2, "port_base": PORTS["decode"]},
           "proxy": {"port": PORTS["proxy"]},
           "coordinator": {"port": PORTS["coordinator"], "auth": "curve", "keys_dir": str(keys)}}
    cfg["vllm"]["extra_args"] = ["--max-num-batched-tokens", str(STEP_TOKENS)]
    cfg["connector"]["transport"] = {"kind": "mooncake", "mooncake": {
        "master": f"{h.addr_a}:{PORTS['master']}", "start_master": True, "metadata_port": PORTS["metadata"],
        "metrics_port": PORTS["metrics"], "op_timeout_s": 3, "global_segment_size_mb": 256,
        "local_buffer_size_mb": 64}}
    (tmp / "shared-store").mkdir()  # both hosts see this directory (one filesystem)
    cfg["connector"]["store"] = {"backend": "local", "paths": [str(tmp / "shared-store")]}
    # The two "hosts" share this machine's 2 cores: the prefill instances get core 0, the decode
    # instances core 1. A decode instance waiting for KV keeps its engine stepping and its worker
    # spinning (vLLM's shm broadcast busy loop); on the core of a prefill instance it starved that
    # prefill (seen: 120 s stalls), which separate machines never see.
    with launched_on_two_hosts(h, cfg, tmp, keys, "0;0", "1;1", 900) as (url, started):
        yield url, cfg, tmp, started


def test_answers_match_colocated_and_the_kv_crossed_hosts_through_mooncake(crosshost, deployments):
    url, _, _, _ = crosshost
    _, co = deployments
    lengths = [40, 256, 300, 700, 1100, 1500, 90, 800]
    cases = [(n, _prompt(n, seed=700 + n)) for n in lengths]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda c: _complete(url, c[1]), cases))
    producers, consumers = set(), set()
    for (n, prompt), (ids, _, pd_id) in zip(cases, got):
        assert ids == _complete(co.url, prompt)[0], f"prompt of {n} tokens"
        rec = _transfer(url, pd_id)
        # Everything came through the network transport: no chunk from the store.
        assert rec["ok"] and rec["n_chunks"] == -(-n // 256) and rec["n_store_chunks"] == 0, (n, rec)
        producers.add(rec["producer"])
        consumers.add(rec["consumer"])
    # Both prefill instances (host a) and both decode instances (host b) served.
    assert {p.split("/")[0] for p in producers} == {"prefill-0", "prefill-1"}, producers
    assert {c.split("/")[0] for c in consumers} == {"decode-0", "decode-1"}, consumers


def test_coordinator_refuses_a_client_without_the_keys(crosshost, two_hosts):
    """The coordinator listens beyond loopback, so only clients with an authorized key get answers."""
    _, cfg, _, _ = crosshost
    from pd.coordinator.client import CoordinatorClient

    plain = CoordinatorClient(f"tcp://{two_hosts.addr_a}:{cfg['coordinator']['port']}", timeout_s=1.0)
    try:
        assert plain.query() is None
    finally:
        plain.close()


def instance_urls(cfg: dict) -> list[str]:
    """Every vLLM instance of a two-host ``cfg`` (prefill on host a, decode on host b)."""
    return [f"http://{cfg['hosts'][host]['address']}:{cfg[group]['port_base'] + i}"
            for group, host in (("prefill", "a"), ("decode", "b")) for i in range(cfg[group]["count"])]


def reported_gone(log: Path, name: str, timeout_s: float = 10) -> bool:
    """Whether the launcher writing ``log`` reported that its child ``name`` was SIGKILLed and
    that the deployment goes on without it."""
    deadline = time.monotonic() + timeout_s
    pattern = re.compile(rf"pdkv: {re.escape(name)} \(pid \d+\) was killed by SIGKILL[^\n]*; the rest goes on")
    while not pattern.search(log.read_text()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def print_counters(url: str, before: dict, *names: str) -> None:
    """The rise of the coordinator's counters ``names`` since ``before`` (the figures in
    docs/reliability.md's fault matrix; pytest -rP shows them)."""
    now = proxy_metrics(url)
    print("counted:", ", ".join(f"{n} +{delta(before, now, 'pdkv_coordinator_' + n):g}" for n in names))


def until_through_the_transport(url: str, co_url: str, seed: int, clean, names: set[str],
                                timeout_s: float = 90) -> list[dict]:
    """Rounds of 4 requests at once, each answered equal to colocated, until every transfer record
    of a round passes ``clean`` and the instances ``names`` all took part (their clients are back on
    the restarted server); that round's records, or an AssertionError after ``timeout_s``."""
    t0 = time.monotonic()
    deadline, rounds = t0 + timeout_s, 0
    while True:
        rounds += 1
        cases = [_prompt(n, seed=seed + i) for i, n in enumerate((300, 600, 450, 700))]
        seed += 10
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda p: _complete(url, p), cases))
        recs = []
        for prompt, (ids, _, pd_id) in zip(cases, got):
            assert ids == _complete(co_url, prompt)[0], f"a prompt of {len(prompt)} tokens"
            recs.append({**_transfer(url, pd_id), "n": len(prompt)})
        took_part = {r[k].split("/")[0] for r in recs for k in ("producer", "consumer")}
        if all(clean(r) for r in recs) and took_part >= names:
            print(f"through the transport again: round {rounds}, {time.monotonic() - t0:.0f} s after the restart")
            return recs
        assert time.monotonic() < deadline, f"not through the transport again after {timeout_s} s: {recs}"
        time.sleep(1)


def test_master_killed_midrun_store_fallback_then_restarted_mooncake_again(crosshost, deployments):
    """Last: SIGKILLs the Mooncake master; puts and gets fail fast, decode loads from the shared
    store; then starts it again (same command line, same port, host a) and the clients go back to it."""
    url, cfg, tmp, started = crosshost
    _, co = deployments
    pids = subprocess.run(["pgrep", "-f", f"mooncake_master.*{PORTS['master']}"], capture_output=True,
                          text=True).stdout.split()
    assert pids, "the Mooncake master is not running"
    before = proxy_metrics(url)
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    time.sleep(1)
    for n, seed in ((600, 801), (1000, 802)):
        prompt = _prompt(n, seed)
        ids, _, pd_id = _complete(url, prompt)
        assert ids == _complete(co.url, prompt)[0]
        rec = _transfer(url, pd_id)
        chunks = -(-n // 256)
        assert rec["ok"] and rec["n_chunks"] == chunks and rec["n_store_chunks"] == chunks, rec
    assert reported_gone(tmp / "a.out", "mooncake-master")  # host a's launcher said so and went on
    assert requests.get(f"{url}/v1/models", timeout=10).status_code == 200
    # Counted (the instances' counters, with their heartbeats): prefill's puts dropped, decode's
    # reads missed, the chunks loaded from the store instead.
    for name, n in (("prefill_pool_dropped", 7), ("decode_pool_get_misses", 1), ("store_chunks_loaded", 7)):
        name = f"pdkv_coordinator_{name}"
        assert counted(url, name, before, n), f"{name} did not rise by {n}: {proxy_metrics(url).get(name)}"
    print_counters(url, before, "prefill_pool_dropped", "prefill_pool_master_down", "decode_pool_get_misses",
                   "decode_pool_master_down", "store_chunks_loaded")
    m = load_yaml(str(tmp / "deployment.yaml")).connector.transport.mooncake
    with open(tmp / "master-restarted.out", "w") as log:
        started.append(run_master(m, log))  # the launcher's command line (master_spec), in host a
    until_through_the_transport(url, co.url, 810, lambda r: r["ok"] and r["n_store_chunks"] == 0
                                and r["n_chunks"] == -(-r["n"] // 256),
                                {"prefill-0", "prefill-1", "decode-0", "decode-1"})
    assert_idle(url, instance_urls(cfg), tmp / "shared-store")
    # Nothing left in the restarted master: every transfer key was deleted once read.
    master_keys = f"http://{cfg['hosts']['a']['address']}:{PORTS['metrics']}/metrics"
    deadline = time.monotonic() + 20
    while (keys := series_sum(master_keys, "master_key_count")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert keys == 0, f"{keys} keys left in the restarted master"
