"""The instances of a pd deployment alone: what P/D costs the first two tokens, without the proxy.

P/D's first token comes from the prefill instance, so P/D TTFT is the prefill instance's answer
time plus the proxy. This probe sends fresh prompts (never seen, so vLLM's prefix cache cannot
answer them) straight to a prefill instance, alternating two forms:

* ``plain``: a streamed request with no KV transfer, timed to its first token (what a colocated
  instance does, on the same instance);
* ``prefill``: the proxy's prefill half (``pd.proxy.first_token.prefill_body``: not streamed,
  ``max_tokens`` 1, token ids back, ``kv_transfer_params`` asking for the KV to be sent on),
  timed to its answer.

Their difference is the connector's cost on the prefill side (its scheduler and worker hooks,
saving the KV) plus the non-streamed answer. The probe's transfers have no decode: nobody reads
their chunks, which the transport evicts or the coordinator collects like any abandoned transfer.

``decode_floor`` measures what the decode's start cannot go below on its instance: a fresh prompt
is prefilled there once (not timed), then the prompt plus one token is sent streamed: vLLM's
prefix cache holds the prompt's KV, so its first token costs one token's compute at that context
(what the decode half's first step computes, with the KV already in place and no transfer), and
its second token one ordinary decode step.
"""
from __future__ import annotations

import json
import random
import time
import urllib.request
import uuid

from launch.bench.serve_load import VOCAB
from pd.coordinator.timeline import percentile
from pd.proxy.first_token import prefill_body


def _post(url: str, body: dict) -> float:
    """Seconds to the first streamed token (streamed bodies) or to the whole answer."""
    req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        if not body.get("stream"):
            data = json.loads(resp.read())
            if not data.get("choices"):
                raise RuntimeError(f"prefill answered without choices: {str(data)[:200]}")
            return time.perf_counter() - t0
        for line in resp:
            # a token whose text is "" (a partial UTF-8 sequence of a random model) is a token too
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0].get("text") is not None:
                return time.perf_counter() - t0
    raise RuntimeError("the streamed answer had no token")


def probe(url: str, model: str, tokens: int, n: int = 20, seed: int = 7) -> dict:
    """``n`` fresh prompts of ``tokens`` tokens each way, alternating; ms p50/p90 of each and the ratio."""
    if n < 1 or tokens < 1:
        raise ValueError(f"probe: n {n} and tokens {tokens} must be >= 1")
    rng = random.Random(seed * 1_000_003 + tokens)
    ms: dict[str, list[float]] = {"plain": [], "prefill": []}
    for _ in range(n):
        for form in ("plain", "prefill"):
            body = {"model": model, "prompt": [rng.randrange(*VOCAB) for _ in range(tokens)], "max_tokens": 1,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            if form == "prefill":
                body = prefill_body(body, f"probe-{uuid.uuid4().hex}")
            ms[form].append(_post(url, body) * 1e3)
    out = {form: _summary(xs) for form, xs in ms.items()}
    out["prefill_over_plain_p50"] = round(out["prefill"]["p50"] / out["plain"]["p50"], 3)
    return out


def decode_floor(url: str, model: str, tokens: int, n: int = 20, seed: int = 11) -> dict:
    """``n`` fresh prompts of ``tokens`` tokens: ms p50/p90 to the first token of prompt + 1 token
    (the prompt's KV in vLLM's prefix cache) and from it to the second."""
    if n < 1 or tokens < 1:
        raise ValueError(f"probe: n {n} and tokens {tokens} must be >= 1")
    rng = random.Random(seed * 1_000_003 + tokens)
    first, gap = [], []
    for _ in range(n):
        prompt = [rng.randrange(*VOCAB) for _ in range(tokens)]
        _post(url, {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0})
        times = _stream_times(url, {"model": model, "prompt": prompt + [rng.randrange(*VOCAB)], "max_tokens": 2,
                                    "temperature": 0, "ignore_eos": True, "stream": True})
        first.append(times[0] * 1e3)
        gap.append((times[1] - times[0]) * 1e3)
    return {"first_token": _summary(first), "gap_1_2": _summary(gap)}


def _summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90), "min": min(xs), "max": max(xs)}


def _cells(a: dict, b: dict, ratio: str = "") -> str:
    """A table row's cells for two summaries: p50 / p90 of each, ``ratio``, then their spreads."""
    return (f"{a['n']} | {a['p50']:.1f} / {a['p90']:.1f} | {b['p50']:.1f} / {b['p90']:.1f} | {ratio}"
            f"{a['min']:.1f}-{a['max']:.1f} / {b['min']:.1f}-{b['max']:.1f} |")


def _stream_times(url: str, body: dict) -> list[float]:
    """Seconds from sending to each streamed token (two at least, or a RuntimeError)."""
    req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0, times = time.perf_counter(), []
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0].get("text") is not None:
                times.append(time.perf_counter() - t0)
    if len(times) < 2:
        raise RuntimeError(f"the streamed answer had {len(times)} tokens, expected 2")
    return times


def format_floor(results: dict[int, dict]) -> str:
    """The markdown table of ``decode_floor`` results by prompt length."""
    lines = ["| context tokens | n | first token p50 / p90 ms (1 token computed) | token 1 to 2 p50 / p90 ms | "
             "spread first / gap |", "|---:|---:|---:|---:|---:|"]
    for tokens, r in sorted(results.items()):
        lines.append(f"| {tokens} | " + _cells(r["first_token"], r["gap_1_2"]))
    return "\n".join(lines)


def format_probe(results: dict[int, dict]) -> str:
    """The markdown table of ``probe`` results by prompt length."""
    lines = ["| prompt tokens | n | plain streamed TTFT p50 / p90 ms | prefill half p50 / p90 ms | "
             "prefill/plain p50 | spread (min-max) plain / prefill |", "|---:|---:|---:|---:|---:|---:|"]
    for tokens, r in sorted(results.items()):
        lines.append(f"| {tokens} | " + _cells(r["plain"], r["prefill"], f"{r['prefill_over_plain_p50']:.2f} | "))
    return "\n".join(lines)
