#!/usr/bin/env python
"""Prefix-aware routing against least-outstanding on real vLLM instances: how many prompt tokens
the instances compute (vLLM's prefix-cache queries minus hits, from their /metrics) and the
latency, for requests that share long document prefixes.

`pd launch` starts N colocated instances with a least_outstanding proxy; a second proxy with the
prefix policy is started on the same instances; each policy gets its own documents (so neither
hits the other's cache), least_outstanding once before and once after prefix. Requests are sent
one at a time (docs/design.md, "Routing"). Run under the heavy-run lock on shared machines:

    flock /tmp/pdkv-heavy.lock .venv/bin/python scripts/prefix_routing.py --model models/tiny-llama
"""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta"]


def counters(urls: list[str]) -> dict[str, float]:
    out = dict.fromkeys(("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"), 0.0)
    for u in urls:
        text = urllib.request.urlopen(u + "/metrics", timeout=10).read().decode()
        for name in out:
            out[name] += sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)", text, re.M))
    return out


def complete(proxy: str, model: str, prompt: str) -> tuple[float, int]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(proxy + "/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.monotonic()
    ans = json.loads(urllib.request.urlopen(req, timeout=600).read())
    return time.monotonic() - t0, ans["usage"]["prompt_tokens"]


def run(proxy: str, model: str, instances: list[str], args, seed: int) -> dict:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(args.doc_words)) for _ in range(args.docs)]
    before, times, tokens = counters(instances), [], 0
    for d in docs:
        for k in range(args.questions):
            t, n = complete(proxy, model, f"{d} question number {k} {rng.random()}?")
            times.append(t)
            tokens += n
    after = counters(instances)
    queried = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    hit = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    return {"requests": len(times), "prompt_tokens": tokens, "computed_tokens": queried - hit, "hit_tokens": hit,
            "latency_p50_s": round(sorted(times)[len(times) // 2], 4)}


def wait_for(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} not healthy within {timeout} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--questions", type=int, default=4, help="requests per document")
    p.add_argument("--doc-words", type=int, default=900)
    p.add_argument("--port", type=int, default=18940, help="proxies on PORT and PORT+1, instances from PORT+2")
    p.add_argument("--max-model-len", type=int, default=4096)
    args = p.parse_args()
    base = args.port + 2
    instances = [f"http://127.0.0.1:{base + i}" for i in range(args.instances)]
    run_dir = Path(tempfile.mkdtemp(prefix="pdkv-prefix-routing-"))
    cfg = {"model": str(Path(args.model).resolve()), "mode": "colocated", "run_dir": str(run_dir / "run"),
           "decode": {"count": args.instances, "port_base": base}, "prefill": {"count": 0, "port_base": base - 1},
           "proxy": {"port": args.port, "policy": "least_outstanding"},
           "vllm": {"max_model_len": args.max_model_len, "max_num_seqs": 8}}
    (run_dir / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    model = Path(args.model).name
    with open(run_dir / "launch.out", "w") as log:
        launch = subprocess.Popen([sys.executable, "-m", "launch.cli", "launch", "--config", str(run_dir / "cfg.yaml")],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    prefix = None
    try:
        for url in (f"http://127.0.0.1:{args.port}", *instances):
            wait_for(url, launch, 900)
        lo = run(f"http://127.0.0.1:{args.port}", model, instances, args, 1)
        prefix = subprocess.Popen([sys.executable, "-m", "launch.cli", "proxy", "--colocated", ",".join(instances),
                                   "--port", str(args.port + 1), "--policy", "prefix"], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(f"http://127.0.0.1:{args.port + 1}", prefix, 60)
        px = run(f"http://127.0.0.1:{args.port + 1}", model, instances, args, 2)
        lo2 = run(f"http://127.0.0.1:{args.port}", model, instances, args, 3)
    finally:
        for proc in (prefix, launch):
            if proc is not None:
                proc.terminate()
                proc.wait(120)
    print(json.dumps({"config": vars(args), "least_outstanding": lo, "prefix": px, "least_outstanding_again": lo2,
                      "computed_prefix_vs_least_outstanding": round(px["computed_tokens"] / lo["computed_tokens"], 3)},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
