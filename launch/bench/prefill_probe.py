"""The prefill instance alone: what its connector costs the first token, without the proxy.

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
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0].get("text"):
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
    out = {form: {"n": len(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90), "min": min(xs),
                  "max": max(xs)} for form, xs in ms.items()}
    out["prefill_over_plain_p50"] = round(out["prefill"]["p50"] / out["plain"]["p50"], 3)
    return out


def format_probe(results: dict[int, dict]) -> str:
    """The markdown table of ``probe`` results by prompt length."""
    lines = ["| prompt tokens | n | plain streamed TTFT p50 / p90 ms | prefill half p50 / p90 ms | "
             "prefill/plain p50 | spread (min-max) plain / prefill |", "|---:|---:|---:|---:|---:|---:|"]
    for tokens, r in sorted(results.items()):
        a, b = r["plain"], r["prefill"]
        lines.append(f"| {tokens} | {a['n']} | {a['p50']:.1f} / {a['p90']:.1f} | {b['p50']:.1f} / {b['p90']:.1f} | "
                     f"{r['prefill_over_plain_p50']:.2f} | {a['min']:.1f}-{a['max']:.1f} / "
                     f"{b['min']:.1f}-{b['max']:.1f} |")
    return "\n".join(lines)
