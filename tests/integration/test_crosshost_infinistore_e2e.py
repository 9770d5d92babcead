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

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tests.integration.conftest import BASE, ROOT, STEP_TOKENS
from tests.integration.test_crosshost_e2e import launched_on_two_hosts, two_hosts  # noqa: F401 - a fixture
from tests.integration.test_pd_e2e import _complete, _prompt, _transfer

pytestmark = pytest.mark.integration

PORTS = {"prefill": 19300, "decode": 19350, "proxy": 19390, "coordinator": 19391, "service": 19392, "manage": 19393}


@pytest.fixture(scope="module")
def infinistore_1p1d(two_hosts, model_path, tmp_path_factory):  # noqa: F811 - the imported fixture
    """The 1P1D deployment across the two hosts over InfiniStore; yields (proxy URL, tmp dir)."""
    from transport.infinistore_server import VERBS_DOUBLE, rdma_devices, unavailable

    why = unavailable()
    if why:
        pytest.skip(f"InfiniStore not usable here ({why}); scripts/setup.sh installs it")
    h = two_hosts
    tmp = tmp_path_factory.mktemp("crosshost-infinistore")
    keys = tmp / "keys"
    subprocess.run([sys.executable, "-m", "pd.cli", "keys", str(keys), "--client", "b"], cwd=ROOT, check=True,
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
    with launched_on_two_hosts(h, cfg, tmp, keys, "0", "1", 600) as url:
        yield url, tmp


def test_answers_match_colocated_and_the_kv_crossed_hosts_through_infinistore(infinistore_1p1d, deployments):
    url, tmp = infinistore_1p1d
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
