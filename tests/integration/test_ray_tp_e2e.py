"""pd launch --ray with a TP=2 instance, on a one-node Ray cluster (a head on 127.0.0.1).

``pd launch --ray`` places prefill-0 (TP 1) as an actor and decode-0 (TP 2) as an actor in a
placement group of one bundle per rank, with the KV through Mooncake Store on loopback. Checked:
the group Ray holds (its bundles are the plan's, STRICT_PACK, on the node it reserved), the
instance actor running in it, both TP workers of decode-0 running under that actor (vLLM's own
processes, not Ray actors of their own), both ranks registered with the coordinator, answers
through the proxy equal token for token to decode-0's own (asked without P/D, before anything was
stored: colocated at TP 2), and Ctrl-C leaving no process, actor or placement group behind.
The node-loss test of a TP group placed again is not here (tests/integration/test_ray_e2e.py
loses a TP 1 instance's node).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from launch.ray_plan import instance_bundles
from pd.config import load_yaml
from tests.integration.conftest import READY, ROOT
from tests.integration.test_pd_e2e import _complete, _prompt
from tests.integration.test_ray_e2e import (
    RAY,
    _config,
    _kill_leftovers,
    _ray_start,
    _served,
    _stats,
    _stop_group,
    _wait_nodes,
)

pytestmark = pytest.mark.integration

GCS = 26479
PORTS = {"prefill": 19500, "decode": 19550, "proxy": 19590, "coordinator": 19591, "master": 19592,
         "metadata": 19593, "metrics": 19594}
CASES = [(40, 1), (300, 2), (700, 3), (520, 4)]  # (tokens, seed): inside a chunk, 2 and 3 chunks
# 4 logical CPUs: prefill-0's actor takes 1, decode-0's group 1 per rank (ray.instance_cpus)
HEAD_ARGS = ["--head", "--node-ip-address=127.0.0.1", f"--port={GCS}", "--block", "--num-cpus=4",
             "--object-store-memory=200000000", "--disable-usage-stats", "--include-dashboard=false",
             "--min-worker-port=33000", "--max-worker-port=33999",
             "--resources", json.dumps({"pdkv_control": 1, "prefill_node": 1, "decode_node": 1})]

# What the test asks the cluster (a Ray driver of its own, in a subprocess): every placement group
# and every actor of the deployment's namespace, as JSON.
VIEW = """
import json, sys, ray
from ray._private.state import state
from ray.core.generated import gcs_pb2
ray.init(address=sys.argv[1], namespace="pdkv", log_to_driver=False, logging_level="ERROR")
actors = []
for raw in state._connect_and_get_accessor().get_actor_table(None, None):
    a = gcs_pb2.ActorTableData.FromString(raw)
    if a.ray_namespace == "pdkv":
        actors.append({"class": a.class_name, "pid": a.pid, "node": a.node_id.hex(),
                       "pg": a.placement_group_id.hex(),
                       "state": gcs_pb2.ActorTableData.ActorState.Name(a.state)})
print(json.dumps({"pgs": ray.util.placement_group_table(), "actors": actors,
                  "nodes": {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}}))
"""


def _view(address: str, env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", VIEW, address], check=False, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A one-node Ray cluster; yields (address, env, tmp dir)."""
    tmp = tmp_path_factory.mktemp("raytp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "PDKV_KEYS_HOME": str(tmp / "keyshome")}
    address = f"127.0.0.1:{GCS}"
    node = _ray_start([RAY, "start", *HEAD_ARGS], tmp / "head.out", env)
    try:
        _wait_nodes(address, "decode_node", env)
        yield address, env, tmp
    finally:
        code = _stop_group(node)
        _kill_leftovers(address)
        print("ray start exit code:", code)


def _tp_config(model_path: Path, tmp: Path) -> dict:
    cfg = _config(None, model_path, tmp)
    cfg["prefill"]["port_base"] = PORTS["prefill"]
    # prefix caching off: every request through the proxy loads its KV instead of reusing decode's own
    cfg["decode"] = {"count": 1, "port_base": PORTS["decode"], "tp": 2, "extra_args": ["--no-enable-prefix-caching"]}
    cfg["proxy"]["port"], cfg["coordinator"]["port"] = PORTS["proxy"], PORTS["coordinator"]
    cfg["ray"]["decode_cpu_bind"] = "1|1"  # both ranks on core 1, prefill on core 0
    cfg["ray"]["restarts"] = 0
    cfg["connector"]["transport"]["mooncake"].update(
        master=f"127.0.0.1:{PORTS['master']}", metadata_port=PORTS["metadata"], metrics_port=PORTS["metrics"])
    return cfg


def _left(ports: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", f"--port ({ports})"], check=False, capture_output=True,
                          text=True).stdout.split()


@pytest.fixture(scope="module")
def tp_deployment(head, model_path):
    """``pd launch --ray`` of prefill TP 1 and decode TP 2; yields (proxy URL, config file, log).
    Afterwards Ctrl-C: nothing of it may be left, on the node or in Ray."""
    address, env, tmp = head
    cfg_file = tmp / "ray-tp.yaml"
    cfg_file.write_text(yaml.safe_dump(_tp_config(model_path, tmp)))
    log = tmp / "launch.out"
    with open(log, "w") as out:
        launch = subprocess.Popen([sys.executable, "-m", "launch.cli", "launch", "--ray", address, "--config",
                                   str(cfg_file)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not (m := READY.search(log.read_text())):
            assert launch.poll() is None, f"pd launch --ray exited {launch.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"pd launch --ray not ready:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        yield m.group(1), cfg_file, log, workers
    finally:
        launch.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            launch.wait(120)
        except subprocess.TimeoutExpired:
            pass
        code = _stop_group(launch)
    text = log.read_text()
    assert code == 0 and text.rstrip().endswith("pdkv: stopped"), text[-3000:]
    ports = "|".join(str(PORTS[k]) for k in ("prefill", "decode", "proxy", "coordinator", "master"))
    assert not _left(ports), f"processes left after pd launch --ray stopped: {_left(ports)}"
    alive = [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"decode-0's vLLM processes left: {alive}"
    view = _view(address, env)
    assert all(g["state"] == "REMOVED" for g in view["pgs"].values()), view["pgs"]
    assert all(a["state"] == "DEAD" for a in view["actors"]), view["actors"]


def _tp_workers(port: int, n: int = 2, timeout_s: float = 15.0) -> tuple[psutil.Process, list[psutil.Process]]:
    """The vLLM API server listening on ``port`` and its TP worker processes (looked for again until
    ``n`` are seen or ``timeout_s`` passes: once, in CI, none was seen right after the instance was
    ready, and the file alone then passed; the children's command lines are in the message)."""
    pids = subprocess.run(["pgrep", "-f", f"vllm.entrypoints.openai.api_server.*--port {port}"],
                          check=False, capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, pids
    server = psutil.Process(int(pids[0]))
    deadline = time.monotonic() + timeout_s
    while True:
        tp = sorted((p for p in server.children(recursive=True) if "Worker_TP" in " ".join(_cmdline(p))),
                    key=lambda p: " ".join(_cmdline(p)))
        if len(tp) >= n or time.monotonic() > deadline:
            return server, tp
        time.sleep(0.5)


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:  # gone, or not readable at this instant
        return []


def test_tp2_instance_runs_in_its_placement_group_registers_and_answers_as_colocated(tp_deployment, head):
    url, cfg_file, log, workers = tp_deployment
    address, env, _ = head
    text = log.read_text()
    assert f"decode-0       ready on port {PORTS['decode']}" in text, text
    # The group Ray holds: the plan's bundles, packed on the one node it reserved.
    view = _view(address, env)
    live = {i: g for i, g in view["pgs"].items() if g["state"] == "CREATED"}
    assert len(live) == 1, view["pgs"]
    pg_id, pg = next(iter(live.items()))
    plan = instance_bundles(load_yaml(str(cfg_file)), "decode", "cpu")
    assert [pg["bundles"][k] for k in sorted(pg["bundles"], key=int)] == plan and len(plan) == 2, (pg, plan)
    assert pg["strategy"] == "STRICT_PACK"
    nodes = set(pg["bundles_to_node_id"].values())
    assert len(nodes) == 1 and nodes <= set(view["nodes"]), pg
    # The instance's actor runs in that group, on that node; vLLM's two TP workers run under it.
    in_group = [a for a in view["actors"] if a["pg"] == pg_id and a["state"] == "ALIVE"]
    assert len(in_group) == 1 and in_group[0]["class"] == "ProcHost" and in_group[0]["node"] in nodes, view["actors"]
    server, tp = _tp_workers(PORTS["decode"])
    assert [" ".join(p.cmdline()).split("_TP")[-1].split()[0] for p in tp] == ["0", "1"], \
        [_cmdline(p) for p in server.children(recursive=True)]
    assert in_group[0]["pid"] in [p.pid for p in server.parents()], (in_group[0], server.parents())
    workers += [p.pid for p in tp] + [server.pid]
    # The references: decode-0 asked without P/D (TP 2 computing everything), before any KV is stored;
    # it listens on the address Ray gives its node (on this machine not the head's 127.0.0.1).
    decode = f"http://{view['nodes'][in_group[0]['node']]}:{PORTS['decode']}"
    answers = {c: _complete(decode, _prompt(*c))[0] for c in CASES}
    for rec in _served(url, CASES, answers):
        assert rec["ok"] and rec["n_chunks"] == -(-rec["n"] // 256) and rec["n_store_chunks"] == 0, rec
        assert rec["producer"].split("/")[0] == "prefill-0" and rec["consumer"].split("/")[0] == "decode-0", rec
    # Both ranks registered with the coordinator, alive.
    stats = _stats(cfg_file, env)
    ranks = {n: v for n, v in stats.items() if n.startswith("decode-0")}
    assert len(ranks) == 2 and all(state == "alive" for state, _ in ranks.values()), stats
    # ... each from its TP worker (rank 1 under its own id)
    assert {n: pid for n, (_, pid) in ranks.items()} == {"decode-0": tp[0].pid, "decode-0/tp1": tp[1].pid}, (stats, tp)
