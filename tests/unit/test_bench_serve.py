"""pd bench serve: the workload, the per-request figures and the summary (no deployment here;
the load generator runs against real deployments in tests/integration/test_pd_e2e.py)."""
from __future__ import annotations

import pytest

from launch import cli
from launch.bench.serve_load import Result, format_table, make_workload, summarize


def test_workload_is_seeded_poisson_with_the_asked_mix():
    a = make_workload(40, 4.0, 0.25, 300, 20, 8, seed=3)
    b = make_workload(40, 4.0, 0.25, 300, 20, 8, seed=3)
    assert [(r.arrival_s, r.prompt) for r in a] == [(r.arrival_s, r.prompt) for r in b]
    assert sum(r.long for r in a) == 10
    assert all(len(r.prompt) == (300 if r.long else 20) and r.max_tokens == 8 for r in a)
    gaps = [y.arrival_s - x.arrival_s for x, y in zip(a, a[1:])]
    assert a[0].arrival_s == 0 and all(g > 0 for g in gaps)
    assert 0.1 < sum(gaps) / len(gaps) < 0.5  # mean 1/rate = 0.25 s
    assert make_workload(40, 4.0, 0.25, 300, 20, 8, seed=4)[0].prompt != a[0].prompt


@pytest.mark.parametrize("kw", [dict(n=0), dict(rate=0), dict(long_fraction=1.5), dict(max_tokens=0)])
def test_bad_workload_arguments(kw):
    args = dict(n=4, rate=1.0, long_fraction=0.5, long_tokens=10, short_tokens=5, max_tokens=4) | kw
    with pytest.raises(ValueError, match="--requests"):
        make_workload(**args)


def _res(sent, times, long=False):
    return Result(True, long, sent, token_times=list(times), text="x")


def test_per_request_figures_and_summary():
    r = _res(10.0, [10.5, 10.6, 10.8, 11.1])  # TTFT 0.5, ITL 0.1 0.2 0.3, TPOT 0.2
    assert r.ttft == pytest.approx(0.5) and r.tpot == pytest.approx(0.2)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    slow = _res(10.0, [13.0, 13.5], long=True)  # TTFT 3.0 misses a 2 s SLO
    failed = Result(False, False, 10.0, error="HTTPError")
    s = summarize([r, slow, failed], wall_s=4.0, slo_ttft_s=2.0, slo_tpot_s=0.25)
    assert s["requests"] == 3 and s["failed"] == 1 and s["slo_met"] == 1
    assert s["goodput"] == pytest.approx(0.25) and s["request_rate"] == pytest.approx(0.5)
    assert s["throughput_tok_s"] == pytest.approx(6 / 4.0)
    assert s["ttft_p50"] == pytest.approx(3.0) and s["ttft_long_p50"] == pytest.approx(3.0)
    assert s["ttft_short_p50"] == pytest.approx(0.5)
    assert s["tpot_short_p99"] == pytest.approx(0.2) and s["itl_p99"] == pytest.approx(0.5)


def test_table_has_a_ratio_column_for_pd_against_colocated():
    pd = summarize([_res(0, [0.1, 0.2])], 1.0, 1.0, 1.0)
    co = summarize([_res(0, [0.2, 0.4])], 1.0, 1.0, 1.0)
    table = format_table({"pd": pd, "colocated": co})
    assert table.splitlines()[0] == "| metric | pd | colocated | pd/colocated |"
    ttft = next(line for line in table.splitlines() if line.startswith("| TTFT p50 ms |"))
    assert ttft == "| TTFT p50 ms | 100.0 | 200.0 | 0.50 |"
    assert "pd/colocated" not in format_table({"pd": pd})
    assert format_table({"pd-1P3D": pd, "colocated-4": co}).splitlines()[0] == \
        "| metric | pd-1P3D | colocated-4 | pd-1P3D/colocated-4 |"
    assert format_table({"colocated": co, "pd": pd}).splitlines()[0] == "| metric | colocated | pd |"


def test_unknown_mode_exit_2(tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    assert cli.main(["bench", "serve", "--model", str(model), "--modes", "pd,nope"]) == 2
    assert "unknown mode 'nope'" in capsys.readouterr().err


# ---- --device cuda (launch.bench.gpu): planning, the NIXL flow, the summaries -----------------

import argparse  # noqa: E402
import http.server  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402

from launch.bench import gpu as bench_gpu  # noqa: E402
from launch.bench.serve import add_arguments  # noqa: E402
from launch.bench.serve_load import Request, send_one  # noqa: E402
from launch.procs import plan  # noqa: E402


def _gpu_args(*extra):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--device", "cuda", *extra])


@pytest.mark.parametrize("n_gpus, second", [(2, "1"), (1, "0")])
def test_gpu_modes_use_the_same_gpus(tmp_path, n_gpus, second):
    model = tmp_path / "m"
    deps = {m: bench_gpu.gpu_deployment(m, str(model), _gpu_args(), n_gpus) for m in bench_gpu.GPU_MODES}
    for mode, dep in deps.items():
        specs = {s.name: s for s in plan(dep)}
        inst = [s for s in specs.values() if "vllm.entrypoints" in " ".join(s.argv)]
        assert [s.env["CUDA_VISIBLE_DEVICES"] for s in inst] == ["0", second], mode
        assert dep.vllm.device == "cuda" and dep.vllm.load_format == "dummy"
        assert (dep.vllm.kv_cache_memory_gb > 0) == (n_gpus == 1)
        argv = " ".join(inst[1].argv)
        assert ("PDConnector" in argv) == (mode in bench_gpu.PD_MODES) and ("NixlConnector" in argv) == (mode == "nixl")
    assert deps["pd"].connector.chunk_size == 1024 and deps["colocated"].mode == "colocated"
    assert deps["pd"].proxy.first_token == "prefill" and deps["pd_old"].proxy.first_token == "decode"
    ports = [s.env.get("VLLM_NIXL_SIDE_CHANNEL_PORT") for s in plan(deps["nixl"]) if "vllm.entrypoints" in " ".join(s.argv)]
    assert len(set(ports)) == 2 and None not in ports
    with pytest.raises(ValueError, match="unknown mode 'pdx'"):
        bench_gpu.gpu_deployment("pdx", str(model), _gpu_args(), 2)


def test_gpu_dtype_reaches_every_instance(tmp_path):
    for dtype, want in (("default", "bfloat16"), ("float32", "float32")):
        for mode in ("pd", "colocated", "nixl"):
            dep = bench_gpu.gpu_deployment(mode, str(tmp_path / "m"), _gpu_args("--dtype", dtype), 1)
            inst = [s for s in plan(dep) if "vllm.entrypoints" in " ".join(s.argv)]
            assert [s.argv[s.argv.index("--dtype") + 1] for s in inst] == [want, want], (dtype, mode)
    with pytest.raises(SystemExit):
        _gpu_args("--dtype", "fp8")


class _FakeVllm(http.server.BaseHTTPRequestHandler):
    """Prefill (path /p/...) answers kv_transfer_params; decode (/d/...) streams three tokens."""
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, body))
        self.send_response(200)
        if self.path.startswith("/p/"):
            out = json.dumps({"choices": [{"text": "x"}], "kv_transfer_params": {"remote_engine_id": "e1",
                                                                                 "do_remote_prefill": True}})
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out.encode())
            return
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for t in ("a", "b", "c"):
            self.wfile.write(b"data: " + json.dumps({"choices": [{"text": t}]}).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *a):
        pass


def test_nixl_flow_prefill_then_decode_with_its_params():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeVllm)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        _FakeVllm.seen = []
        res = Result(False, False, 0.0)
        bench_gpu.nixl_send([base + "/p"], [base + "/d"])("", "m", Request(0, [5, 6], 3, False), res)
    finally:
        srv.shutdown()
    assert res.ok and res.text == "abc" and res.error == "" and len(res.token_times) == 3
    (p_path, p_body), (d_path, d_body) = _FakeVllm.seen
    assert p_path == "/p/v1/completions" and d_path == "/d/v1/completions"
    assert p_body["max_tokens"] == 1 and p_body["stream"] is False and p_body["prompt"] == [5, 6]
    assert p_body["kv_transfer_params"]["do_remote_decode"] is True
    assert p_body["kv_transfer_params"]["do_remote_prefill"] is False
    assert d_body["max_tokens"] == 3 and d_body["stream"] is True
    assert d_body["kv_transfer_params"] == {"remote_engine_id": "e1", "do_remote_prefill": True}


def test_transfer_summary_and_answers():
    recs = [{"ok": True, "long": True, "n_tokens": 8000, "n_bytes": 1_000_000_000, "load_ms": 100.0,
             "wait_ms": 10.0, "ttft_ms": 1000.0, "n_ready_parts": 4, "tail_ms": 30.0,
             "spans": {"tail": 30.0, "prefill": 900.0}, "cross_spans": {"done_to_first_token": 12.5}},
            {"ok": True, "long": True, "n_tokens": 8000, "n_bytes": 1_000_000_000, "load_ms": 100.0,
             "wait_ms": 10.0, "ttft_ms": 1000.0, "n_ready_parts": 4, "tail_ms": 40.0,
             "spans": {"tail": 40.0, "prefill": 1000.0}, "cross_spans": {"done_to_first_token": 14.5}},
            {"ok": True, "long": False, "n_tokens": 200, "n_bytes": 25_000_000, "load_ms": 5.0, "wait_ms": 1.0,
             "ttft_ms": 50.0},
            {"ok": False, "long": True, "error": "x"}]
    s = bench_gpu.transfer_summary(recs)
    assert s["failed"] == 1 and s["long"]["n"] == 2
    assert s["long"]["load_share_of_ttft_p50"] == pytest.approx(0.1) and s["long"]["gb_s_p50"] == pytest.approx(10.0)
    assert s["long"]["tail_share_of_ttft_p50"] == pytest.approx(0.035)
    table = bench_gpu.format_transfers(s)
    assert "| long | 2 | 8000 | 1000.0 | 4 | 100.0 | 10.0 | 1000.0 | 0.100 | 10.00 | 35.0 | 0.035 |" in table
    # each span of the timelines: p50 and p99 (the proxy's, the coordinator's and across clocks)
    assert s["long"]["spans"]["tail"] == {"n": 2, "p50": 35.0, "p99": 39.9}
    assert s["short"]["spans"] == {}
    assert "| span (long prompts) | n | p50 ms | p99 ms |" in table
    assert "| done_to_first_token | 2 | 13.50 | 14.48 |" in table and "| prefill | 2 | 950.00 | 999.00 |" in table
    assert bench_gpu.same_answers({"pd": ["a", "b", None], "colocated": ["a", "c", None], "nixl": ["a", "b", "d"]}) == \
        {"colocated": 1, "nixl": 2}


def test_table_with_three_modes_has_a_ratio_per_other_mode():
    f = {m: summarize([_res(0, [t, 2 * t])], 1.0, 1.0, 1.0) for m, t in (("pd", 0.1), ("colocated", 0.2), ("nixl", 0.4))}
    lines = format_table(f).splitlines()
    assert lines[0] == "| metric | pd | colocated | nixl | pd/colocated | pd/nixl |"
    assert next(x for x in lines if x.startswith("| TTFT p50 ms |")) == "| TTFT p50 ms | 100.0 | 200.0 | 400.0 | 0.50 | 0.25 |"


class _FakeProxy(http.server.BaseHTTPRequestHandler):
    """A pd proxy stand-in: streams 'abc' with an x-pd-id; answers /pd/transfers/<id>."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("x-pd-id", "id1")
        self.end_headers()
        for t in ("a", "b", "c"):
            self.wfile.write(b"data: " + json.dumps({"choices": [{"text": t}]}).encode() + b"\n\n")

    def do_GET(self):
        rec = {"pd_id": "id1", "ok": True, "n_tokens": 40, "n_bytes": 4_000_000, "load_ms": 2.0, "wait_ms": 1.0,
               "spans": {"tail": 0.5, "total": 9.0}, "cross_spans": {}}
        self.send_response(200)
        self.end_headers()
        self.wfile.write(json.dumps(rec).encode())

    def log_message(self, *a):
        pass


def test_run_gpu_end_to_end_with_stand_ins(tmp_path, monkeypatch, capsys):
    """run_gpu's flow (modes in turn, phases, answers, transfer table, JSON + .md) with fake deployments."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeProxy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    started = []

    class FakeDeployment:
        def __init__(self, dep):
            self.dep, self.proxy_url, self.run_dir = dep, url, tmp_path / "run"

        def start(self, progress=print):
            started.append(self.dep.mode)

        def stop(self):
            pass

    monkeypatch.setattr(bench_gpu, "Deployment", FakeDeployment)
    monkeypatch.setattr(bench_gpu, "check_ports", lambda dep: None)
    monkeypatch.setattr(bench_gpu, "nixl_send", lambda p, d: send_one)
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    out = tmp_path / "r.json"
    args = _gpu_args("--model", str(model), "--modes", "pd,colocated,nixl", "--gpus", "2", "--requests", "6",
                     "--rate", "50", "--long-tokens", "40", "--short-tokens", "8", "--max-tokens", "3",
                     "--sequential", "4", "--prefill-probe", "0", "--out", str(out))
    try:
        assert bench_gpu.run_gpu(args) == 0
    finally:
        srv.shutdown()
    assert started == ["pd", "colocated", "colocated"]
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"pd", "colocated", "nixl"}
    assert res["modes"]["pd"]["sequential"]["requests"] == 4 and res["modes"]["pd"]["load"]["requests"] == 6
    assert res["modes"]["pd"]["transfer_summary"]["load"]["long"]["tokens"] == 40
    text = out.with_suffix(".md").read_text()
    assert "| metric | pd | colocated | nixl | pd/colocated | pd/nixl |" in text
    assert "same answer as pd (token ids where returned): colocated 4 of 4, nixl 4 of 4" in text
    assert "colocated 6 of 6" in text
    assert "pdkv KV transfer (load" in text
    assert "| span (long prompts) | n | p50 ms | p99 ms |" in text and "| total | 2 | 9.00 | 9.00 |" in text


def test_answers_compare_by_token_ids_and_say_where_they_first_differ():
    from launch.bench.gpu import first_differences, same_answers
    from launch.bench.serve_load import Result, answer

    ids = Result(True, False, 0.0, text="ab", token_ids=[5, 6, 7])
    text_only = Result(True, False, 0.0, text="ab")
    assert answer(ids) == [5, 6, 7] and answer(text_only) == "ab"
    assert answer(Result(False, False, 0.0, text="ab")) is None
    texts = {"pd": [[1, 2, 3], [1, 2, 3], "x", None], "colocated": [[1, 2, 3], [1, 9, 3], "x", None],
             "nixl": [[1, 2], [4, 2, 3], "y", [1]]}
    assert same_answers(texts) == {"colocated": 2, "nixl": 0}
    assert first_differences(texts) == {"colocated": [1], "nixl": [2, 0]}


class _FakePrefill(http.server.BaseHTTPRequestHandler):
    """A prefill instance stand-in: streams a token, or answers JSON when not streamed."""
    bodies: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        self.send_response(200)
        self.end_headers()
        if body.get("stream"):
            for _ in range(body.get("max_tokens", 1)):
                self.wfile.write(b"data: " + json.dumps({"choices": [{"text": "t"}]}).encode() + b"\n\n")
        else:
            self.wfile.write(json.dumps({"choices": [{"text": "t", "token_ids": [3]}]}).encode())

    def log_message(self, *a):
        pass


def _against_fake_prefill(run):
    """``run(url)`` against a fresh ``_FakePrefill`` (its bodies cleared first)."""
    _FakePrefill.bodies = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakePrefill)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        return run(f"http://127.0.0.1:{srv.server_address[1]}")
    finally:
        srv.shutdown()


def test_prefill_probe_sends_fresh_prompts_both_ways():
    from launch.bench import probe as prefill_probe

    r = _against_fake_prefill(lambda url: prefill_probe.probe(url, "m", 16, n=3))
    bodies = _FakePrefill.bodies
    assert r["plain"]["n"] == r["prefill"]["n"] == 3 and r["prefill_over_plain_p50"] > 0
    assert len({tuple(b["prompt"]) for b in bodies}) == 6 and all(len(b["prompt"]) == 16 for b in bodies)
    halves = [b for b in bodies if not b["stream"]]
    assert len(halves) == 3 and all(b["kv_transfer_params"]["do_remote_decode"] and b["max_tokens"] == 1
                                    and b["return_token_ids"] for b in halves)
    assert "| 16 | 3 |" in prefill_probe.format_probe({16: r})
    with pytest.raises(ValueError, match="must be >= 1"):
        prefill_probe.probe("http://127.0.0.1:1", "m", 16, n=0)


def test_decode_floor_prefills_then_times_one_more_token():
    from launch.bench import probe

    r = _against_fake_prefill(lambda url: probe.decode_floor(url, "m", 8, n=2))
    warm, timed = _FakePrefill.bodies[0::2], _FakePrefill.bodies[1::2]
    assert [len(b["prompt"]) for b in warm] == [8, 8] and [len(b["prompt"]) for b in timed] == [9, 9]
    assert all(t["prompt"][:8] == w["prompt"] and t["max_tokens"] == 2 for w, t in zip(warm, timed))
    assert r["first_token"]["n"] == 2 and r["gap_1_2"]["p50"] >= 0
    assert "| 8 | 2 |" in probe.format_floor({8: r})


def test_the_one_at_a_time_phase_never_replays_the_load_phases_prompts():
    from launch.bench.gpu import sequential_requests

    args = _gpu_args("--requests", "8", "--sequential", "6", "--long-tokens", "30", "--short-tokens", "5")
    workload = make_workload(8, 2.0, 0.25, 30, 5, 4, 0)
    seq = sequential_requests(args)
    assert [r.long for r in seq] == [True, False] * 3 and [len(r.prompt) for r in seq[:2]] == [30, 5]
    assert not {tuple(r.prompt) for r in seq} & {tuple(r.prompt) for r in workload}
    assert [r.prompt for r in sequential_requests(args)] == [r.prompt for r in seq]  # seeded


def test_one_kind_of_prompt_makes_a_one_at_a_time_phase_of_that_kind():
    from launch.bench.gpu import sequential_requests

    only_short = sequential_requests(_gpu_args("--sequential", "4", "--long-fraction", "0", "--short-tokens", "5"))
    assert [(r.long, len(r.prompt)) for r in only_short] == [(False, 5)] * 4
    only_long = sequential_requests(_gpu_args("--sequential", "3", "--long-fraction", "1", "--long-tokens", "9"))
    assert [(r.long, len(r.prompt)) for r in only_long] == [(True, 9)] * 3


class _FakeEmptyText(http.server.BaseHTTPRequestHandler):
    """Streams token 1 with text "" (a partial UTF-8 sequence) and its id, then token 2."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.end_headers()
        for text, ids in (("", [200]), ("é", [201])):
            self.wfile.write(b"data: " + json.dumps({"choices": [{"text": text, "token_ids": ids}]}).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *a):
        pass


def test_a_token_with_empty_text_is_timed_and_kept():
    from launch.bench.serve_load import stream_into

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeEmptyText)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        res = Result(False, False, 0.0)
        stream_into(f"http://127.0.0.1:{srv.server_address[1]}", {"prompt": [1]}, res)
    finally:
        srv.shutdown()
    assert res.ok and len(res.token_times) == 2 and res.token_ids == [200, 201] and res.text == "é"
