"""``pd plan`` (launch/plan*.py): the profile and workload inputs, the queueing model on synthetic
profiles whose answers are known analytically, the CLI, and --measure against a simulated
instance (an HTTP double that streams tokens at a known step time)."""
from __future__ import annotations

import asyncio
import json
import math
import socket
import threading

import pytest
import yaml
from aiohttp import web

from common.config import ConfigError
from launch.cli import main as cli_main
from launch.plan_inputs import lengths, load_profile, parse_profile, parse_workload
from launch import plan_measure
from launch.plan_measure import measure_profile
from launch.plan_model import SLO, decode_check, options, prefill_check, ttft_attainment

# prefill 0.1 ms per token; decode step 20 ms + 1 ms per sequence (no context cost)
PROFILE = {"prefill_ms": {1000: 100, 8000: 800}, "decode_step_ms": [[1, 1000, 21], [64, 1000, 84], [64, 8000, 84]]}


def wl(prompt, output, ttft=10000.0, tpot=60.0):
    return parse_workload({"mixes": [{"prompt": prompt, "output": output}], "slo_ttft_ms": ttft, "slo_tpot_ms": tpot})


def best(profile: dict, workload, gpus: int, tpot: float, ttft: float = 10000.0):
    return options(parse_profile(profile), lengths(workload), SLO(ttft, tpot, 0.9), gpus)


# ---- inputs -----------------------------------------------------------------------------------------


def test_decode_fit_recovers_the_step_time_and_prefill_interpolates():
    p = parse_profile({"prefill_ms": {1000: 100, 3000: 500}, "decode_step_ms": [
        [b, c, 5 + 0.5 * b + 0.001 * b * c] for b in (1, 16, 64) for c in (512, 4096)]})
    assert p.decode_coef == pytest.approx((5, 0.5, 0.001))
    assert [p.prefill_ms(t) for t in (500, 1000, 2000, 3000, 4000)] == pytest.approx([100, 100, 300, 500, 700])
    one = parse_profile({"prefill_ms": {2000: 100}, "decode_step_ms": PROFILE["decode_step_ms"]})
    assert one.prefill_ms(4000) == pytest.approx(200)
    # noisy points that make the free fit's context cost negative: dropped, the rest refit
    noisy = parse_profile({"prefill_ms": {1: 1}, "decode_step_ms": [[1, 100, 10], [32, 100, 42], [32, 4000, 41]]})
    assert noisy.decode_coef[2] == 0 and min(noisy.decode_coef) >= 0


def test_workload_lengths_weigh_long_answers_in_the_decode_context():
    lens = lengths(parse_workload({"mixes": [{"share": 3, "prompt": 1000, "output": 11},
                                             {"share": 1, "prompt": [2000, 4000], "output": 101}]}))
    assert sum(p for _, p in lens.prompts) == pytest.approx(1)
    assert dict(lens.prompts)[1000] == pytest.approx(0.75)
    assert lens.out_after_first == pytest.approx(0.75 * 10 + 0.25 * 100)
    # E[O' (P + O'/2)] / E[O']: the 100-token answers of 3000-token prompts dominate
    want = (0.75 * 10 * (1000 + 5) + 0.25 * 100 * (3000 + 50)) / (0.75 * 10 + 0.25 * 100)
    assert lens.decode_context == pytest.approx(want, rel=0.01)


@pytest.mark.parametrize("change,needle", [
    ({"prefill_ms": None}, "prefill_ms: None is not allowed"),
    ({"decode_step_ms": [[1, 10, 5], [2, 10, 6]]}, "at least 3 [batch, context, ms] triples"),
    ({"decode_step_ms": [[1, 10, 5], [2, 10, 6], [4, 10, 8]]}, "differ in batch size and in context"),
    ({"decode_step_ms": [[1, 10, 5], [2, 10, -6], [4, 20, 8]]}, "decode_step_ms[1]: -6 is not allowed"),
    ({"decode_step_ms": [[0.5, 10, 5], [2, 10, 6], [4, 20, 8]]}, "give an integer >= 1"),
    ({"prefill_ms": {1000: 100, 2000: 50}}, "a longer prompt cannot take less time"),
    ({"prefill_ms": {"long": 100}}, "prompt length in tokens"),
    ({"prefill_ms": {1000: math.nan}}, "prefill_ms[1000]: nan is not allowed"),
    ({"max_batch": 0}, "max_batch: 0 is not allowed; give an integer >= 1"),
    ({"gpu_per_instance": 2}, "unknown key gpu_per_instance; allowed keys: gpus_per_instance"),
])
def test_bad_profiles_say_what_is_wrong(change, needle):
    with pytest.raises(ConfigError) as e:
        parse_profile({**PROFILE, **change})
    assert needle in str(e.value)


@pytest.mark.parametrize("data,needle", [
    ({"mixes": []}, "mixes: [] is not allowed"),
    ({"mixes": [{"prompt": [10, 5], "output": 3}]}, "lo must not exceed hi"),
    ({"mixes": [{"prompt": 10}]}, "give {share, prompt: [lo, hi], output: [lo, hi]}"),
    ({"mixes": [{"share": 0, "prompt": 10, "output": 3}]}, "at least one share must be > 0"),
    ({"mixes": [{"prompt": 10, "output": 3}], "slo_ttft_ms": -1}, "slo_ttft_ms: -1 is not allowed"),
    ({"mixes": [{"prompt": 10, "output": 3}], "rate": 2}, "unknown key rate"),
])
def test_bad_workloads_say_what_is_wrong(data, needle):
    with pytest.raises(ConfigError, match="workload custom") as e:
        parse_workload(data)
    assert needle in str(e.value)


# ---- the model ------------------------------------------------------------------------------------


def test_prefill_is_an_md1_queue_and_decode_follows_littles_law():
    s = 400.0  # ms, deterministic service: M/D/1
    rate = 2.0  # rho 0.8, E[W] = rho * s / (2 (1 - rho)) = 800 ms
    assert ttft_attainment(rate, [(s, 1.0)], 2000.0) == pytest.approx(1 - 0.8 * math.exp(-1600 * 0.8 / 800))
    assert ttft_attainment(0.0, [(s, 1.0)], 300.0) == 0.0 and ttft_attainment(0.0, [(s, 1.0)], 400.0) == 1.0
    assert ttft_attainment(2.5, [(s, 1.0)], 1e9) == 0.0  # saturated
    p, lens = parse_profile(PROFILE), lengths(wl(4000, 257))
    assert prefill_check(p, lens, 2.0, SLO(2000, 60, 0.9)).ttft_attainment == pytest.approx(
        ttft_attainment(2.0, [(400.0, 1.0)], 2000.0))
    c = decode_check(p, lens, 1.0, SLO(1e4, 1e4, 0.9))
    # B = rate * 256 tokens * (20 + B) ms: B = 5.12 / (1 - 0.256)
    assert c.batch == pytest.approx(0.256 * 20 / (1 - 0.256))
    assert c.tpot_ms == pytest.approx(20 + c.batch + 1.2815516 * math.sqrt(c.batch), rel=1e-6)


def test_a_tight_tpot_favours_pd_and_a_loose_one_colocated():
    work = wl(4000, 257)
    tight, loose = best(PROFILE, work, 2, tpot=60), best(PROFILE, work, 2, tpot=1000)
    assert tight[0].name == "1P1D" and tight[1].name == "colocated x2" and tight[0].rate > 1.2 * tight[1].rate
    assert "TPOT" in tight[1].limit  # colocated: prefill time inflates every step
    assert loose[0].name == "colocated x2" and loose[0].rate > 1.2 * loose[1].rate
    # the split's rate is its prefill instance's (TTFT-bound M/D/1): below 1/0.4 s, above 2/s
    assert 2.0 < tight[0].rate < 2.5 and tight[0].limit.startswith("prefill")


def test_long_prompts_get_more_prefill_and_long_answers_more_decode():
    prefill_heavy = best(PROFILE, wl(8000, 17), 4, tpot=25, ttft=20000)
    assert prefill_heavy[0].name == "3P1D" and prefill_heavy[0].rate > next(o for o in prefill_heavy if o.colocated).rate
    costly_decode = {**PROFILE, "decode_step_ms": [[1, 1000, 10.5], [64, 1000, 42], [64, 8000, 42]]}  # 10 + 0.5 B
    decode_heavy = best(costly_decode, wl(256, 1025), 4, tpot=40)
    split = next(o for o in decode_heavy if not o.colocated)
    assert split.name == "1P3D" and split.limit.startswith("decode")


def test_one_gpu_is_colocated_and_impossible_slos_say_so():
    from launch.plan_model import advice

    one = best(PROFILE, wl(4000, 257), 1, tpot=60)
    assert [o.name for o in one] == ["colocated x1"] and "P/D needs at least 2 instances" in advice(one)[0]
    never = best(PROFILE, wl(4000, 257), 2, tpot=60, ttft=300)  # a prompt alone takes 400 ms
    assert all(o.rate == 0 for o in never) and advice(never)[0].startswith("No option meets the SLOs")


# ---- the command --------------------------------------------------------------------------------


def test_pd_plan_prints_the_options_and_writes_json(tmp_path, capsys):
    prof, work, out = tmp_path / "p.yaml", tmp_path / "w.json", tmp_path / "plan.json"
    prof.write_text(yaml.safe_dump(PROFILE))
    work.write_text(json.dumps({"mixes": [{"prompt": 4000, "output": 257}], "slo_ttft_ms": 10000}))
    assert cli_main(["plan", "--profile", str(prof), "--workload", str(work), "--gpus", "2", "--slo-tpot-ms", "60",
                     "--rate", "2.2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 1P1D | 2 |" in text and "1P1D: " in text and "At 2.2 req/s: 1P1D meet the SLOs." in text
    data = json.loads(out.read_text())
    assert [o["name"] for o in data["options"]] == ["1P1D", "colocated x2"] and data["slo"]["tpot_ms"] == 60
    assert cli_main(["plan", "--profile", str(prof), "--workload", "longdoc", "--gpus", "4"]) == 0
    assert "TTFT <= 15000 ms" in capsys.readouterr().out  # the named workload's SLOs


@pytest.mark.parametrize("argv,needle", [
    (["--gpus", "0"], "--gpus: 0 is not allowed"),
    (["--rate", "-1"], "--rate: -1.0 is not allowed"),
    (["--attainment", "1"], "--attainment: 1.0 is not allowed"),
    (["--measure", "http://127.0.0.1:1"], "give one of --profile FILE or --measure URL"),
    (["--workload", "chatty"], "'chatty' is neither a workload name (chat, longdoc, decode_heavy) nor a file"),
])
def test_pd_plan_refuses_bad_options(tmp_path, capsys, argv, needle):
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    base = {"--profile": str(prof), "--workload": "chat", "--gpus": "2"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    assert cli_main(["plan", *[x for kv in base.items() for x in kv]]) == 2
    assert needle in capsys.readouterr().err


def test_a_missing_or_broken_profile_file(tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("prefill_ms: {1000: [")
    for path, needle in ((tmp_path / "none.yaml", "does not exist"), (bad, "is not valid YAML or JSON")):
        assert cli_main(["plan", "--profile", str(path), "--workload", "chat", "--gpus", "2"]) == 2
        assert needle in capsys.readouterr().err


# ---- --measure ------------------------------------------------------------------------------------


class SimulatedInstance:
    """An HTTP double of a vLLM instance that models time: a prompt takes ``0.01 ms`` per token
    to prefill, a token 10 ms whatever the batch (asyncio sleeps; long enough that a batch's
    requests, sent together, all run at once on a loaded CI machine); at most 8 requests at once
    (its max_num_seqs), the rest wait; /metrics says how many run, as vLLM names it."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.slots = asyncio.Semaphore(8)
        self.running = 0

    async def metrics(self, request):
        return web.Response(text=f'vllm:num_requests_running{{engine="0",model_name="sim"}} {self.running}.0\n')

    async def models(self, request):
        return web.json_response({"data": [{"id": "sim", "max_model_len": 600}]})

    async def complete(self, request):
        async with self.slots:
            self.running += 1
            try:
                return await self._complete(request)
            finally:
                self.running -= 1

    async def _complete(self, request):
        body = await request.json()
        self.bodies.append(body)
        await asyncio.sleep(len(body["prompt"]) * 1e-5 + (body["max_tokens"] - 1) * 1e-2)
        return web.json_response({"choices": [{"text": "x" * body["max_tokens"]}]})


def test_measure_writes_a_profile_pd_plan_reads_within_the_instances_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_measure, "REPEATS", 1)
    sim, sock = SimulatedInstance(), socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = web.Application()
    app.router.add_get("/v1/models", sim.models)
    app.router.add_post("/v1/completions", sim.complete)
    app.router.add_get("/metrics", sim.metrics)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        saved, url = tmp_path / "measured.yaml", f"http://127.0.0.1:{sock.getsockname()[1]}/"
        with pytest.raises(ConfigError, match="ran at most 8 of 32 requests at once: give the instance's max_num_seqs"):
            measure_profile(url, 2)  # batches up to 32, but it runs 8 at a time
        sim.bodies.clear()
        profile = measure_profile(url, 2, str(saved), max_batch=8)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()
    assert profile == load_profile(saved) and (profile.gpus_per_instance, profile.max_batch) == (2, 8)
    assert [n for n, _ in profile.prefill_points] == [256]  # the lengths that fit max_model_len 600
    prompts = [len(b["prompt"]) for b in sim.bodies if isinstance(b["prompt"], list)]
    assert max(prompts) < 600 and len({tuple(b["prompt"]) for b in sim.bodies}) == len(sim.bodies)  # no reuse
    decode = yaml.safe_load(saved.read_text())["decode_step_ms"]
    assert sorted({(b, c) for b, c, _ in decode}) == [(1, 150), (1, 535), (8, 150), (8, 535)]


def test_measure_refuses_what_is_not_a_vllm_instance():
    with pytest.raises(ConfigError, match="is not an instance URL"):
        measure_profile("127.0.0.1:8100", 1)
    with pytest.raises(ConfigError, match="does not answer GET /v1/models as vLLM does"):
        measure_profile("http://127.0.0.1:1", 1)
    with pytest.raises(ConfigError, match="--max-batch: 1 is not allowed"):
        measure_profile("http://127.0.0.1:1", 1, max_batch=1)
