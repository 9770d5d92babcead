"""`pd bench soak` without vLLM: the verdict, the probes on real processes, pools and sockets."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from launch.bench import soak_probe as probe
from launch.bench.soak import Traffic, asks, check_args, make_prompts
from launch.bench.soak_report import leftovers, series
from launch.bench.soak_verdict import MIN_SAMPLES, judge, judge_all
from tests.unit.test_connector_worker import _until

MiB = 2**20


def _noisy(n: int, level: float, noise: float, growth_per_s: float = 0.0, seed: int = 0):
    rng = random.Random(seed)
    return [(t * 10.0, level + growth_per_s * t * 10.0 + rng.uniform(-noise, noise)) for t in range(n)]


def test_a_flat_noisy_series_is_flat_and_a_leak_is_not():
    assert judge("proxy", "rss", _noisy(40, 300 * MiB, 20 * MiB)).flat
    leak = judge("proxy", "rss", _noisy(40, 300 * MiB, 20 * MiB, growth_per_s=0.5 * MiB))
    assert not leak.flat and leak.growth > leak.allowed and leak.slope_per_min > 20 * MiB
    # A process that grows during the warm-up and then settles is flat.
    settle = [(t, v if t > 60 else v * t / 60) for t, v in _noisy(40, 300 * MiB, 5 * MiB)]
    assert judge("vllm", "rss", settle).flat
    # fds: one leaked descriptor per request soon beats the absolute tolerance.
    fds = [(t, 40 + (t // 10 if t > 100 else 0)) for t in range(0, 400, 10)]
    assert not judge("proxy", "fds", fds).flat
    assert judge("proxy", "fds", [(t, 40 + (t // 10) % 3) for t in range(0, 400, 10)]).flat


def test_too_few_samples_give_no_verdict_and_unknown_kinds_are_refused():
    assert judge("p", "rss", _noisy(MIN_SAMPLES, 1, 0)) is None
    assert judge("p", "rss", _noisy(2 * MIN_SAMPLES, 1, 0)) is not None
    with pytest.raises(ValueError, match="unknown kind 'bogus'.*allowed: rss"):
        judge("p", "bogus", _noisy(20, 1, 0))


def test_series_and_leftovers_of_samples():
    samples = [{"t": t, "procs": {"proxy": [100 * MiB, 30, 4]}, "pool": {"values": 2, "value_bytes": 5},
                "coordinator": {"entries": 1, "waiters": 0}, "kv_usage": {"decode-0": 0.0}} for t in range(12)]
    s = series(samples)
    assert set(s) == {("proxy", "rss"), ("proxy", "fds"), ("proxy", "threads"), ("pool", "pool_values"),
                      ("pool", "pool_bytes"), ("coordinator", "entries"), ("coordinator", "waiters")}
    assert all(j.flat for j in judge_all(s))
    assert leftovers(samples[-1]) == {"coordinator entries": 1, "pool values": 2}
    assert leftovers({"coordinator": {"entries": 0}, "pool": {}, "kv_usage": {"p": 0.25}}) == \
        {"p kv cache usage": 0.25}


def _args(**over):
    base = dict(minutes=1, rate=1, interval=5, request_timeout=10, prompts=4, long_tokens=10, short_tokens=5,
                max_tokens=4, long_fraction=0.5, stream_fraction=0.5, abort_fraction=0.5, drain_s=5, pid=None,
                fresh_fraction=0.1, store_gb=0.5,
                url=None)
    return SimpleNamespace(**{**base, **over})


@pytest.mark.parametrize("over, msg", [({"rate": 0}, "--rate must be > 0"),
                                       ({"abort_fraction": 1.5}, r"--abort-fraction must be in \[0, 1\]"),
                                       ({"prompts": 0}, "--prompts must be >= 1"),
                                       ({"drain_s": -1}, "--drain-s must be >= 0"),
                                       ({"fresh_fraction": -0.1}, r"--fresh-fraction must be in \[0, 1\]"),
                                       ({"store_gb": 0}, "--store-gb must be > 0"),
                                       ({"pid": 1}, "--pid goes with --url")])
def test_bad_options_are_named(over, msg):
    check_args(_args())
    with pytest.raises(ValueError, match=msg):
        check_args(_args(**over))


def test_asks_mix_fixed_and_fresh_prompts():
    prompts = make_prompts(8, 0.25, 50, 10, seed=0)
    assert [len(p) for p in prompts] == [50, 50] + [10] * 6
    got = [a for a, _ in zip(asks(random.Random(1), 8, 0.5, 0.5, fresh_fraction=0.3), range(2000))]
    fresh = [a for a in got if a.prompt < 0]
    assert 500 < len(fresh) < 700 and len({a.fresh for a in fresh}) == len(fresh)
    assert {a.prompt for a in got if a.prompt >= 0} == set(range(8))
    assert all(a.stream for a in got if a.abort_after >= 0) and {a.abort_after for a in got} == {-1, 0, 1, 2}
    t = Traffic("http://127.0.0.1:1", "m", prompts, 4, 1.0, fresh_lengths=(50, 10))
    assert t.prompt_of(fresh[0]) == t.prompt_of(fresh[0]) != t.prompt_of(fresh[1])  # seeded, new each time
    assert len(t.prompt_of(fresh[0])) in (50, 10) and t.prompt_of(got[0]) in prompts or got[0].prompt < 0
    assert not [a for a, _ in zip(asks(random.Random(1), 8, 0.5, 0.5), range(500)) if a.prompt < 0]


def test_processes_names_a_tree_and_samples_it():
    """A real process tree: a root with two children (one by --port), one of them with a child."""
    code = ("import subprocess,sys,time;"
            "kids=[subprocess.Popen([sys.executable,'-c','import time,subprocess,sys;"
            "subprocess.Popen([sys.executable,\"-c\",\"import time;time.sleep(60)\"]);time.sleep(60)',"
            "'--port','4321']), subprocess.Popen([sys.executable,'-c','import time;time.sleep(60)','proxy'])];"
            "time.sleep(60)")
    root = subprocess.Popen([sys.executable, "-c", code])
    try:
        procs = probe.Processes(root=root.pid, names_by_port={4321: "prefill-0"})
        assert _until(lambda: len(procs.pids()) == 4)
        names = procs.pids()
        kid = [n for n in names if n.startswith("prefill-0/")]
        assert set(names) == {"launcher", "prefill-0", "proxy", *kid} and len(kid) == 1
        assert names["launcher"] == root.pid and kid[0].startswith("prefill-0/python")
        s = procs.sample()
        assert s["launcher"].rss > MiB and s["proxy"].fds >= 3 and s["prefill-0"].threads >= 1
    finally:
        for pid in probe.descendants(root.pid):
            os.kill(pid, 9)
        root.kill()
        root.wait()


def test_label_of_command_lines():
    names = {8100: "prefill-0"}
    assert probe.label_of(["python", "-m", "vllm.entrypoints.openai.api_server", "--port", "8100"], names) == "prefill-0"
    assert probe.label_of(["python", "-m", "vllm.entrypoints.openai.api_server", "--port", "8200"], names) == "vllm:8200"
    assert probe.label_of(["python", "-m", "launch.cli", "coordinator", "--port", "5570"], {}) == "coordinator:5570"
    assert probe.label_of(["/usr/bin/sleep", "10"], {}) == "sleep"


def test_listener_pid_finds_this_process():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        assert probe.listener_pid(s.getsockname()[1]) == os.getpid()
        assert probe.parent_pid(os.getpid()) == os.getppid()
    finally:
        s.close()


def test_pool_usage_counts_live_values_of_a_real_shm_pool(tmp_path):
    from transport.config import TransportConfig
    from transport.shm import ShmTransport
    from transport.shm_index import pool_dir

    cfg = TransportConfig(pool_size_mb=4, shm_dir=str(tmp_path), name="soak")
    t = ShmTransport(cfg)
    try:
        assert probe.pool_usage(pool_dir(cfg))["values"] == 0
        assert all(t.put(["a/1", "a/2"], [b"x" * 1000, b"y" * 3000]))
        u = probe.pool_usage(pool_dir(cfg))
        assert u["values"] == 2 and u["value_bytes"] == 4000 and u["arenas"] == 1 and u["arena_bytes"] > 0
        t.delete(["a/1"])
        assert probe.pool_usage(pool_dir(cfg))["values"] == 1
    finally:
        t.close()
    assert probe.pool_usage(str(tmp_path / "absent")) == {"values": 0, "value_bytes": 0, "arenas": 0,
                                                           "arena_bytes": 0}


def test_dir_usage_and_scrape(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x" * 10000)
    (tmp_path / "g").write_bytes(b"y")
    u = probe.dir_usage([f"file://{tmp_path}"])
    assert u["files"] == 2 and u["bytes"] >= 10000
    assert probe.scrape("http://127.0.0.1:1/metrics") == {}  # nothing listens: no figures, no crash
    series_ = {'pdkv_proxy_requests_total{endpoint="/v1/completions",status="200"}': 5.0,
               'pdkv_proxy_requests_total{endpoint="/v1/completions",status="502"}': 2.0,
               'pdkv_proxy_requests_total{endpoint="/v1/chat/completions",status="503"}': 1.0, "other": 9.0}
    assert probe.total(series_, "pdkv_proxy_requests_total", status="5*") == 3.0
    assert probe.total(series_, "pdkv_proxy_requests_total") == 8.0


def test_traffic_through_a_real_proxy_with_an_api_key():
    """The soak's client against the real proxy (upstream: test_proxy's vLLM doubles), which takes
    an API key: requests with the key are answered, streamed or not, closed early or not; without
    it every one fails with a 401 that is counted."""
    import asyncio

    from launch.bench.soak import Ask
    from tests.unit.test_proxy import deployment, run

    asks_ = [Ask(0, False, -1), Ask(1, True, -1), Ask(0, True, 1), Ask(-1, False, -1, fresh=7)]

    async def go():
        async with deployment() as env:
            env.proxy.api_key = "sk-soak"
            for key in ("sk-soak", None):
                t = Traffic(env.url, "m", [[1, 2, 3], [4, 5]], 4, 10.0, api_key=key)
                await asyncio.gather(*(asyncio.to_thread(t._one, a) for a in asks_))
                if key:
                    assert (t.counts["ok"], t.counts["aborted"], t.counts["failed"]) == (3, 1, 0), t.errors
                else:
                    assert t.counts["failed"] == 4 and t.errors == {"HTTP 401": 4}
    run(go())


def test_traffic_keeps_a_differing_answer_with_both_pd_ids():
    """The same prompt answered otherwise the second time (the doubles answer a streamed and a
    plain request with other texts) is counted as differing and kept whole, with the pd id of
    each answer (the proxy's ``x-pd-id``), so that its path can be found in the proxy's log."""
    import asyncio

    from launch.bench.soak import Ask
    from tests.unit.test_proxy import deployment, run

    t = Traffic("", "m", [[1, 2, 3]], 4, 10.0)

    async def go():
        async with deployment() as env:
            t.url = env.url
            for a in (Ask(0, False, -1), Ask(0, False, -1), Ask(0, True, -1)):
                await asyncio.to_thread(t._one, a)

    run(go())
    assert (t.counts["ok"], t.counts["differ"]) == (2, 1), (t.counts, t.errors)
    [d] = t.differing
    assert d["prompt"] == 0 and d["stream"] and d["text"] != d["first"] and d["first"] == t.answers[0][0]
    assert d["pd_id"] and d["first_pd_id"] and d["pd_id"] != d["first_pd_id"]


def test_soak_and_report_end_to_end_on_the_real_proxy(tmp_path):
    """``soak`` then ``report`` for a few seconds against the real proxy (upstream: the vLLM
    doubles), this test's process as the deployment: samples, the drained line, a verdict."""
    import asyncio
    import json

    from launch.bench.soak import Target, soak
    from launch.bench.soak_report import report
    from tests.unit.test_proxy import deployment, run

    # all streamed: the doubles answer a streamed and a plain request with other texts
    args = _args(minutes=0.1, rate=10, interval=0.25, out=str(tmp_path / "s.jsonl"), seed=0, drain_s=2,
                 stream_fraction=1.0)
    printed: list[str] = []
    got = []

    async def go():
        async with deployment() as env:
            target = Target(env.url, "m", probe.Processes(tops={"test": os.getpid()}))
            got.extend([*await asyncio.to_thread(soak, target, args, printed.append), target])

    run(go())
    samples, last, traffic, target = got
    assert len(samples) >= 20 and samples[-1] is last and printed[-1].startswith("after the traffic: ")
    assert [json.loads(x)["t"] for x in (tmp_path / "s.jsonl").read_text().splitlines()] == [s["t"] for s in samples]
    assert traffic.counts["sent"] >= 20 and traffic.counts["failed"] == 0
    assert traffic.counts["ok"] + traffic.counts["aborted"] == traffic.counts["sent"] and not traffic.counts["differ"]
    assert all(s["procs"]["test"][0] > MiB for s in samples)
    ok = report(samples, last, traffic, target, printed.append)
    text = "\n".join(printed)
    assert "## Verdict per series" in text and "| test rss |" in text
    assert ok == ("# verdict: PASS" in text)
