"""pd bench ttft --device cuda, modes lmcache_mp_disk and lmcache_mp_cpu (launch.bench.lmcache_mp):
the MP server's command line per mode, the vLLM instance beside it, the server's start / health /
status poll / stop against a stand-in server process, and the run's flow with them.

LMCache cannot be imported here (it needs torch with CUDA): ``STANDIN`` is a stand-in for LMCache
0.5.3's ``python -m lmcache.v1.multiprocess.http_server``, run as a real process. It takes the same
flags (argparse, strict: what the real server would refuse, it refuses too), serves GET /healthcheck
and GET /status in the shape of 0.5.3's, and behaves as its STANDIN_* variables say."""
from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from launch.bench import lmcache_mp, peers, ttft, ttft_gpu
from launch.procs import plan as proc_plan

STANDIN = r'''
"""Stand-in for LMCache 0.5.3's MP server (tests/unit/test_bench_lmcache_mp.py): the flags pdkv
gives it, GET /healthcheck (503 for STANDIN_UNHEALTHY_S seconds, then 200) and GET /status
(STANDIN_PENDING objects left in L1, one fewer each call; STANDIN_STATUS=bad: a body without
them); STANDIN_EXIT: fail at once with that code; STANDIN_IGNORE_SIGINT: only SIGKILL stops it."""
import argparse
import http.server
import json
import os
import signal
import sys
import time

p = argparse.ArgumentParser()
for flag in ("--host", "--http-host"):
    p.add_argument(flag, required=True)
for flag in ("--port", "--http-port", "--chunk-size", "--max-workers"):
    p.add_argument(flag, type=int, required=True)
p.add_argument("--l1-size-gb", type=float, required=True)
p.add_argument("--eviction-policy", choices=["LRU", "IsolatedLRU", "noop"], required=True)
p.add_argument("--l2-store-policy", choices=["default", "skip_l1"], default="default")
p.add_argument("--l2-adapter", action="append", type=json.loads, default=[])
p.add_argument("--disable-metrics", action="store_true")
a = p.parse_args()
if os.environ.get("STANDIN_EXIT"):
    print("ValueError: the stand-in was told to fail", flush=True)
    sys.exit(int(os.environ["STANDIN_EXIT"]))
if os.environ.get("STANDIN_IGNORE_SIGINT"):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
for adapter in a.l2_adapter:
    os.makedirs(adapter["base_path"], exist_ok=True)
    open(os.path.join(adapter["base_path"], "chunk-0"), "w").close()
t0 = time.monotonic()
pending = [int(os.environ.get("STANDIN_PENDING", "0"))]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthcheck":
            ok = time.monotonic() - t0 >= float(os.environ.get("STANDIN_UNHEALTHY_S", "0"))
            return self.answer(200 if ok else 503, {"status": "healthy" if ok else "unhealthy"})
        if self.path != "/status":
            return self.answer(404, {})
        if os.environ.get("STANDIN_STATUS") == "bad":
            return self.answer(200, {"is_healthy": True})
        n = pending[0]
        pending[0] = max(0, n - 1)
        return self.answer(200, {"is_healthy": True, "storage_manager": {
            "l1_manager": {"total_object_count": n},
            "store_controller": {"pending_keys_count": 0, "in_flight_task_count": min(n, 1)}}})

    def answer(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        print("access: " + fmt % args, flush=True)


srv = http.server.ThreadingHTTPServer((a.http_host, a.http_port), Handler)
print(f"stand-in LMCache MP server: ZMQ {a.host}:{a.port} (not bound), HTTP {a.http_host}:{a.http_port}", flush=True)
print("Retrieved 768 tokens in 0.004 seconds", flush=True)
try:
    srv.serve_forever()
except KeyboardInterrupt:
    print("stand-in: SIGINT, stopping", flush=True)
'''


def _args(*extra):
    p = argparse.ArgumentParser()
    ttft.add_arguments(p)
    return p.parse_args(["--device", "cuda", *extra])


def _model(tmp_path) -> Path:
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"max_position_embeddings": 16384}))
    (m / "tokenizer.json").write_text("{}")
    return m


def _standin(server: lmcache_mp.MPServer, tmp_path: Path, **env) -> lmcache_mp.MPServer:
    """``server`` with the stand-in in place of LMCache's module (the flags kept), STANDIN_* = ``env``."""
    script = tmp_path / "lmcache_mp_standin.py"
    script.write_text(STANDIN)
    assert server.argv[:3] == [sys.executable, "-m", lmcache_mp.SERVER_MODULE]
    server.argv = [sys.executable, str(script), *server.argv[3:]]
    server.env.update({f"STANDIN_{k.upper()}": str(v) for k, v in env.items()})
    return server


def _server(tmp_path, mode="lmcache_mp_disk", **env) -> lmcache_mp.MPServer:
    return _standin(lmcache_mp.mp_server(mode, _args(), tmp_path / "run", tmp_path / "l2"), tmp_path, **env)


def test_server_argv_per_mode(tmp_path):
    a = _args("--lmcache-chunk-size", "512", "--lmcache-cpu-gb", "8", "--lmcache-disk-gb", "30")
    cpu = lmcache_mp.server_argv("lmcache_mp_cpu", a, 5601, 8601, tmp_path / "l2")
    assert cpu == [sys.executable, "-m", "lmcache.v1.multiprocess.http_server", "--host", "127.0.0.1", "--port", "5601",
                   "--http-host", "127.0.0.1", "--http-port", "8601", "--chunk-size", "512", "--max-workers", "4",
                   "--l1-size-gb", "8", "--disable-metrics", "--eviction-policy", "LRU"]
    disk = lmcache_mp.server_argv("lmcache_mp_disk", a, 5601, 8601, tmp_path / "l2")
    assert disk[:-6] == cpu[:-2] and "--l2-adapter" not in cpu
    assert disk[-6:-1] == ["--eviction-policy", "noop", "--l2-store-policy", "skip_l1", "--l2-adapter"]
    assert json.loads(disk[-1]) == {"type": "fs_native", "base_path": str((tmp_path / "l2").resolve()),
                                    "max_capacity_gb": 30.0}  # bounded as the other modes' disks (0: unbounded)
    fs = lmcache_mp.server_argv("lmcache_mp_disk", _args("--lmcache-l2", "fs"), 1, 2, "rel")
    assert json.loads(fs[-1]) == {"type": "fs", "base_path": str(Path("rel").resolve())}
    with pytest.raises(ValueError, match="'lmcache_disk' is not an LMCache MP mode; allowed lmcache_mp_disk, "
                                         "lmcache_mp_cpu"):
        lmcache_mp.server_argv("lmcache_disk", a, 1, 2, tmp_path)


def test_mp_deployment_is_one_instance_with_the_mp_connector_and_no_prefix_cache(tmp_path):
    model = _model(tmp_path)
    for mode in lmcache_mp.MP_MODES:
        dep = peers.deployment(mode, str(model), _args(), 16384, 2, tmp_path / "s", mp_port=5678)
        assert dep.mode == "colocated" and dep.prefill.count == 1 and dep.decode.count == 0
        (inst,) = [s for s in proc_plan(dep) if "vllm.entrypoints" in " ".join(s.argv)]
        argv = inst.argv
        assert json.loads(argv[argv.index("--kv-transfer-config") + 1]) == {
            "kv_connector": "LMCacheMPConnector", "kv_connector_module_path": "lmcache.integration.vllm.lmcache_mp_connector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": 5678}}
        assert "--no-enable-prefix-caching" in argv and argv[argv.index("--block-size") + 1] == str(peers.BLOCK_SIZE)
        assert inst.env["LMCACHE_TRACK_USAGE"] == "false" and inst.env["CUDA_VISIBLE_DEVICES"] == "0"
        assert "LMCACHE_CONFIG_FILE" not in inst.env and "PDConnector" not in " ".join(argv)
    with pytest.raises(ValueError, match="lmcache_mp_cpu: no LMCache MP server port given"):
        peers.deployment("lmcache_mp_cpu", str(model), _args(), 16384, 1, tmp_path / "s")


@pytest.mark.parametrize("extra, match", [
    (["--modes", "pdkv,lmcache_mp_ssd"], "unknown lmcache_mp_ssd; allowed pdkv, pdkv_dram, lmcache_disk, lmcache_cpu, "
                                         "lmcache_mp_disk, lmcache_mp_cpu"),
    (["--modes", "lmcache_mp_cpu", "--lmcache-chunk-size", "200"],
     "--lmcache-chunk-size: 200 is not allowed with lmcache_mp_cpu; give a multiple of vLLM's block size 32"),
    (["--lmcache-mp-wait-s", "0"], "--lmcache-mp-wait-s: 0.0 is not allowed; give seconds > 0"),
])
def test_bad_mp_options_are_refused_before_any_gpu(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        ttft_gpu.plan(_args("--model", str(_model(tmp_path)), *extra))


def test_chunk_size_not_of_whole_blocks_is_fine_without_mp_modes(tmp_path):
    p = ttft_gpu.plan(_args("--model", str(_model(tmp_path)), "--modes", "lmcache_cpu", "--lmcache-chunk-size", "200"))
    assert p["modes"] == ["lmcache_cpu"]


def test_unknown_l2_adapter_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        _args("--lmcache-l2", "xfs")
    err = capsys.readouterr().err
    assert "--lmcache-l2: invalid choice: 'xfs'" in err and "fs_native" in err


def test_stored_left_reads_the_status_shape():
    def status(l1, pending, flight):
        return {"storage_manager": {"l1_manager": {"total_object_count": l1},
                                    "store_controller": {"pending_keys_count": pending, "in_flight_task_count": flight}}}
    assert lmcache_mp.stored_left(status(0, 0, 0)) == ""
    assert lmcache_mp.stored_left(status(3, 0, 1)) == "L1 objects 3, stores in flight 1"
    with pytest.raises(KeyError):
        lmcache_mp.stored_left({"is_healthy": True})


@pytest.fixture(params=["sigint_default", "sigint_ignored"])
def parent_sigint(request):
    """The test process's SIGINT as it is, or ignored (as a background job of a shell without job
    control starts: CI's `nohup ... &`): the server must stop on SIGINT either way."""
    old = signal.getsignal(signal.SIGINT)
    if request.param == "sigint_ignored":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield request.param
    signal.signal(signal.SIGINT, old)


def test_server_start_health_status_and_stop(tmp_path, parent_sigint):
    """Healthy only after its 503s; the disk writes' wait ends when /status says nothing is left;
    SIGINT stops it (also when this process ignores SIGINT); its log (in the run directory) holds
    its output and its retrieves."""
    s = _server(tmp_path, unhealthy_s=0.6, pending=3)
    assert s.argv[s.argv.index("--port") + 1] == str(s.zmq_port) and s.url.endswith(f":{s.http_port}")
    s.start(timeout_s=30)
    try:
        assert s.started_s >= 0.6 and s.exited() == ""
        with urllib.request.urlopen(f"{s.url}/healthcheck", timeout=5) as r:
            assert r.status == 200
        assert (tmp_path / "l2" / "chunk-0").exists()  # the stand-in made its "L2" where the adapter says
        got = s.wait_stored(10)
        assert set(got) == {"store_wait_ms"} and 0 < got["store_wait_ms"] < 5000
        assert s.wait_stored(10)["store_wait_ms"] < 1000  # drained: answered at once
    finally:
        how = s.stop()
    assert how == "exit code 0" and s.proc.poll() == 0
    log = (tmp_path / "run" / lmcache_mp.SERVER_LOG).read_text()
    assert "stand-in: SIGINT, stopping" in log and "GET /status" in log
    assert lmcache_mp.retrieved(s.log_path) == [768]


def test_wait_stored_times_out_and_says_what_is_left(tmp_path):
    s = _server(tmp_path, pending=10**6).start(timeout_s=30)
    try:
        t0 = time.monotonic()
        got = s.wait_stored(0.5)
        assert time.monotonic() - t0 < 3
    finally:
        s.stop()
    assert list(got) == ["store_wait_error"]
    assert got["store_wait_error"].startswith("LMCache's disk writes not done after 0.5 s (L1 objects ")
    assert "stores in flight 1); the warm send went anyway" in got["store_wait_error"]


def test_wait_stored_reports_a_status_it_cannot_read(tmp_path):
    s = _server(tmp_path, status="bad").start(timeout_s=30)
    try:
        got = s.wait_stored(0.3)
    finally:
        s.stop()
    assert f"GET {s.url}/status failed: KeyError: 'storage_manager'" in got["store_wait_error"]


def test_server_that_exits_before_it_is_healthy(tmp_path):
    s = _server(tmp_path, exit=3)
    with pytest.raises(RuntimeError, match=r"did not start: lmcache-server \(pid \d+\) exited with code 3") as e:
        s.start(timeout_s=30)
    assert "ValueError: the stand-in was told to fail" in str(e.value)  # the log's tail


def test_server_that_never_gets_healthy_is_stopped(tmp_path):
    s = _server(tmp_path, unhealthy_s=1000)
    with pytest.raises(RuntimeError, match=r"did not answer GET http://127.0.0.1:\d+/healthcheck with 200 within 1 s; "
                                           r"the tail of .*lmcache-server.log:\nstand-in LMCache MP server"):
        s.start(timeout_s=1)
    assert s.proc.poll() is not None


def test_server_that_ignores_sigint_is_killed(tmp_path):
    s = _server(tmp_path, "lmcache_mp_cpu", ignore_sigint=1).start(timeout_s=30)
    assert s.stop(grace_s=0.5) == "killed: still running 0.5 s after SIGINT" and s.proc.poll() is not None


def test_settle_waits_for_the_disk_writes_in_the_disk_mode_only_and_not_past_the_deadline():
    seen = []

    class StandInServer:
        def wait_stored(self, timeout_s):
            seen.append(timeout_s)
            return {"store_wait_ms": 1.0}

    a = _args("--settle-s", "0", "--lmcache-mp-wait-s", "30")
    assert ttft_gpu.settle_fn("lmcache_mp_cpu", a, StandInServer())() == {} and ttft_gpu.settle_fn("pdkv", a)() == {}
    assert ttft_gpu.settle_fn("lmcache_mp_disk", a, StandInServer())() == {"store_wait_ms": 1.0} and seen == [30.0]
    a.deadline = time.time() + ttft_gpu.STOP_MARGIN_S + 5
    ttft_gpu.settle_fn("lmcache_mp_disk", a, StandInServer())()
    a.deadline = time.time()  # --deadline is here: no wait (the run stops after this send, cut short)
    assert ttft_gpu.settle_fn("lmcache_mp_disk", a, StandInServer())() == {}
    assert len(seen) == 2 and 3 < seen[1] <= 5


def test_hits_of_mp_modes_come_from_the_server_log(tmp_path):
    (tmp_path / "prefill-0.log").write_text("LMCache hit tokens: 100, need to load: 100\nRetrieved 9 tokens\n")
    (tmp_path / lmcache_mp.SERVER_LOG).write_text(
        "x Retrieved 512 tokens in 0.010 seconds\nRetrieved 0 tokens in 0.000 seconds\nStored 768 tokens in 0.1 seconds\n"
        "[2026-12-08] INFO Retrieved 1024 tokens in 1.5 seconds (lmcache_driven_transfer.py:1351)\n")
    assert peers.hits_in_logs(tmp_path, "lmcache_mp_disk") == [512, 1024]
    assert peers.hits_in_logs(tmp_path, "lmcache_cpu") == [100]
    assert peers.hits_in_logs(tmp_path / "none", "lmcache_mp_cpu") == []


def test_report_lines_and_failure_of_a_wait_that_timed_out():
    a = _args()
    row = {"cold_ms": 100.0, "warm_ms": 20.0, "same": True, "cold": [1], "warm": [1], "error": ""}
    server = {"argv": [], "log": "l", "healthy_s": 12.3, "stop": "exit code 0"}
    ok = {"rows": {512: [{**row, "store_wait_ms": 40.0}, {**row, "store_wait_ms": 60.0}]}, "startup_s": 1.0,
          "hits": [512], "warmup_ms": [1.0, 1.0], "warmup_wait": {"store_wait_ms": 10.0}, "lmcache_server": server}
    assert ttft_gpu.mp_lines("lmcache_mp_disk", ok) == [
        "# lmcache_mp_disk: LMCache MP server healthy after 12 s, stopped: exit code 0",
        "# lmcache_mp_disk: waited for the server's disk writes before 3 warm sends (the warm-up's included): "
        "p50 40.0 ms, max 60.0 ms"]
    assert not ttft_gpu.failed(ok, a)
    late = {**ok, "rows": {512: [{**row, "store_wait_error": "not done after 60 s"}]}}
    assert ttft_gpu.failed(late, a) and "1 timed out, first: not done after 60 s" in ttft_gpu.mp_lines("m", late)[1]
    died = {**ok, "lmcache_server": {**server, "died": "lmcache-server (pid 1) exited with code 1"}}
    assert ttft_gpu.failed(died, a) and "it DIED during the run" in ttft_gpu.mp_lines("m", died)[0]
    assert ttft_gpu.mp_lines("pdkv", {"rows": {}}) == []


class _StandInProxy(http.server.BaseHTTPRequestHandler):
    """Streams 2 tokens that depend on the prompt (equal prompts, equal answers)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        digest = hashlib.sha256(json.dumps(body["prompt"]).encode()).digest()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(2):
            self.wfile.write(b"data: " + json.dumps({"choices": [{"text": f"t{digest[i]}", "token_ids": [digest[i]]}]})
                             .encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *a):
        pass


def test_run_gpu_flow_of_the_mp_modes_with_stand_ins(tmp_path, monkeypatch):
    """Per MP mode: its server (the stand-in) healthy before the vLLM instance (a stand-in
    deployment) starts, stopped after it; the instance reaches the server's ZMQ port; the disk mode
    waits for the writes before each warm send; hits from the server's log; L2 directory removed."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandInProxy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    events, servers = [], []

    def standin_server(mode, args, run_dir, l2_path):
        s = _standin(lmcache_mp.mp_server(mode, args, run_dir, l2_path), tmp_path, pending=2)
        stop = s.stop
        s.stop = lambda: (events.append(("server stop", mode)), stop())[1]
        servers.append((s, Path(l2_path)))
        return s

    class StandInDeployment:
        def __init__(self, dep):
            self.dep, self.proxy_url = dep, f"http://127.0.0.1:{srv.server_address[1]}"

        def start(self, progress=print):
            s = servers[-1][0]
            args = self.dep.prefill.extra_args
            kv = json.loads(args[args.index("--kv-transfer-config") + 1])
            events.append(("start", kv["kv_connector_extra_config"]["lmcache.mp.port"] == s.zmq_port, s.healthy()))

        def stop(self):
            events.append(("stop", servers[-1][0].exited() == ""))

    monkeypatch.setattr(ttft_gpu, "mp_server", standin_server)
    monkeypatch.setattr(ttft_gpu, "Deployment", StandInDeployment)
    monkeypatch.setattr(ttft_gpu, "check_ports", lambda dep: None)
    monkeypatch.setattr(ttft_gpu, "gpu_count", lambda: 1)
    out = tmp_path / "r" / "ttft.json"
    args = _args("--model", str(_model(tmp_path)), "--modes", "lmcache_mp_disk,lmcache_mp_cpu", "--lengths", "768",
                 "--prompts", "2", "--settle-s", "0", "--store-path", str(tmp_path), "--out", str(out))
    try:
        assert ttft_gpu.run_gpu(args) == 0
    finally:
        srv.shutdown()
        srv.server_close()
    assert events == [("start", True, True), ("stop", True), ("server stop", "lmcache_mp_disk"),
                      ("start", True, True), ("stop", True), ("server stop", "lmcache_mp_cpu")]
    assert all(s.proc.poll() == 0 and not l2.exists() for s, l2 in servers)  # stopped by SIGINT, L2 removed
    res = json.loads(out.read_text())["modes"]
    disk, cpu = res["lmcache_mp_disk"], res["lmcache_mp_cpu"]
    assert all("store_wait_ms" in x for x in disk["rows"]["768"]) and "store_wait_ms" in disk["warmup_wait"]
    assert not any("store_wait_ms" in x for x in cpu["rows"]["768"]) and "warmup_wait" not in cpu
    assert disk["hits"] == cpu["hits"] == [768] and disk["lmcache_server"]["stop"] == "exit code 0"
    assert disk["lmcache_server"]["log"] == str(Path(disk["run_dir"]) / lmcache_mp.SERVER_LOG)
    text = out.with_suffix(".md").read_text()
    assert "| lmcache_mp_disk | 768 | 2 |" in text and "answers equal to lmcache_mp_disk's cold ones (cold and warm " \
                                                     "sends): lmcache_mp_cpu 4 of 4" in text
    assert "# lmcache_mp_disk: waited for the server's disk writes before 3 warm sends" in text
    assert "# lmcache_mp_cpu: LMCache MP server healthy after" in text and "L2 fs_native" in text
