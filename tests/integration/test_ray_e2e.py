"""pd launch --ray on a real Ray cluster of two hosts (network namespaces, tests/integration/netns.py).

Host a (the root namespace) runs the Ray head, which offers the control resource and the
prefill resource; host b runs a Ray worker offering the decode resource. ``pd launch --ray``
(on host a) puts the coordinator, the Mooncake master and the proxy on the head, prefill-0 on
the head and decode-0 on the worker; the KV crosses the veth pair through Mooncake Store (TCP).
One deployment serves every test of this module (module fixture); answers are compared token
for token with a colocated instance started beside it (stopped once its answers are in). The
last test starts a third host c (a worker offering the decode resource too) and kills every
process of host b: decode-0 is placed again on host c.
"""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from tests.integration import netns
from tests.integration.conftest import BASE, READY, ROOT, STEP_TOKENS, start, wait_ready
from tests.integration.test_pd_e2e import GEN, _complete, _prompt, _transfer

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).parent / "ray")
GCS = 26379  # outside Ray's worker port ranges below and the ports of the deployment
PORTS = {"prefill": 19300, "decode": 19350, "proxy": 19390, "coordinator": 19391, "master": 19392,
         "metadata": 19393, "metrics": 19394, "colocated": 19480}
# the prompts of each test, (tokens, seed); the colocated reference answers all of them first
CASES = {"match": [(40, 1), (300, 2), (700, 3), (1100, 4), (256, 5), (90, 6)],
         "restart": [(300, 11), (600, 12), (450, 13), (500, 14)],
         "stream": [(200 + 37 * i, 100 + i) for i in range(8)]}


def _ray_start(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop_group(proc: subprocess.Popen, wait_s: float = 60) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def _kill_leftovers(pattern: str) -> None:
    """SIGKILL what is left of this module's Ray nodes (their command lines name our GCS address)."""
    for pid in subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split():
        if int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_nodes(address: str, resource: str, env: dict, amount: float = 1, timeout_s: float = 90) -> None:
    """Until the cluster's nodes offer ``amount`` of ``resource`` in all."""
    code = ("import ray, sys, time\n"
            f"ray.init(address={address!r}, log_to_driver=False, logging_level='ERROR')\n"
            f"deadline = time.monotonic() + {timeout_s}\n"
            f"while ray.cluster_resources().get({resource!r}, 0) < {amount}:\n"
            "    assert time.monotonic() < deadline, ray.cluster_resources()\n"
            "    time.sleep(0.5)\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=timeout_s + 30)


NODE_ARGS = ["--block", "--num-cpus=2", "--object-store-memory=200000000", "--disable-usage-stats"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head on host a and a worker on host b; yields (hosts, address, env, tmp dir)."""
    why = netns.available()
    if why:
        pytest.skip(f"two hosts need network namespaces: {why}")
    tmp = tmp_path_factory.mktemp("ray")
    h = netns.make(3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "PDKV_KEYS_HOME": str(tmp / "keyshome")}
    head = _ray_start([RAY, "start", "--head", f"--node-ip-address={h.addr_a}", f"--port={GCS}", *NODE_ARGS,
                       "--include-dashboard=false", "--min-worker-port=30000", "--max-worker-port=30999",
                       "--resources", json.dumps({"pdkv_control": 1, "prefill_node": 2})], tmp / "head.out", env)
    address = f"{h.addr_a}:{GCS}"
    worker = None
    try:
        _wait_nodes(address, "prefill_node", env)
        worker = _ray_start(h.exec_b([RAY, "start", f"--address={address}", f"--node-ip-address={h.addr_b}", *NODE_ARGS,
                                      "--min-worker-port=31000", "--max-worker-port=31999",
                                      "--resources", json.dumps({"decode_node": 2})]), tmp / "worker.out", env)
        _wait_nodes(address, "decode_node", env)
        yield h, address, env, tmp
    finally:
        codes = [_stop_group(p) for p in (worker, head) if p is not None]
        _kill_leftovers(address)
        h.close()
        print("ray start exit codes (worker, head):", codes)


@pytest.fixture(scope="module")
def spare(cluster):
    """Host c, a third namespace routed to host a, and a function that starts a Ray worker there
    offering the decode resource (the node-loss test calls it); yields (host c, that function).
    Set up before the deployment and stopped after it, which may run an instance there."""
    _, address, env, tmp = cluster
    c = netns.make(4)
    nodes: list[subprocess.Popen] = []
    try:
        # host a's address on the link to host b (the head's, the control node's) through host c's link
        subprocess.run(c.exec_b(["ip", "route", "add", "default", "via", c.addr_a]), check=True)

        def start_node() -> None:
            nodes.append(_ray_start(c.exec_b([RAY, "start", f"--address={address}", f"--node-ip-address={c.addr_b}",
                                              *NODE_ARGS, "--min-worker-port=32000", "--max-worker-port=32999",
                                              "--resources", json.dumps({"decode_node": 2})]), tmp / "spare.out", env))
            _wait_nodes(address, "decode_node", env, amount=4)  # host b's 2 and host c's 2

        yield c, start_node
    finally:
        for p in nodes:
            _stop_group(p)
        c.close()


def _config(h, model_path: Path, tmp: Path) -> dict:
    cfg = {**yaml.safe_load(yaml.safe_dump(BASE)), "model": str(model_path), "mode": "pd",
           "run_dir": str(tmp / "run"),
           "prefill": {"count": 1, "port_base": PORTS["prefill"]}, "decode": {"count": 1, "port_base": PORTS["decode"]},
           "proxy": {"port": PORTS["proxy"], "policy": "round_robin"},
           "coordinator": {"port": PORTS["coordinator"]},
           "ray": {"control_resource": "pdkv_control", "prefill_resource": "prefill_node",
                   "decode_resource": "decode_node", "prefill_cpu_bind": "0", "decode_cpu_bind": "1",
                   "restarts": 3, "drain_timeout_s": 120, "secrets_dir": str(tmp / "secrets")}}
    cfg["vllm"]["extra_args"] = ["--max-num-batched-tokens", str(STEP_TOKENS)]
    cfg["connector"]["transport"] = {"kind": "mooncake", "mooncake": {
        "master": f"127.0.0.1:{PORTS['master']}", "start_master": True, "metadata_port": PORTS["metadata"],
        "metrics_port": PORTS["metrics"], "op_timeout_s": 3, "global_segment_size_mb": 128,
        "local_buffer_size_mb": 64}}
    (tmp / "shared-store").mkdir()
    cfg["connector"]["store"] = {"backend": "local", "paths": [str(tmp / "shared-store")]}
    return cfg


def _colocated(model_path: Path) -> dict:
    cfg = {**yaml.safe_load(yaml.safe_dump(BASE)), "model": str(model_path), "mode": "colocated",
           "prefill": {"count": 1, "port_base": PORTS["colocated"]}, "decode": {"count": 0, "port_base": 19485},
           "proxy": {"port": 19490}, "coordinator": {"port": 19491}}
    cfg["vllm"]["extra_args"] = ["--max-num-batched-tokens", str(STEP_TOKENS)]
    cfg["vllm"]["cpu_bind"] = "0"
    return cfg


@pytest.fixture(scope="module")
def deployment(cluster, spare, model_path):
    """``pd launch --ray`` of the 1P1D config, and the colocated answers of every prompt of CASES;
    yields (proxy URL, config, config file, launch log, answers by (tokens, seed))."""
    h, address, env, tmp = cluster
    cfg = _config(h, model_path, tmp)
    cfg_file = tmp / "ray.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    log = tmp / "launch.out"
    with open(log, "w") as out:
        launch = subprocess.Popen([sys.executable, "-m", "launch.cli", "launch", "--ray", address, "--config",
                                   str(cfg_file)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    co_cfg = _colocated(model_path)
    co_proc, co_log = start(co_cfg, tmp, "colocated")
    try:
        co = wait_ready(co_proc, co_log, co_cfg, timeout=600)
        answers = {c: _complete(co.url, _prompt(*c))[0] for cases in CASES.values() for c in cases}
        assert co.stop() == 0
        deadline = time.monotonic() + 600
        while not (m := READY.search(log.read_text())):
            assert launch.poll() is None, f"pd launch --ray exited {launch.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"pd launch --ray not ready:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        yield m.group(1), cfg, cfg_file, log, answers
    finally:
        _stop_group(co_proc)
        code = _stop_group(launch, 120)
    text = log.read_text()
    assert code == 0 and text.rstrip().endswith("pdkv: stopped"), text[-3000:]
    # Ctrl-C stopped everything it started, on both hosts.
    left = subprocess.run(["pgrep", "-f", f"--port ({PORTS['prefill']}|{PORTS['decode']}|{PORTS['proxy']})"],
                          capture_output=True, text=True).stdout.split()
    assert not left, f"processes left after pd launch --ray stopped: {left}"


def _served(url: str, cases: list, answers: dict) -> list[dict]:
    """Send ``cases`` (4 at a time), check each answer equals colocated; their transfer records."""
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda c: _complete(url, _prompt(*c)), cases))
    for c, (ids, _, _) in zip(cases, got):
        assert ids == answers[c], f"prompt {c}"
    return [{**_transfer(url, pd_id), "n": c[0]} for c, (_, _, pd_id) in zip(cases, got)]


def _stats(cfg_file: Path, env: dict) -> dict[str, tuple[str, int]]:
    """``pd stats`` (on host a, the config's coordinator and the keys pd launch made): each
    registered instance's (state, pid)."""
    r = subprocess.run([sys.executable, "-m", "launch.cli", "stats", "--config", str(cfg_file)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return {m.group(1): (m.group(2), int(m.group(3)))
            for m in re.finditer(r"^  (\S+) +\S+ +(alive|DOWN) +pid (\d+)", r.stdout, re.M)}


def test_answers_match_colocated_with_the_kv_across_hosts_and_the_launch_looks_local(deployment, cluster):
    url, _, cfg_file, log, answers = deployment
    _, _, env, tmp = cluster
    for rec in _served(url, CASES["match"], answers):
        assert rec["ok"] and rec["n_chunks"] == -(-rec["n"] // 256) and rec["n_store_chunks"] == 0, rec
        assert rec["producer"].split("/")[0] == "prefill-0" and rec["consumer"].split("/")[0] == "decode-0", rec
    text = log.read_text()
    for name, port in (("coordinator", PORTS["coordinator"]), ("mooncake-master", PORTS["master"]),
                       ("prefill-0", PORTS["prefill"]), ("decode-0", PORTS["decode"]), ("proxy", PORTS["proxy"])):
        assert re.search(rf"^  {name} +ready on port {port} \(\d+s\)$", text, re.M), (name, text)
    stats = _stats(cfg_file, env)
    assert {n.split("/")[0] for n, (state, _) in stats.items() if state == "alive"} == {"prefill-0", "decode-0"}, stats
    # The keys and the token came through Ray: owner-only where they landed.
    secrets = tmp / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    files = [p for p in secrets.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"server.key", "client.key_secret", "admin.token"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), files


def _decode_pid() -> int:
    out = subprocess.run(["pgrep", "-f", f"vllm.entrypoints.openai.api_server.*--port {PORTS['decode']}"],
                         capture_output=True, text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def test_killed_decode_on_the_worker_is_restarted_by_ray_and_serves_again(deployment, cluster):
    url, _, cfg_file, log, answers = deployment
    _, _, env, _ = cluster
    registered = {n: p for n, (_, p) in _stats(cfg_file, env).items() if n.startswith("decode-0")}
    pid = _decode_pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while "decode-0       ready again" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    text = log.read_text()
    assert f"decode-0 (pid {pid}) was killed by SIGKILL" in text and "restarting decode-0 (1 of 3" in text, text
    assert _decode_pid() != pid
    deadline = time.monotonic() + 60  # its connector's client is back on Mooncake after a round or two
    while True:
        recs = _served(url, CASES["restart"], answers)
        if all(r["ok"] and r["n_store_chunks"] == 0 for r in recs):
            break
        assert time.monotonic() < deadline, recs
    # It registered with the coordinator again: alive, from its new processes.
    again = {n: v for n, v in _stats(cfg_file, env).items() if n.startswith("decode-0")}
    assert again.keys() == registered.keys() and all(v[0] == "alive" for v in again.values()), again
    assert all(again[n][1] != registered[n] for n in again), (registered, again)


PACE_S = 1.0  # the pause after each answer of the scaling test's stream


def _scale(address: str, cfg_file: Path, env: dict, size: str) -> str:
    r = subprocess.run([sys.executable, "-m", "launch.cli", "scale", size, "--config", str(cfg_file), "--ray", address],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0 and "pd scale: done" in r.stdout, r.stdout + r.stderr
    return r.stdout


def test_prefill_scaled_1_2_1_under_a_stream_of_requests_none_lost(deployment, cluster):
    url, _, cfg_file, _, answers = deployment
    _, address, env, _ = cluster
    stop, results, errors = threading.Event(), [], []

    def stream() -> None:
        i = 0
        while not stop.is_set():
            c = CASES["stream"][i % len(CASES["stream"])]
            i += 1
            try:
                ids, _, pd_id = _complete(url, _prompt(*c))
                results.append((c, ids, pd_id))
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                errors.append(repr(e))
            stop.wait(PACE_S)

    # One sender, a request every PACE_S at most: with a request always in flight, the 2 cores of
    # the CI machine left prefill-1 (starting beside prefill-0 on core 0) unready after 400 s.
    senders = [threading.Thread(target=stream)]
    for t in senders:
        t.start()
    try:
        up = _scale(address, cfg_file, env, "prefill=2")
        assert "prefill-1 ready" in up, up
        n_up = len(results)
        while len(results) < n_up + 6:  # round-robin: prefill-1 takes every other prefill
            assert not errors, errors
            time.sleep(0.5)
        down = _scale(address, cfg_file, env, "prefill=1")
        assert "draining prefill-1" in down and "prefill-1 stopped" in down, down
    finally:
        stop.set()
        for t in senders:
            t.join(120)
    assert not errors, errors
    assert all(ids == answers[c] for c, ids, _ in results), "an answer differs from colocated"
    producers = {_transfer(url, pd_id)["producer"].split("/")[0] for _, _, pd_id in results[n_up:]}
    assert "prefill-1" in producers, producers
    assert len(results) >= 10
    print(f"{len(results)} requests during the scaling, none lost; prefills that served: {sorted(producers)}")


def _kill_host(h) -> int:
    """SIGKILL every process of host b (its raylet and Ray workers, the actors' vLLM): its node is
    gone; how many processes there were."""
    killed, deadline = set(), time.monotonic() + 30
    while pids := subprocess.run(["ip", "netns", "pids", h.ns_b], capture_output=True, text=True).stdout.split():
        assert time.monotonic() < deadline, f"processes of host b still alive: {pids}"
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return len(killed)


def _attempt(url: str, case: tuple[int, int]) -> tuple[int, list[int], str]:
    """``case`` sent once: (200, its token ids, "") or (the status, [], the error's message)."""
    r = requests.post(f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": _prompt(*case),
                                                     "max_tokens": GEN, "temperature": 0, "return_token_ids": True},
                      timeout=300)
    if r.status_code == 200:
        return 200, r.json()["choices"][0].get("token_ids") or [], ""
    return r.status_code, [], r.json()["error"]["message"]


def test_decode_whose_node_is_lost_is_placed_on_another_node_re_registers_and_serves(deployment, cluster, spare):
    """Last in the module: host b is gone afterwards (decode-0 runs on host c)."""
    url, _, cfg_file, log, answers = deployment
    h, _, env, _ = cluster
    c, start_node = spare
    start_node()  # host c joins the cluster, offering the decode resource as host b does
    registered = {n: p for n, (_, p) in _stats(cfg_file, env).items() if n.startswith("decode-0")}
    seen, stop, outcomes = len(log.read_text()), threading.Event(), []

    def stream() -> None:  # one request at a time, through the loss and the new placement
        while not stop.is_set():
            case = CASES["stream"][len(outcomes) % len(CASES["stream"])]
            try:
                outcomes.append((case, *_attempt(url, case)))
            except Exception as e:  # noqa: BLE001 - no answer, or one that is not JSON: reported below
                outcomes.append((case, 0, [], repr(e)))
            stop.wait(0.3)

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        while not outcomes:
            time.sleep(0.1)
        print(f"killed {_kill_host(h)} processes of host b")
        deadline = time.monotonic() + 300
        while not re.search(r"^  decode-0 +ready again", text := log.read_text()[seen:], re.M):
            assert time.monotonic() < deadline and "pdkv: stopped" not in text, text
            time.sleep(1)
        after = len(outcomes)
        while len(outcomes) < after + 3:
            assert time.monotonic() < deadline, outcomes[after:]
            time.sleep(0.2)
    finally:
        stop.set()
        sender.join(300)
    text = log.read_text()[seen:]
    assert re.search(rf"decode-0's actor on {h.addr_b} is gone", text), text
    assert re.search(rf"restarting decode-0 \(\d of 3, off node {h.addr_b} if another node", text), text
    assert f"decode-0 placed again on another node ({c.addr_b})" in text, text
    # The requests meanwhile: answered as colocated would, or refused with an error naming why.
    for case, status, ids, why in outcomes:
        if status == 200:
            assert ids == answers[case], case
        else:
            assert (status == 502 and "decode instance" in why and "unreachable" in why) or (
                status == 503 and "being restarted" in why), (status, why)
    assert [o[1] for o in outcomes[-3:]] == [200] * 3, outcomes[-3:]
    assert any(o[1] != 200 for o in outcomes), "no request saw the decode gone"  # the loss was under load
    print("answers during the loss, by status:", Counter(o[1] for o in outcomes))
    # On host c now, with the KV through Mooncake from prefill-0 on host a.
    pid = _decode_pid()
    where = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True).stdout.strip()
    assert where == c.ns_b, (pid, where)
    deadline = time.monotonic() + 60  # its connector's client is on Mooncake after a round or two
    while True:
        recs = _served(url, CASES["restart"], answers)
        if all(r["ok"] and r["n_store_chunks"] == 0 and r["consumer"].split("/")[0] == "decode-0" for r in recs):
            break
        assert time.monotonic() < deadline, recs
    # It registered with the coordinator again: alive, from its processes on host c.
    again = {n: v for n, v in _stats(cfg_file, env).items() if n.startswith("decode-0")}
    assert again.keys() == registered.keys() and all(v[0] == "alive" for v in again.values()), again
    assert all(again[n][1] != registered[n] for n in again), (registered, again)
