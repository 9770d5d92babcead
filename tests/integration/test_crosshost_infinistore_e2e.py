"""P/D across two hosts through InfiniStore (TCP mode): prefill on host a, decode on host b
(network namespaces, tests/integration/netns.py).

One 1P1D deployment from one YAML file with a ``hosts:`` section, each host's share started by
``pd launch --host``: host a runs the control plane (coordinator, proxy, and the InfiniStore
server, started by the launcher) and the prefill instance, host b the decode instance. Both
instances are clients of the real InfiniStore client code; the KV crosses the veth pair to and
from the real InfiniStore server. This machine has no RDMA device, so the server loads the
libibverbs test double (tests/doubles/verbs), which lets it start and serve TCP: this proves the
TCP path and pdkv's use of InfiniStore's API, not RDMA (test_infinistore_transport.py has the RDMA
test, for hosts with a device). No store: a chunk that does not come through InfiniStore is
recomputed, and the transfer record says so. Answers are compared token for token with the
colocated reference of the shared fixture.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from pd.config import load_yaml
from tests.integration.conftest import BASE, ROOT, STEP_TOKENS
from tests.integration.faults import (
    assert_idle,
    complete,
    counted,
    delta,
    proxy_metrics,
)
from tests.integration.test_crosshost_e2e import (
    instance_urls,
    launched_on_two_hosts,
    print_counters,
    reported_gone,
    two_hosts,
    until_through_the_transport,
)
from tests.integration.test_pd_e2e import _complete, _prompt, _transfer

pytestmark = pytest.mark.integration

PORTS = {"prefill": 19300, "decode": 19350, "proxy": 19390, "coordinator": 19391, "service": 19392, "manage": 19393}


@pytest.fixture(scope="module")
def infinistore_1p1d(two_hosts, model_path, tmp_path_factory):  # noqa: F811 - the imported fixture
    """The 1P1D deployment across the two hosts over InfiniStore; yields (proxy URL, config, tmp dir,
    a list of processes a test started, killed once the deployment has stopped)."""
    from transport.infinistore_server import VERBS_DOUBLE, rdma_devices, unavailable

    why = unavailable()
    if why:
        pytest.skip(f"InfiniStore not usable here ({why}); scripts/setup.sh installs it")
    h = two_hosts
    tmp = tmp_path_factory.mktemp("crosshost-infinistore")
    keys = tmp / "keys"
    subprocess.run([sys.executable, "-m", "launch.cli", "keys", str(keys), "--client", "b"], cwd=ROOT, check=True,
                   capture_output=True)
    cfg = {**yaml.safe_load(yaml.safe_dump(BASE)), "model": str(model_path), "mode": "pd",
           "hosts": {"a": {"address": h.addr_a, "roles": ["control", "prefill"]},
                     "b": {"address": h.addr_b, "roles": ["decode"]}},
           "prefill": {"count": 1, "port_base": PORTS["prefill"]},
           "decode": {"count": 1, "port_base": PORTS["decode"]},
           "proxy": {"port": PORTS["proxy"]},
           "coordinator": {"port": PORTS["coordinator"], "auth": "curve", "keys_dir": str(keys)}}
    cfg["vllm"]["extra_args"] = ["--max-num-batched-tokens", str(STEP_TOKENS)]
    cfg["connector"]["transport"] = {"kind": "infinistore", "infinistore": {
        "url": f"infinistore://{h.addr_a}:{PORTS['service']}", "connection_type": "tcp", "start_server": True,
        "server_prealloc_gb": 1, "server_manage_port": PORTS["manage"], "staging_mb": 64, "max_value_mb": 16,
        "op_timeout_s": 5, "server_libibverbs": "" if rdma_devices() else str(VERBS_DOUBLE)}}
    cfg["connector"]["store"] = {"backend": "none"}
    # prefill on core 0, decode on core 1 (see test_crosshost_e2e.py: a waiting decode spins its core)
    with launched_on_two_hosts(h, cfg, tmp, keys, "0", "1", 600) as (url, started):
        yield url, cfg, tmp, started


def test_answers_match_colocated_and_the_kv_crossed_hosts_through_infinistore(infinistore_1p1d, deployments):
    url, _, tmp, _ = infinistore_1p1d
    _, co = deployments
    lengths = [40, 300, 700, 1100]
    cases = [(n, _prompt(n, seed=900 + n)) for n in lengths]
    with ThreadPoolExecutor(2) as ex:
        got = list(ex.map(lambda c: _complete(url, c[1]), cases))
    for (n, prompt), (ids, _, pd_id) in zip(cases, got):
        assert ids == _complete(co.url, prompt)[0], f"prompt of {n} tokens"
        rec = _transfer(url, pd_id)
        # Every chunk came through InfiniStore: none from a store, none recomputed.
        assert rec["ok"] and rec["n_chunks"] == -(-n // 256) and rec["n_store_chunks"] == 0, (n, rec)
        assert rec["producer"].startswith("prefill-0") and rec["consumer"].startswith("decode-0"), rec
    # host a's launcher started the InfiniStore server (from the YAML's start_server)
    assert re.search(rf"infinistore +ready on port {PORTS['service']}", (tmp / "a.out").read_text())


def test_server_killed_midrun_recompute_then_restarted_infinistore_again(infinistore_1p1d, deployments):
    """Last: SIGKILLs the InfiniStore server while requests are in flight; decode recomputes what
    did not come (no store); then starts it again (the launcher's command line and port, host a)
    and both clients go back to it."""
    url, cfg, tmp, started = infinistore_1p1d
    _, co = deployments
    pids = subprocess.run(["pgrep", "-f", f"transport.infinistore_server.*--service-port {PORTS['service']}"],
                          capture_output=True, text=True).stdout.split()
    assert pids, "the InfiniStore server is not running"
    prompts = [_prompt(n, seed=950 + i) for i, n in enumerate((1100, 1500, 700, 1300))]
    refs = [_complete(co.url, p)[0] for p in prompts]
    before = proxy_metrics(url)
    with ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(complete, url, p, i % 2 == 1) for i, p in enumerate(prompts)]
        deadline = time.monotonic() + 60  # the first chunks are through: KV is moving
        while delta(before, proxy_metrics(url), "pdkv_coordinator_ready") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)
        outs = [f.result() for f in futures]
    for o, ref in zip(outs, refs):  # answered (what did not come through InfiniStore was recomputed)
        assert o.ok and o.ids == ref, o
    print("in flight at the kill:", [f"{o.seconds:.1f} s" for o in outs])
    # With the server gone: answered equal to colocated, the KV recomputed.
    for n, seed in ((600, 981), (1000, 982)):
        prompt = _prompt(n, seed)
        ids, _, pd_id = _complete(url, prompt)
        assert ids == _complete(co.url, prompt)[0]
        rec = _transfer(url, pd_id)
        assert rec["n_store_chunks"] == 0 and not (rec["ok"] and rec["n_chunks"] == -(-n // 256)), rec
    assert reported_gone(tmp / "a.out", "infinistore")  # host a's launcher said so and went on
    assert requests.get(f"{url}/v1/models", timeout=10).status_code == 200
    # Counted: prefill's puts dropped, decode's loads failed (the rest recomputed).
    for name in ("prefill_pool_dropped", "done_failed"):
        name = f"pdkv_coordinator_{name}"
        assert counted(url, name, before, 2), f"{name} did not rise by 2: {proxy_metrics(url).get(name)}"
    print_counters(url, before, "prefill_pool_dropped", "prefill_pool_server_down", "decode_pool_get_misses",
                   "decode_pool_server_down", "done_failed")
    c = load_yaml(str(tmp / "deployment.yaml")).connector.transport.infinistore
    from transport.infinistore_server import run_server

    with open(tmp / "server-restarted.out", "w") as log:
        started.append(run_server(c, log))  # the launcher's command line (server_spec), in host a
    until_through_the_transport(url, co.url, 990, lambda r: r["ok"] and r["n_store_chunks"] == 0
                                and r["n_chunks"] == -(-r["n"] // 256), {"prefill-0", "decode-0"})
    assert counted(url, "pdkv_coordinator_prefill_pool_restarts", before), "prefill's client did not reconnect"
    print_counters(url, before, "prefill_pool_restarts", "decode_pool_restarts")
    assert_idle(url, instance_urls(cfg))
    # Nothing left in the restarted server: every transfer key was deleted once read.
    deadline = time.monotonic() + 20
    while (keys := requests.get(f"http://127.0.0.1:{PORTS['manage']}/kvmap_len", timeout=10).json()["len"]) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not keys, f"left in the restarted InfiniStore server: {keys}"
