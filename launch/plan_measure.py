"""``pd plan --measure URL``: a short profile of one running vLLM instance, as ``pd plan`` reads it
(launch/plan_inputs.py).

Prefill: prompts of several lengths (random token ids, so no prefix-cache hits), one token each,
one at a time; the fastest of ``REPEATS`` is the prefill time. Decode: B streams at once, each a
prompt of C tokens and ``DECODE_TOKENS`` answer tokens (ignore_eos); the step time is the median
time per token once every stream has its first (tokens counted from each event's usage, as vLLM
may send several tokens in one event). The instance should be otherwise idle.
"""
from __future__ import annotations

import asyncio
import json
import random
import statistics
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
DECODE_TOKENS = 32
TIMEOUT_S = 600.0


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


async def _complete(session: aiohttp.ClientSession, url: str, body: dict) -> list[tuple[float, int]]:
    """Send one completion; when (monotonic) each streamed event arrived and the answer's tokens
    by then (its usage, else one per event); not streamed: its end."""
    out: list[tuple[float, int]] = []
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise ConfigError(f"--measure: {url} answered {r.status}: {(await r.text())[:300]}")
        if not body.get("stream"):
            await r.read()
            return [(time.monotonic(), 1)]
        async for line in r.content:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                now = time.monotonic()
                try:
                    usage = json.loads(line[6:]).get("usage") or {}
                except ValueError:
                    usage = {}
                out.append((now, int(usage.get("completion_tokens") or (out[-1][1] + 1 if out else 1))))
    return out


async def _prefill(session, url: str, model: str, lengths: list[int], rng: random.Random) -> dict[int, float]:
    out = {}
    for n in lengths:
        best = float("inf")
        for _ in range(REPEATS):
            t0 = time.monotonic()
            done = await _complete(session, url, {"model": model, "prompt": _prompt(rng, n), "max_tokens": 1,
                                                  "temperature": 0})
            best = min(best, (done[-1][0] - t0) * 1e3)
        out[n] = round(best, 3)
    return out


async def _decode_step(session, url: str, model: str, batch: int, context: int, rng: random.Random) -> float:
    body = {"model": model, "max_tokens": DECODE_TOKENS, "ignore_eos": True, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    streams = await asyncio.gather(*(_complete(session, url, {**body, "prompt": _prompt(rng, context)})
                                     for _ in range(batch)))
    all_in = max(s[0][0] for s in streams)  # every stream has its first token: the batch is whole
    if any(s[-1][0] < all_in for s in streams):
        raise ConfigError(f"--measure: {url} did not run {batch} requests at once (one ended before another "
                          "began): give the instance's max_num_seqs as --max-batch")
    per_token = []
    for s in streams:
        after = [(t, n) for t, n in s if t >= all_in]
        if len(after) >= 2 and after[-1][1] > after[0][1]:
            per_token.append((after[-1][0] - after[0][0]) / (after[-1][1] - after[0][1]))
    if not per_token:
        raise ConfigError(f"--measure: {url} gave no stream two tokens apart once all {batch} had begun; "
                          "it must stream its tokens as it makes them")
    return statistics.median(per_token) * 1e3


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
