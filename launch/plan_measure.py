"""``pd plan --measure URL``: a short profile of one running vLLM instance, as ``pd plan`` reads it
(launch/plan_inputs.py).

Prefill: prompts of several lengths (random token ids, so no prefix-cache hits), one token each,
one at a time; the fastest of ``REPEATS`` is the prefill time. Decode: B requests at once, each a
prompt of C tokens, once with ``DECODE_TOKENS`` answer tokens (ignore_eos) and once with one; the
step time is the difference of the two batches' times over ``DECODE_TOKENS - 1`` (the fastest of
``REPEATS``). Whole-batch times, not gaps between streamed events: a busy API server sends events
in bursts (on the CPU, 32 tokens arrived within 0.4 ms). The instance's ``/metrics``
(``vllm:num_requests_running``), read while a batch runs, shows whether all B ran at once. The
instance should be otherwise idle.
"""
from __future__ import annotations

import asyncio
import random
import re
import time
from pathlib import Path

import aiohttp
import yaml

from common.config import ConfigError
from launch.bench.common import VOCAB
from launch.plan_inputs import Profile, parse_profile

PREFILL_TOKENS = (256, 1024, 2048, 4096, 8192, 16384)
BATCHES = (1, 8, 32)
REPEATS = 3
DECODE_TOKENS = 64
TIMEOUT_S = 600.0
POLL_S = 0.01  # /metrics reads while a batch runs
_RUNNING = re.compile(rb"^vllm:num_requests_running(?:\{[^}\n]*\})?[ \t]+(\d+(?:\.\d*)?)", re.M)


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(n)]


async def _model(session: aiohttp.ClientSession, url: str) -> tuple[str, int]:
    """The served model's name and max_model_len."""
    try:
        async with session.get(url + "/v1/models") as r:
            data = await r.json(content_type=None)
        card = data["data"][0]
        return card["id"], int(card.get("max_model_len") or 2048)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ConfigError(f"--measure: {url} does not answer GET /v1/models as vLLM does: {e!r}") from None


async def _complete(session: aiohttp.ClientSession, url: str, body: dict) -> float:
    """Send one completion (not streamed); when (monotonic) its answer had arrived."""
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise ConfigError(f"--measure: {url} answered {r.status}: {(await r.text())[:300]}")
        await r.read()
    return time.monotonic()


async def _most_running(session: aiohttp.ClientSession, url: str, seen: list[float]) -> None:
    """Append the instance's ``vllm:num_requests_running`` (all engines) to ``seen`` until
    cancelled; nothing if it has no such series."""
    while True:
        try:
            async with session.get(url + "/metrics") as r:
                text = await r.read() if r.status == 200 else b""
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            text = b""
        values = [float(v) for v in _RUNNING.findall(text)]
        if not values:
            return
        seen.append(sum(values))
        await asyncio.sleep(POLL_S)


async def _prefill(session, url: str, model: str, lengths: list[int], rng: random.Random) -> dict[int, float]:
    out = {}
    for n in lengths:
        best = float("inf")
        for _ in range(REPEATS):
            t0 = time.monotonic()
            done = await _complete(session, url, {"model": model, "prompt": _prompt(rng, n), "max_tokens": 1,
                                                  "temperature": 0})
            best = min(best, (done - t0) * 1e3)
        out[n] = round(best, 3)
    return out


async def _batch_ms(session, url: str, body: dict, batch: int, context: int, rng: random.Random) -> float:
    """ms until all ``batch`` requests of ``body`` (each its own prompt of ``context`` tokens) have
    answered; refused if the instance's /metrics showed some but never all of them running at
    once (a batch short enough to slip between two reads is not refused)."""
    seen: list[float] = []
    watch = asyncio.ensure_future(_most_running(session, url, seen))
    t0 = time.monotonic()
    try:
        ends = await asyncio.gather(*(_complete(session, url, {**body, "prompt": _prompt(rng, context)})
                                      for _ in range(batch)))
    finally:
        watch.cancel()
    if body["max_tokens"] > 1 and 0 < max(seen, default=0) < batch:  # 0: no read caught it running
        raise ConfigError(f"--measure: {url} ran at most {max(seen):.0f} of {batch} requests at once: give the "
                          "instance's max_num_seqs as --max-batch")
    return (max(ends) - t0) * 1e3


async def _decode_step(session, url: str, model: str, batch: int, context: int, rng: random.Random) -> float:
    base = {"model": model, "ignore_eos": True, "temperature": 0}
    steps = []
    for _ in range(REPEATS):
        many = await _batch_ms(session, url, {**base, "max_tokens": DECODE_TOKENS}, batch, context, rng)
        one = await _batch_ms(session, url, {**base, "max_tokens": 1}, batch, context, rng)
        steps.append((many - one) / (DECODE_TOKENS - 1))
    return max(min(steps), 1e-3)


async def _measure(url: str, max_batch: int) -> dict:
    rng = random.Random(0)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        model, max_len = await _model(session, url)
        lengths = [n for n in PREFILL_TOKENS if n + 1 < max_len] or [max(1, max_len // 2)]
        await _complete(session, url, {"model": model, "prompt": _prompt(rng, 16), "max_tokens": 2})  # warm up
        prefill = await _prefill(session, url, model, lengths, rng)
        contexts = sorted({min(256, max_len // 4), max(1, min(2048, max_len - DECODE_TOKENS - 1))})
        batches = sorted({min(b, max_batch) for b in BATCHES})
        steps = [[b, c, round(await _decode_step(session, url, model, b, c, rng), 3)]
                 for b in batches for c in contexts]
    return {"prefill_ms": prefill, "decode_step_ms": steps}


def measure_profile(url: str, gpus_per_instance: int, save: str | None = None, max_batch: int = 256) -> Profile:
    """Measure the instance at ``url`` (its vLLM ``max_num_seqs`` is ``max_batch``); write the
    profile to ``save`` if given."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--measure: {url!r} is not an instance URL like http://127.0.0.1:8100")
    if max_batch < 2:
        raise ConfigError(f"--max-batch: {max_batch} is not allowed; decode is measured at 2 batch sizes or more")
    data = {"gpus_per_instance": gpus_per_instance, "max_batch": max_batch, **asyncio.run(_measure(url, max_batch))}
    profile = parse_profile(data, f"profile measured at {url}")
    if save:
        Path(save).write_text(f"# pd plan --measure {url}\n" + yaml.safe_dump(data, sort_keys=False))
    return profile
