"""pd bench serve's sweep (rates x workloads x modes at xPyD splits), its report and plots, with a
stand-in proxy (a real HTTP server that streams tokens) in place of vLLM deployments."""
from __future__ import annotations

import argparse
import http.server
import io
import json
import re
import threading

import pytest

from common.config import load, merge
from launch import cli, gpus
from launch.bench import gpu as bench_gpu
from launch.bench import plot as bench_plot
from launch.bench import sweep
from launch.bench.modes import Variant, cpu_deployment, units, variants
from launch.bench.serve import add_arguments
from launch.bench.serve_load import Progress, Result
from launch.bench.sweep_report import sustained, sustained_table, with_slos
from launch.bench.workloads import WORKLOADS, make_requests, parse_rates, parse_splits, parse_workloads
from launch.procs import plan
from pd.config import DeploymentConfig


def _args(*extra):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(extra))


@pytest.fixture
def model(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    (m / "tokenizer.json").write_text("{}")
    return m


# ---- the specs: rates, workloads, splits ------------------------------------------------------

def test_rates_workloads_and_splits_parse():
    assert parse_rates("1, 2,4.5") == [1.0, 2.0, 4.5]
    assert [w.name for w in parse_workloads("chat,longdoc,decode_heavy", _args())] == ["chat", "longdoc", "decode_heavy"]
    custom = parse_workloads("custom", _args("--long-fraction", "0.5", "--long-tokens", "300"))[0]
    assert [m.prompt for m in custom.mixes] == [(300, 300), (128, 128)] and custom.slo_ttft_ms == 2000
    reqs = make_requests(custom, 20, 2.0, 0.2, "0/0")  # custom lengths are tokens: --length-scale leaves them
    assert {len(r.prompt) for r in reqs} == {300, 128} and {r.max_tokens for r in reqs} == {64}
    assert [r.long for r in reqs] == [len(r.prompt) == 300 for r in reqs]
    assert parse_splits("1P1D,1p3d,2P2D,3P1D") == [(1, 1), (1, 3), (2, 2), (3, 1)]


@pytest.mark.parametrize("text", ["0", "-1", "x", "", "1,,2", "inf", "nan", "2,2"])
def test_bad_rates_are_refused(text):
    with pytest.raises(ValueError, match="--rates: .*(not allowed; give request rates per second > 0|given twice)"):
        parse_rates(text)


@pytest.mark.parametrize("text, needle", [("chat,nope", "unknown workload 'nope'; allowed: chat, longdoc, "
                                                         "decode_heavy, custom"),
                                          ("chat,chat", "'chat' is given twice"), (" , ", "names no workload")])
def test_bad_workloads_are_refused(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_workloads(text, _args())


@pytest.mark.parametrize("text", ["1P0D", "0P1D", "PD", "1P1", "40P40D", "1P1D,1p1d"])
def test_bad_splits_are_refused(text):
    with pytest.raises(ValueError, match="--split: .*(x, y >= 1|given twice)"):
        parse_splits(text)


def test_requests_follow_the_workload_the_scale_and_the_seed():
    w = WORKLOADS["longdoc"]
    full = make_requests(w, 40, 4.0, 1.0, "0/0")
    assert all(4096 <= len(r.prompt) <= 8192 and 128 <= r.max_tokens <= 512 for r in full)
    assert {r.long for r in full} == {True, False}  # long from 6144 tokens
    small = make_requests(w, 40, 4.0, 0.1, "0/0")
    assert all(410 <= len(r.prompt) <= 819 and 13 <= r.max_tokens <= 51 for r in small)
    again, faster = make_requests(w, 40, 4.0, 0.1, "0/0"), make_requests(w, 40, 8.0, 0.1, "0/0")
    assert [r.prompt for r in again] == [r.prompt for r in small] == [r.prompt for r in faster]
    assert faster[-1].arrival_s == pytest.approx(small[-1].arrival_s / 2)  # same draws, twice the rate
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(small, small[1:])]
    assert small[0].arrival_s == 0 and 0.1 < sum(gaps) / len(gaps) < 0.5  # mean 1/rate = 0.25 s
    assert make_requests(w, 40, 4.0, 0.1, "0/1")[0].prompt != small[0].prompt  # the next rate: new prompts
    heavy = make_requests(WORKLOADS["decode_heavy"], 20, 1.0, 1.0, "s")
    assert all(64 <= len(r.prompt) <= 256 and 512 <= r.max_tokens <= 1024 for r in heavy)


# ---- xPyD: the modes at each split, and where their instances go ------------------------------

def test_variants_keep_the_old_names_at_1p1d_and_label_splits():
    assert [(v.label, v.instances) for v in variants(["pd", "colocated"], [(1, 1)], None)] == \
        [("pd", 2), ("colocated", 2)]
    vs = variants(["pd", "colocated"], [(1, 1), (1, 3), (2, 2)], None)
    assert [(v.label, v.prefill, v.decode) for v in vs] == [
        ("pd-1P1D", 1, 1), ("pd-1P3D", 1, 3), ("pd-2P2D", 2, 2), ("colocated-2", 2, 0), ("colocated-4", 4, 0)]
    assert [v.label for v in variants(["colocated", "pd"], [(3, 1)], 3)] == ["colocated-3", "pd-3P1D"]
    with pytest.raises(ValueError, match="--colocated: 0 is not allowed"):
        variants(["pd", "colocated"], [(1, 1)], 0)
    with pytest.raises(ValueError, match="names a mode twice"):
        variants(["pd", "pd"], [(1, 1)], None)


def _instances(dep):
    return [s for s in plan(dep) if "vllm.entrypoints" in " ".join(s.argv)]


def test_cpu_deployments_of_splits(model):
    args = _args("--port", "8000")
    pd13 = cpu_deployment(Variant("pd-1P3D", "pd", 1, 3), str(model), args)
    assert [s.name for s in _instances(pd13)] == ["prefill-0", "decode-0", "decode-1", "decode-2"]
    co = cpu_deployment(Variant("colocated-4", "colocated", 4, 0), str(model), args)
    assert len(_instances(co)) == 4 and co.mode == "colocated"
    with pytest.raises(ValueError, match="unknown mode 'nixl'; allowed pd, colocated, pd_old"):
        cpu_deployment(Variant("nixl", "nixl", 1, 1), str(model), args)
    assert units(Variant("pd-1P3D", "pd", 1, 3), "cpu", 0) == 4
    assert units(Variant("pd-1P3D", "pd", 1, 3), "cuda", 2) == 2


@pytest.mark.parametrize("split, n_gpus, want, kv_gb", [((1, 3), 4, ["0", "1", "2", "3"], 0.0),
                                                          ((3, 1), 4, ["0", "1", "2", "3"], 0.0),
                                                          ((2, 2), 2, ["0", "1", "0", "1"], 24.0),
                                                          ((1, 1), 1, ["0", "0"], 24.0)])
def test_gpu_splits_map_instances_to_gpus(model, split, n_gpus, want, kv_gb):
    args = _args("--device", "cuda")
    dep = bench_gpu.gpu_deployment("pd", str(model), args, n_gpus, *split)
    inst = _instances(dep)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in inst] == want
    assert [s.name.split("-")[0] for s in inst] == ["prefill"] * split[0] + ["decode"] * split[1]
    assert dep.vllm.kv_cache_memory_gb == kv_gb
    p_urls, d_urls = bench_gpu.instance_urls(dep)
    assert p_urls == [f"http://127.0.0.1:{8100 + i}" for i in range(split[0])]
    assert d_urls == [f"http://127.0.0.1:{8200 + i}" for i in range(split[1])]
    co = bench_gpu.gpu_deployment("colocated", str(model), args, n_gpus, sum(split), 0)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in _instances(co)] == want
    with pytest.raises(ValueError, match="nixl: runs 1P1D only"):
        bench_gpu.gpu_deployment("nixl", str(model), args, 4, 1, 3)


def test_pd_launch_spreads_an_xpyd_split_over_the_gpus(model, monkeypatch):
    """pd launch --prefill x --decode y on cuda: one GPU per instance, round-robin (launch.gpus)."""
    monkeypatch.setattr(gpus, "gpu_count", lambda: 4)
    for p, d in ((1, 3), (2, 2), (3, 1)):
        dep = merge(load(DeploymentConfig, {}), {"model": str(model), "vllm": {"device": "cuda"},
                                                 "prefill": {"count": p}, "decode": {"count": d}})
        assert sorted(s.env["CUDA_VISIBLE_DEVICES"] for s in _instances(dep)) == ["0", "1", "2", "3"]


# ---- per rate: attainment, goodput per unit, the sustained rate --------------------------------

def _res(sent, times, ok=True):
    return Result(ok, False, sent, token_times=list(times), text="x" if ok else "", error="" if ok else "boom")


def test_rate_entry_and_the_sustained_rate():
    results = [_res(0, [0.1, 0.2, 0.3]), _res(0, [0.5, 0.6]), _res(0, [0.1, 0.9]), _res(0, [], ok=False)]
    e = sweep.rate_entry(2.0, results, 2.0, (200.0, 250.0), 2)  # SLOs in ms
    assert e["slo_attainment"] == pytest.approx(0.25)  # TTFT 0.5 s and TPOT 0.8 s miss; the failed one too
    assert e["goodput_per_unit"] == pytest.approx(1 / 2.0 / 2)
    assert e["ttft_ms"] == pytest.approx([100, 500, 100, None]) and e["tpot_ms"][3] is None
    assert e["errors"] == ["boom"] and e["summary"]["failed"] == 1
    rates = [{"rate": r, "slo_attainment": a} for r, a in ((4, 0.95), (1, 1.0), (2, 0.9), (8, 0.5), (16, 0.95))]
    assert sustained(rates, 0.9) == 4  # 16 meets it again, but 8 did not
    assert sustained(rates, 0.99) == 1 and sustained([{"rate": 1, "slo_attainment": 0.1}], 0.9) == 0
    wres = {"modes": {"pd": {"mode": "pd", "split": "1P1D", "instances": 2, "units": 2, "rates": rates[:2],
                             "sustained_rate": 0.0, "sustained_rate_per_unit": 0.0},
                      "colocated": {"mode": "colocated", "split": "2 colocated", "instances": 2, "units": 2,
                                    "rates": rates[:1], "sustained_rate": 4, "sustained_rate_per_unit": 2.0}}}
    assert sustained_table(wres, "GPU", 0.9)[2:] == ["| pd | 1P1D | 2 | none (below at 1/s) | 0.000 | 0.00 (colocated) |",
                                                     "| colocated | 2 colocated | 2 | 4 | 2.000 | - |"]
    wres["modes"]["colocated"]["error"] = "RuntimeError: gone"  # stopped after its first rate
    assert sustained_table(wres, "GPU", 0.9)[3] == "| colocated | 2 colocated | 2 | 4, then failed after 4/s | 2.000 | - |"


def test_progress_is_a_line_per_tenth_off_a_terminal_and_one_redrawn_line_on_it():
    out = io.StringIO()
    p = Progress("[chat] pd at 2/s", 20, 2.0, stream=out)
    for i in range(20):
        p.tick(ok=i != 3)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("[chat] pd at 2/s: 20/20 done (1 failed), 2/s sent")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    now = [0.0]
    tty = Tty()
    p = Progress("x", 30, 1.0, stream=tty, clock=lambda: now[0])
    for _ in range(30):
        now[0] += 0.25
        p.tick(ok=True)
    text = tty.getvalue()
    assert text.count("\r") == 9 and text.endswith("x: 30/30 done (0 failed), 1/s sent, 4.00/s done, 8 s\n")


# ---- the whole sweep against a stand-in proxy ---------------------------------------------------

class _StandInProxy(http.server.BaseHTTPRequestHandler):
    """A pd proxy stand-in: streams max_tokens tokens with an x-pd-id; answers /pd/transfers/<id>."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("x-pd-id", f"id{len(body['prompt'])}")
        self.end_headers()
        for t in range(body["max_tokens"]):
            self.wfile.write(b"data: " + json.dumps({"choices": [{"text": f"t{t}"}]}).encode() + b"\n\n")

    def do_GET(self):
        rec = {"ok": True, "n_tokens": 40, "n_bytes": 4_000_000, "load_ms": 2.0, "wait_ms": 1.0,
               "spans": {"tail": 0.5}, "cross_spans": {}}
        self.send_response(200)
        self.end_headers()
        self.wfile.write(json.dumps(rec).encode())

    def log_message(self, *a):
        pass


@pytest.fixture
def proxy_url():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandInProxy)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_sweep_starts_each_mode_once_per_workload_and_runs_every_rate(model, tmp_path, proxy_url, monkeypatch, capsys):
    started = []

    class StandInDeployment:
        def __init__(self, dep):
            self.dep, self.proxy_url = dep, proxy_url

        def start(self, progress=print):
            started.append((self.dep.mode, self.dep.prefill.count, self.dep.decode.count))

        def stop(self):
            pass

    checked, drawn = [], []

    def draw_all_double(results, out):  # matplotlib's figures take seconds; pd bench plot's tests draw them
        drawn.append((list(results["workloads"]), out))
        return {w: bench_plot.png_path(out, w) for w in results["workloads"]}, ""

    monkeypatch.setattr(sweep, "draw_all", draw_all_double)
    monkeypatch.setattr(sweep, "check_ports", lambda dep: checked.append((dep.mode, dep.prefill.count, dep.decode.count)))
    out = tmp_path / "res" / "sweep.json"
    args = _args("--model", str(model), "--rates", "40,20", "--workloads", "chat,decode_heavy", "--split",
                 "1P1D,1P3D", "--requests", "3", "--length-scale", "0.02", "--slo-ttft-ms", "60000",
                 "--slo-tpot-ms", "60000", "--out", str(out))
    assert sweep.run_sweep(args, deployment=StandInDeployment) == 0
    assert started == [("pd", 1, 1), ("pd", 1, 3), ("colocated", 2, 0), ("colocated", 4, 0)] * 2
    assert checked == started[:4]  # every deployment's ports, before anything started
    res = json.loads(out.read_text())
    assert res["unit"] == "instance" and res["rates"] == [40, 20] and list(res["workloads"]) == ["chat", "decode_heavy"]
    modes = res["workloads"]["decode_heavy"]["modes"]
    assert list(modes) == ["pd-1P1D", "pd-1P3D", "colocated-2", "colocated-4"]
    assert [m["units"] for m in modes.values()] == [2, 4, 2, 4]
    for m in modes.values():
        assert [r["rate"] for r in m["rates"]] == [40, 20] and m["sustained_rate"] == 40
        assert all(r["summary"]["requests"] == 3 and r["slo_attainment"] == 1 and len(r["tpot_ms"]) == 3
                   for r in m["rates"])
    assert modes["pd-1P3D"]["sustained_rate_per_unit"] == 10 and "transfer_summary" in modes["pd-1P3D"]["rates"][0]
    assert "transfer_summary" not in modes["colocated-4"]["rates"][0]
    assert res["workloads"]["chat"]["slo_ttft_ms"] == 60000
    md = out.with_suffix(".md").read_text()
    assert "## decode_heavy: decode-heavy" in md and "| 20 | pd-1P3D | 1P3D | 4 |" in md
    assert "| pd-1P3D | 1P3D | 4 | 40 | 10.000 | 1.00 (colocated-4) |" in md
    err = capsys.readouterr().err
    assert "[chat] pd-1P3D at 20/s: 3/3 done (0 failed)" in err
    assert drawn == [(list(res["workloads"]), out)]  # the plots of what was written (drawn: the pd bench plot tests)
    assert "(sweep-chat.png)" in md and "(sweep-decode_heavy.png)" in md


@pytest.mark.parametrize("extra, needle", [(["--rates", "0"], "--rates: '0' is not allowed"),
                                           (["--rates", "1,-2"], "--rates: '-2' is not allowed"),
                                           (["--workloads", "chat,poems"], "unknown workload 'poems'"),
                                           (["--split", "1P0D", "--rates", "1"], "--split: '1P0D' is not allowed"),
                                           (["--workloads", "longdoc", "--length-scale", "1"],
                                            "longdoc: a request can need 8704 tokens .* max_model_len 2048")])
def test_bad_sweep_input_exits_2_before_anything_starts(model, capsys, extra, needle):
    assert cli.main(["bench", "serve", "--model", str(model), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pd bench serve: error: ")
    assert re.search(needle, err), err


# ---- plots: pd bench plot on a synthetic results JSON -------------------------------------------

def _synthetic_results() -> dict:
    def mode(label_mode, split, n, attain):
        rates = [{"rate": r, "slo_attainment": a, "goodput_per_unit": r * a / n,
                  "summary": {"failed": 0, **{f"{k}_p{q}": 0.01 * r for k in ("ttft", "tpot", "itl") for q in (50, 90, 99)}},
                  "ttft_ms": [10.0 * r, 20.0 * r, None], "tpot_ms": [5.0, 6.0 * r, None]}
                 for r, a in zip((1, 2, 4), attain)]
        return {"mode": label_mode, "split": split, "instances": n, "units": n, "rates": rates,
                "sustained_rate": sustained(rates, 0.9), "sustained_rate_per_unit": sustained(rates, 0.9) / n}

    workload = {"about": "a test mix", "slo_ttft_ms": 50.0, "slo_tpot_ms": 10.0,
                "modes": {"pd": mode("pd", "1P1D", 2, (1.0, 0.95, 0.5)),
                          "colocated": mode("colocated", "2 colocated", 2, (1.0, 0.6, 0.2))}}
    return {"kind": "pd bench serve sweep", "version": 1, "device": "cpu", "unit": "instance", "n_gpus": 0,
            "model": "m", "rates": [1, 2, 4], "requests_per_rate": 3, "length_scale": 0.2,
            "slo_attainment_target": 0.9, "seed": 0, "command": "pd bench serve ...", "started": "now",
            "workloads": {"chat": workload, "longdoc": dict(workload, about="long")}}


def test_pd_bench_plot_draws_a_png_per_workload_and_links_them(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image  # noqa: PLC0415 - matplotlib depends on Pillow

    path = tmp_path / "r.json"
    path.write_text(json.dumps(_synthetic_results()))
    assert cli.main(["bench", "plot", str(path)]) == 0
    for name in ("chat", "longdoc"):
        png = tmp_path / f"r-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size == (1100, 800)
    md = (tmp_path / "r.md").read_text()
    assert "[![chat: goodput, SLO attainment, TTFT and TPOT CDFs](r-chat.png)](r-chat.png)" in md
    assert "| pd | 1P1D | 2 | 2 | 1.000 | 2.00 (colocated) |" in md  # sustains 2/s, colocated 1/s
    assert capsys.readouterr().out.split() == [str(tmp_path / "r-chat.png"), str(tmp_path / "r-longdoc.png"),
                                               str(tmp_path / "r.md")]
    import matplotlib.pyplot as plt  # noqa: PLC0415

    assert not plt.get_fignums()  # every figure closed


@pytest.mark.parametrize("content, needle", [("{not json", "not JSON"),
                                             ('{"kind": "other"}', "not the results of a pd bench serve sweep"),
                                             ('{"kind": "pd bench serve sweep", "workloads": {"../x": {"modes": {}}}}',
                                              "workload '../x' is not a workload of a sweep")])
def test_pd_bench_plot_refuses_what_is_not_a_sweep(tmp_path, capsys, content, needle):
    path = tmp_path / "r.json"
    path.write_text(content)
    assert cli.main(["bench", "plot", str(path)]) == 2
    assert needle in capsys.readouterr().err
    assert cli.main(["bench", "plot", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_pd_bench_plot_judges_a_run_again_at_other_slos(tmp_path, capsys):
    res = _synthetic_results()
    del res["workloads"]["longdoc"]  # one plot to draw (seconds each)
    for m in res["workloads"]["chat"]["modes"].values():
        for r in m["rates"]:
            r["summary"]["wall_s"] = 2.0
    path = tmp_path / "r.json"
    path.write_text(json.dumps(res))
    again = with_slos(res, None, 5.5)  # TPOT 5.0 meets it, 6.0 * rate does not; TTFT SLO 50 ms kept
    pd = again["workloads"]["chat"]["modes"]["pd"]
    assert [r["slo_attainment"] for r in pd["rates"]] == pytest.approx([1 / 3] * 3)  # 10r ms TTFT <= 50 at every rate
    assert [r["goodput_per_unit"] for r in pd["rates"]] == pytest.approx([1 / 2.0 / 2] * 3)
    assert pd["sustained_rate"] == 0 and again["workloads"]["chat"]["slo_tpot_ms"] == 5.5
    assert again["workloads"]["chat"]["slo_ttft_ms"] == 50.0 and res["workloads"]["chat"]["slo_tpot_ms"] == 10.0
    loose = with_slos(res, 1e6, 1e6)["workloads"]["chat"]["modes"]["colocated"]
    assert [r["slo_attainment"] for r in loose["rates"]] == pytest.approx([2 / 3] * 3)  # the third failed
    assert cli.main(["bench", "plot", str(path), "--out", str(tmp_path / "x.json")]) == 2
    assert "--out: only with --slo-ttft-ms or --slo-tpot-ms" in capsys.readouterr().err
    assert cli.main(["bench", "plot", str(path), "--slo-tpot-ms", "0"]) == 2
    assert "--slo-tpot-ms: 0 is not allowed" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    assert cli.main(["bench", "plot", str(path), "--slo-tpot-ms", "5.5"]) == 0
    md = (tmp_path / "r-tpot5.5.md").read_text()
    assert "Judged again by `pd bench plot` from each request's TTFT and TPOT at TPOT <= 5.5 ms" in md
    assert "(r-tpot5.5-chat.png)" in md and (tmp_path / "r-tpot5.5-chat.png").is_file()
    assert json.loads((tmp_path / "r-tpot5.5.json").read_text())["workloads"]["chat"]["slo_tpot_ms"] == 5.5
