"""What the hand-off's logprobs entry costs a prefill half: one vLLM instance, max_tokens 1, with and without ``logprobs: 0``.

    .venv/bin/python scripts/bench_logprobs.py [--model models/tiny-llama] [--lengths 256,1024] [--samples 30]

With ``proxy.early_decode: greedy`` the proxy asks the prefill half for token 1's logprobs entry
(``pd.proxy.first_token.prefill_body``: token 1 decoded alone, which ``pd.proxy.early.handoff_allowed``
checks). This starts a plain vLLM OpenAI server (``--no-enable-prefix-caching``, so every request
computes its whole prompt), warms it up with 4 requests a length, then sends ``--samples`` pairs of
completions of random token prompts, alternating without and with ``logprobs: 0``, one at a time,
and prints each kind's p50, min and max latency (client side, whole request) and their ratio.
Pin it to a core (``taskset -c 0``) on a small machine.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait_up(url: str, proc: subprocess.Popen, log: str) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited ({proc.returncode}); see {log}")
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"vLLM did not come up in 600 s; see {log}")


def _measure(url: str, model: str, vocab: int, n: int, samples: int, rnd: random.Random) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"none": [], "logprobs0": []}
    for i in range(2 * samples + 8):
        kind = "logprobs0" if i % 2 else "none"
        body = {"model": model, "prompt": [rnd.randrange(10, vocab) for _ in range(n)], "max_tokens": 1,
                "temperature": 0, "return_token_ids": True, **({"logprobs": 0} if kind == "logprobs0" else {})}
        t = time.perf_counter()
        r = requests.post(url + "/v1/completions", json=body, timeout=120)
        dt = (time.perf_counter() - t) * 1000
        if r.status_code != 200:
            raise SystemExit(f"vLLM answered {r.status_code}: {r.text[:300]}")
        if i >= 8:  # the first four of each kind warm up
            out[kind].append(dt)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-llama"))
    ap.add_argument("--lengths", default="256,1024", help="prompt lengths in tokens, comma separated")
    ap.add_argument("--samples", type=int, default=30, help="requests of each kind a length (at least 20)")
    ap.add_argument("--port", type=int, default=18911)
    args = ap.parse_args()
    if args.samples < 20:
        ap.error(f"--samples {args.samples}: a latency figure needs at least 20 samples")
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        ap.error(f"--lengths {args.lengths!r}: comma-separated token counts, e.g. 256,1024")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    url = f"http://127.0.0.1:{args.port}"
    log = tempfile.mktemp(prefix="bench-logprobs-", suffix=".log")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
                                 "--port", str(args.port), "--no-enable-prefix-caching"],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_up(url, proc, log)
        rnd = random.Random(3)
        print(f"# scripts/bench_logprobs.py --model {args.model} --lengths {args.lengths} --samples {args.samples}")
        print("| prompt tokens | n | no logprobs p50 (min-max) ms | logprobs 0 p50 (min-max) ms | ratio p50 |")
        print("|---:|---:|---:|---:|---:|")
        for n in lengths:
            got = _measure(url, args.model, vocab, n, args.samples, rnd)
            a, b = got["none"], got["logprobs0"]
            print(f"| {n} | {len(a)} | {statistics.median(a):.1f} ({min(a):.1f}-{max(a):.1f}) | "
                  f"{statistics.median(b):.1f} ({min(b):.1f}-{max(b):.1f}) | {statistics.median(b) / statistics.median(a):.3f} |")
    finally:
        proc.terminate()
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
