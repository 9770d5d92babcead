"""pd bench ttft --device cuda (launch.bench.peers, launch.bench.ttft_gpu): the deployments, LMCache
YAML and vLLM command lines of each mode, the refusals, and the run's flow against a stand-in proxy
(LMCache and GPUs are not here: the GPU run is scripts/gpu/lmcache.sh)."""
from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from launch.bench import peers, ttft, ttft_gpu, vllm_bench
from launch.procs import plan as proc_plan


def _args(*extra):
    p = argparse.ArgumentParser()
    ttft.add_arguments(p)
    return p.parse_args(["--device", "cuda", *extra])


def _model(tmp_path, max_position=16384) -> Path:
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"max_position_embeddings": max_position}))
    (m / "tokenizer.json").write_text("{}")
    return m


def _instances(dep):
    return [s for s in proc_plan(dep) if "vllm.entrypoints" in " ".join(s.argv)]


def test_lmcache_yaml_per_mode(tmp_path):
    a = _args("--lmcache-chunk-size", "512", "--lmcache-cpu-gb", "8", "--lmcache-disk-gb", "30")
    disk = peers.lmcache_config("lmcache_disk", a, tmp_path / "d")
    cpu = peers.lmcache_config("lmcache_cpu", a, tmp_path / "d")
    assert disk == {"chunk_size": 512, "max_local_cpu_size": 8.0, "save_unfull_chunk": False,
                    "internal_api_server_enabled": False, "local_cpu": False,
                    "local_disk": f"file://{(tmp_path / 'd').resolve()}/", "max_local_disk_size": 30.0}
    assert cpu["local_cpu"] is True and "local_disk" not in cpu and cpu["max_local_cpu_size"] == 8.0
    path = peers.write_lmcache_config(tmp_path / "run" / "lmcache.yaml", disk)
    assert yaml.safe_load(path.read_text()) == disk
    with pytest.raises(ValueError, match="not an LMCache mode"):
        peers.lmcache_config("pdkv", a, tmp_path)


def test_lmcache_deployment_is_one_instance_with_lmcache_connector_and_no_prefix_cache(tmp_path):
    model = _model(tmp_path)
    y = tmp_path / "lmcache.yaml"
    dep = peers.deployment("lmcache_disk", str(model), _args(), 16384, 1, tmp_path / "s", y)
    assert dep.mode == "colocated" and dep.prefill.count == 1 and dep.decode.count == 0
    (inst,) = _instances(dep)
    argv = inst.argv
    kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert kv == {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    assert "--no-enable-prefix-caching" in argv and "--enforce-eager" in argv
    assert argv[argv.index("--max-model-len") + 1] == "16384"
    assert inst.env["LMCACHE_CONFIG_FILE"] == str(y.resolve()) and inst.env["LMCACHE_TRACK_USAGE"] == "false"
    assert inst.env["CUDA_VISIBLE_DEVICES"] == "0" and inst.env["PYTHONHASHSEED"] == "0"
    assert "PDConnector" not in " ".join(argv)
    with pytest.raises(ValueError, match="no LMCache config file"):
        peers.deployment("lmcache_cpu", str(model), _args(), 16384, 1, tmp_path / "s")


@pytest.mark.parametrize("n_gpus, second", [(1, "0"), (2, "1")])
def test_pdkv_modes_are_1p1d_with_the_store_and_no_prefix_cache(tmp_path, n_gpus, second):
    model = _model(tmp_path)
    a = _args("--chunk-size", "512", "--store-gb", "20", "--dram-gb", "6", "--read-threads", "12", "--io-threads", "4")
    plain = peers.deployment("pdkv", str(model), a, 8192, n_gpus, tmp_path / "s")
    dram = peers.deployment("pdkv_dram", str(model), a, 8192, n_gpus, tmp_path / "s")
    for dep in (plain, dram):
        insts = _instances(dep)
        assert [i.env["CUDA_VISIBLE_DEVICES"] for i in insts] == ["0", second]
        for inst in insts:
            argv = " ".join(inst.argv)
            assert "PDConnector" in argv and "--no-enable-prefix-caching" in argv and "LMCache" not in argv
            assert "--max-num-batched-tokens" not in argv  # vLLM's own step, as the LMCache instance
        s = dep.connector.store
        assert (s.backend, s.paths, s.size_gb, dep.connector.chunk_size) == ("local", [str(tmp_path / "s")], 20.0, 512)
    assert plain.connector.store.dram_gb == 0 and dram.connector.store.dram_gb == 6.0
    assert {(d.connector.store.read_threads, d.connector.io_threads) for d in (plain, dram)} == {(12, 4)}
    assert plain.connector.store.queue_mb == peers.STORE_QUEUE_MB == 4096


@pytest.mark.parametrize("extra, match", [
    (["--modes", "pdkv,nixl"], "unknown nixl"),
    (["--modes", "pdkv,pdkv"], "names a mode twice"),
    (["--modes", ","], "none given"),
    (["--lengths", "2048,lots"], "'lots' is not a token count"),
    (["--lengths", "300"], "300 tokens is not allowed; allowed 512..16360"),
    (["--lengths", "20000"], "20000 tokens is not allowed"),
    (["--backend", "hf3fs"], "--backend hf3fs is not allowed here"),
    (["--lmcache-disk-gb", "0"], "--lmcache-disk-gb: 0.0 is not allowed"),
    (["--prompts", "0"], "--prompts: 0 is not allowed"),
    (["--settle-s", "-1"], "negative seconds"),
    (["--read-threads", "0"], "--read-threads: 0 is not allowed; at least 1"),
    (["--io-threads", "65"], "--io-threads: 65 is not allowed; at most 64"),
    (["--vllm-bench", "5", "--tokens", "16300", "--output-tokens", "128"], "--vllm-bench: --tokens 16300"),
])
def test_bad_options_are_refused_before_any_gpu(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        ttft_gpu.plan(_args("--model", str(_model(tmp_path)), *extra))


def test_plan_lengths_max_and_prompts(tmp_path):
    p = ttft_gpu.plan(_args("--model", str(_model(tmp_path, 4096)), "--lengths", "1024,max,1024", "--prompts", "2"))
    assert p["max_model_len"] == 4096 and p["lengths"] == [1024, 4096 - 16 - 8]
    assert [len(x) for x in p["prompts"][1024]] == [1024, 1024]
    assert p["prompts"][1024][0][:256] != p["prompts"][1024][1][:256]
    assert ttft_gpu.prompts([1024], 2, 0)[1024] == p["prompts"][1024]
    assert ttft_gpu.prompts([1024], 2, 1)[1024] != p["prompts"][1024]
    with pytest.raises(ValueError, match="cannot read max_position_embeddings"):
        bare = tmp_path / "bare"
        bare.mkdir()
        (bare / "config.json").write_text("{}")
        (bare / "tokenizer.json").write_text("{}")
        ttft_gpu.plan(_args("--model", str(bare)))


def test_ratios_pdkv_over_lmcache_per_length():
    rows = lambda c, w: {"rows": {2048: [{"cold_ms": c, "warm_ms": w}, {"cold_ms": c, "warm_ms": w}]}}  # noqa: E731
    lines = ttft_gpu.ratio_lines({"pdkv": rows(400.0, 30.0), "lmcache_disk": rows(500.0, 60.0),
                                  "lmcache_cpu": rows(None, 20.0)})
    assert "| pdkv / lmcache_disk | 2048 | 0.80 | 0.50 |" in lines and "| pdkv / lmcache_cpu | 2048 | - | 1.50 |" in lines
    assert ttft_gpu.ratio_lines({"pdkv": rows(1.0, 1.0)}) == []


def test_hits_in_logs(tmp_path):
    (tmp_path / "instance-0.log").write_text(
        "x LMCache hit tokens: 0, need to load: 0\nReqid: 3, Total tokens 2048, LMCache hit tokens: 2047, need\n")
    (tmp_path / "prefill-0.log").write_text("req a: loaded a 1792-token prefix from the store in 3.0 ms\n")
    assert peers.hits_in_logs(tmp_path, "lmcache_cpu") == [2047]
    assert peers.hits_in_logs(tmp_path, "pdkv") == [1792]


class _StandInProxy(http.server.BaseHTTPRequestHandler):
    """Streams 3 tokens that depend on the prompt (so equal prompts give equal answers) with their ids."""
    prompts: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.prompts.append(len(body["prompt"]))
        digest = hashlib.sha256(json.dumps(body["prompt"]).encode()).digest()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(3):
            chunk = {"choices": [{"text": f"t{digest[i]}", "token_ids": [digest[i]]}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *a):
        pass


def test_run_gpu_flow_with_stand_ins(tmp_path, monkeypatch):
    """Modes in turn, LMCache's YAML in the run directory, cold and warm sends per prompt, answers
    compared, hits read from the logs, stores removed, JSON + .md written."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandInProxy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    seen = []

    class StandInDeployment:
        def __init__(self, dep):
            self.dep, self.proxy_url = dep, url

        def start(self, progress=print):
            run = Path(self.dep.run_dir)
            run.mkdir(parents=True, exist_ok=True)
            if self.dep.mode == "colocated":
                env = dict(e.split("=", 1) for e in self.dep.prefill.env)
                seen.append(("lmcache", yaml.safe_load(Path(env["LMCACHE_CONFIG_FILE"]).read_text())))
                (run / "instance-0.log").write_text("LMCache hit tokens: 767, need to load: 767\n")
            else:
                seen.append(("pdkv", self.dep.connector.store.paths[0]))

        def stop(self):
            pass

    monkeypatch.setattr(ttft_gpu, "Deployment", StandInDeployment)
    monkeypatch.setattr(ttft_gpu, "check_ports", lambda dep: None)
    monkeypatch.setattr(ttft_gpu, "gpu_count", lambda: 1)
    out = tmp_path / "r" / "ttft.json"
    args = _args("--model", str(_model(tmp_path)), "--modes", "pdkv,lmcache_disk,lmcache_cpu", "--lengths",
                 "768,1024", "--prompts", "2", "--settle-s", "0", "--store-path", str(tmp_path),
                 "--out", str(out))
    _StandInProxy.prompts = []
    try:
        assert ttft_gpu.run_gpu(args) == 0
    finally:
        srv.shutdown()
    assert [k for k, _ in seen] == ["pdkv", "lmcache", "lmcache"]
    assert seen[1][1]["local_cpu"] is False and seen[2][1]["local_cpu"] is True
    assert not Path(seen[0][1]).exists() and not list(tmp_path.glob("lmcache_*-*"))  # stores removed
    per_mode = [ttft_gpu.WARMUP_TOKENS] * 2 + [768] * 4 + [1024] * 4
    assert _StandInProxy.prompts == per_mode * 3
    res = json.loads(out.read_text())
    assert res["lengths"] == [768, 1024] and res["max_model_len"] == 16384
    rows = res["modes"]["lmcache_cpu"]["rows"]["1024"]
    assert len(rows) == 2 and all(r["same"] and r["cold_ms"] > 0 and r["warm_ms"] > 0 for r in rows)
    assert res["modes"]["lmcache_disk"]["hits"] == [767] and res["modes"]["pdkv"]["hits"] == []
    text = out.with_suffix(".md").read_text()
    assert "| lmcache_disk | 768 | 2 |" in text and "2 of 2 |" in text
    assert "answers equal to pdkv's cold ones (cold and warm sends): lmcache_disk 8 of 8, lmcache_cpu 8 of 8" in text
    assert "| pdkv / LMCache (TTFT p50) | tokens | cold | warm |" in text
    assert "| pdkv / lmcache_disk | 768 |" in text and "| pdkv / lmcache_cpu | 1024 |" in text
    assert "pdkv_dram / lmcache_cpu" not in text  # pdkv_dram did not run
    assert "# lmcache_disk: warm loads in the logs (prefix tokens): [767]" in text and "4 distinct answers to 4 prompts" in text


def test_deadline_skips_modes_and_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(ttft_gpu, "gpu_count", lambda: 1)
    out = tmp_path / "r.json"
    args = _args("--model", str(_model(tmp_path)), "--deadline", str(time.time() + 10), "--out", str(out))
    assert ttft_gpu.run_gpu(args) == 1
    res = json.loads(out.read_text())
    assert all("skipped" in r for r in res["modes"].values()) and list(res["modes"]) == ["pdkv", "lmcache_disk",
                                                                                           "lmcache_cpu"]
    assert "| pdkv | - | - | - | - | - | skipped: less than 100 s left before --deadline | - |" in out.with_suffix(".md").read_text()


# ---- pd bench serve --device cuda --modes lmcache_pd (launch.bench.lmcache_pd) ----------------------

import msgspec  # noqa: E402
import zmq  # noqa: E402

from launch.bench import gpu as bench_gpu  # noqa: E402
from launch.bench import lmcache_pd  # noqa: E402
from launch.bench.common import free_ports  # noqa: E402
from launch.bench.serve import add_arguments as serve_arguments  # noqa: E402
from launch.bench.serve_load import Request, Result  # noqa: E402


class _ProxyNotifDouble(msgspec.Struct, tag="ProxyNotif"):
    """A test double of LMCache's pd_backend.ProxyNotif (a tagged msgspec struct, sent as msgpack)."""
    req_id: str


def _serve_args(*extra):
    p = argparse.ArgumentParser()
    serve_arguments(p)
    return p.parse_args(["--device", "cuda", *extra])


def test_lmcache_pd_configs_sender_and_receiver():
    c = lmcache_pd.configs(2.0)
    for cfg in c.values():
        assert cfg["enable_pd"] and cfg["transfer_channel"] == "nixl" and cfg["pd_buffer_device"] == "cuda"
        assert cfg["pd_buffer_size"] == 2 << 30 and cfg["save_unfull_chunk"] and cfg["local_cpu"] is False
    assert c["prefill"]["pd_role"] == "sender" and c["prefill"]["pd_proxy_port"] == lmcache_pd.PROXY_PORT
    assert c["decode"]["pd_role"] == "receiver" and c["decode"]["pd_peer_init_port"] == [lmcache_pd.INIT_PORT]
    assert c["decode"]["pd_peer_alloc_port"] == [lmcache_pd.ALLOC_PORT]


def test_lmcache_pd_deployment_producer_and_consumer(tmp_path):
    a = _serve_args("--port", "8123")
    dep = bench_gpu.gpu_deployment(lmcache_pd.MODE, str(tmp_path / "m"), a, 1)
    p, d = _instances(dep)
    conf = lmcache_pd.conf_dir(8123)
    for inst, role, group in ((p, "kv_producer", "prefill"), (d, "kv_consumer", "decode")):
        kv = json.loads(inst.argv[inst.argv.index("--kv-transfer-config") + 1])
        assert (kv["kv_connector"], kv["kv_role"]) == ("LMCacheConnectorV1", role)
        assert kv["kv_connector_extra_config"]["discard_partial_chunks"] is False
        assert inst.env["LMCACHE_CONFIG_FILE"] == str(conf / f"lmcache-{group}.yaml")
        assert inst.env["CUDA_VISIBLE_DEVICES"] == "0"
    paths = lmcache_pd.write_configs(tmp_path / "c", 1.0)
    assert yaml.safe_load(paths["decode"].read_text())["pd_role"] == "receiver"
    with pytest.raises(ValueError, match="--modes lmcache_pd: runs 1P1D only, not 1P2D"):
        bench_gpu.gpu_deployment(lmcache_pd.MODE, str(tmp_path / "m"), a, 1, 1, 2)


def test_notifications_wait_for_the_senders_push():
    (port,) = free_ports("127.0.0.1", 1)
    notes = lmcache_pd.Notifications(port)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send(msgspec.msgpack.encode(_ProxyNotifDouble(req_id="r1")))
        assert notes.wait("r1", 10.0)
        assert not notes.wait("r2", 0.3)
    finally:
        push.close(linger=0)
        ctx.term()
        notes.close()


def test_lmcache_pd_send_prefills_waits_then_streams_from_decode():
    (port,) = free_ports("127.0.0.1", 1)
    notes = lmcache_pd.Notifications(port)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    seen = []

    class StandIn(http.server.BaseHTTPRequestHandler):
        """/p: the prefill instance (its LMCache notifies the proxy); /d: the decode instance."""

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            self.send_response(200)
            self.end_headers()
            if self.path.startswith("/p/"):
                push.send(msgspec.msgpack.encode(_ProxyNotifDouble(req_id=body["kv_transfer_params"]["disagg_spec"]["req_id"])))
                self.wfile.write(json.dumps({"choices": [{"text": "x"}], "kv_transfer_params": {"first_tok": 5}}).encode())
                return
            for t in ("a", "b"):
                self.wfile.write(b"data: " + json.dumps({"choices": [{"text": t, "token_ids": [ord(t)]}]}).encode() + b"\n\n")

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        send = lmcache_pd.send_fn([f"{base}/p"], [f"{base}/d"], notes)
        res = Result(False, True, 0.0)
        send("unused", "m", Request(0.0, [11, 12, 13], 2, True), res)
    finally:
        srv.shutdown()
        push.close(linger=0)
        ctx.term()
        notes.close()
    assert res.ok and not res.error and res.text == "ab" and res.token_ids == [97, 98]
    (p_path, p_body), (d_path, d_body) = seen
    assert p_path == "/p/v1/completions" and p_body["max_tokens"] == 1 and p_body["stream"] is False
    spec = p_body["kv_transfer_params"]["disagg_spec"]
    assert spec["receiver_init_port"] == [lmcache_pd.INIT_PORT] and spec["receiver_alloc_port"] == [lmcache_pd.ALLOC_PORT]
    assert d_path == "/d/v1/completions" and d_body["stream"] is True and "kv_transfer_params" not in d_body
    assert d_body["prompt"] == [11, 12, 13] and d_body["max_tokens"] == 2


def test_vllm_bench_on_the_gpu_keeps_the_modes_rows_when_it_fails_or_has_no_time(tmp_path, monkeypatch):
    """``--vllm-bench`` after a mode's prompts: its failure (or a --deadline too near) is reported
    beside the mode's own rows, which stay; each run gets half the time left."""
    a = _args("--model", str(_model(tmp_path)), "--vllm-bench", "3", "--tokens", "512")
    a.deadline = time.time() + 40
    assert ttft_gpu.vllm_bench_runs("http://x", "m", "/m", a) == {
        "vllm_bench_error": "skipped: --deadline leaves too little time"}
    a.deadline, seen = 0, []

    def fail(cmd, pause_s, timeout_s, between=None):
        seen.append(timeout_s)
        raise RuntimeError("vllm bench serve failed (exit 1):\nboom")

    monkeypatch.setattr(ttft_gpu, "cold_then_warm", fail)
    got = ttft_gpu.vllm_bench_runs("http://x", "m", "/m", a)
    assert got == {"vllm_bench_error": "RuntimeError: vllm bench serve failed (exit 1):\nboom"} and seen == [1800.0]
    rows = {"rows": {512: [{"cold_ms": 100.0, "warm_ms": 20.0, "same": True, "cold": [1], "warm": [1], "error": ""}]},
            "startup_s": 1.0, "hits": [], "warmup_ms": [1.0, 1.0]}
    text = ttft_gpu.format_report("# h", {"pdkv": {**rows, **got}})
    assert "| pdkv | 512 | 1 | 100.0 | 20.0 |" in text and "vllm bench serve (seed 004's workflow): RuntimeError" in text
    ok = {"completed": 3, "failed": 0, "mean_ttft_ms": 9.0, "median_ttft_ms": 9.0, "p99_ttft_ms": 9.0,
          "median_tpot_ms": 1.0}
    text = ttft_gpu.format_report("# h", {"pdkv": {**rows, "vllm_bench": {"cold": ok, "warm": ok}}})
    assert "## pdkv: vllm bench serve (seed 004's workflow), cold then warm" in text
    assert vllm_bench.report({"cold": ok, "warm": ok}, "run") in text


def test_vllm_bench_on_the_gpu_waits_for_the_stores_writes_between_its_runs(tmp_path, monkeypatch):
    """Between the cold and the warm run the mode's settle runs (lmcache_mp_disk: its wait for the
    disk writes), its result kept beside the runs; a timeout there fails the run; the runs' time
    under --deadline leaves room for that wait."""
    a = _args("--model", str(_model(tmp_path)), "--vllm-bench", "3", "--tokens", "512")
    ok = {"completed": 3, "failed": 0, "mean_ttft_ms": 9.0, "median_ttft_ms": 9.0, "p99_ttft_ms": 9.0,
          "median_tpot_ms": 1.0}
    order = []
    monkeypatch.setattr(vllm_bench, "run_once", lambda cmd, timeout_s: order.append("run") or dict(ok))
    monkeypatch.setattr(vllm_bench.time, "sleep", lambda s: order.append(f"sleep {s:g}"))
    got = ttft_gpu.vllm_bench_runs("http://x", "m", "/m", a, lambda: order.append("settle") or {"store_wait_ms": 5.0})
    assert order == ["run", "settle", "run"]
    assert got == {"vllm_bench": {"cold": ok, "warm": ok}, "vllm_bench_wait": {"store_wait_ms": 5.0}}
    order.clear()
    assert ttft_gpu.vllm_bench_runs("http://x", "m", "/m", a) == {"vllm_bench": {"cold": ok, "warm": ok}}
    assert order == ["run", f"sleep {a.settle_s:g}", "run"]  # no settle given: the pause alone
    rows = {"rows": {512: [{"cold_ms": 100.0, "warm_ms": 20.0, "same": True, "cold": [1], "warm": [1], "error": ""}]}}
    assert not ttft_gpu.failed({**rows, **got}, a)
    timed_out = {**got, "vllm_bench_wait": {"store_wait_error": "LMCache's disk writes not done after 60 s"}}
    assert ttft_gpu.failed({**rows, **timed_out}, a)
    seen = []
    monkeypatch.setattr(ttft_gpu, "cold_then_warm", lambda cmd, pause_s, timeout_s, between=None: seen.append(timeout_s) or {})
    a.deadline, a.settle_s, a.lmcache_mp_wait_s = time.time() + ttft_gpu.STOP_MARGIN_S + 400, 2.0, 60.0
    ttft_gpu.vllm_bench_runs("http://x", "m", "/m", a, lambda: {})
    ttft_gpu.vllm_bench_runs("http://x", "m", "/m", a)
    assert 168 < seen[0] < 170 and 198 < seen[1] < 200  # (400 - 2 - 60) / 2, (400 - 2) / 2

