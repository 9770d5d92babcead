"""`pd bench ttft`: time to first token of a long prompt, cold vs warm (prefix in the store).

Launches a 1P1D deployment with a store (``--backend local``, or ``hf3fs`` through
``hf3fs_fuse.io``: see ``launch.scratch_store``) in a fresh directory and vLLM's own prefix cache
off (so a warm request can only be served by pdkv's store), then streams each prompt through
the proxy twice: the first time (cold) the prefill instance computes it; the second time
(warm) it loads the stored chunks and computes only the last partial chunk.

``--device cuda`` (``launch.bench.ttft_gpu``): the same on a GPU for pdkv's store (and its DRAM
tier) beside LMCache's local disk and CPU tiers, at several lengths, one mode after the other.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import urllib.request

from common.config import load, merge
from launch.bench.peers import add_cuda_arguments
from launch.bench.ttft_gpu import run_gpu
from launch.bench.vllm_bench import cold_then_warm, command, report
from launch.procs import check_model, check_ports
from launch.scratch_store import ScratchStore
from launch.supervise import Deployment
from pd.config import DeploymentConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="models/tiny-llama")
    p.add_argument("--tokens", type=int, default=1800, help="prompt length")
    p.add_argument("--prompts", type=int, default=5, help="distinct prompts, each sent cold then warm")
    p.add_argument("--backend", default="local", help="store backend: local or hf3fs (default local)")
    p.add_argument("--store-path", help="directory for the store (default: a fresh temp dir)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0, help="--device cuda: the prompts' seed (default 0)")
    p.add_argument("--vllm-bench", type=int, default=0, metavar="N",
                   help="seed 004's workflow instead of the prompts above: vLLM's `vllm bench serve` with N "
                        "random prompts of --tokens tokens (--seed), run twice, cold then warm (0 = off)")
    p.add_argument("--output-tokens", type=int, default=128, help="--vllm-bench: output tokens a request (128)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: pdkv's store, one length (--tokens); cuda: the options below")
    add_cuda_arguments(p)


def ttft(url: str, model: str, prompt: list[int] | str, max_tokens: int = 8) -> tuple[float, str]:
    """(seconds to the first streamed token, the whole text) of one completion through ``url``."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, text = None, ""
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0].get("text", "")
                if ttft is None and delta:
                    ttft = time.perf_counter() - t0
                text += delta
    return (ttft if ttft is not None else time.perf_counter() - t0), text


def run(args) -> int:
    if args.device == "cuda":
        return run_gpu(args)
    model = check_model(args.model)
    store = ScratchStore(args.backend, args.store_path)
    dep = merge(load(DeploymentConfig, {}), {
        "model": str(model), "proxy": {"port": args.port},
        "vllm": {"extra_args": ["--no-enable-prefix-caching"]},
        "connector": {"store": store.config()},
    })
    try:
        check_ports(dep)
    except BaseException:
        store.cleanup()
        raise
    name = model.name
    deployment = Deployment(dep)
    rows = []
    try:
        deployment.start(progress=lambda line: None)
        url = deployment.proxy_url
        ttft(url, name, [1, 2, 3])  # warm up the HTTP path and the engines
        if args.vllm_bench:
            runs = cold_then_warm(command(url, name, str(model), args.vllm_bench, args.tokens,
                                          args.output_tokens, args.seed))
            print(f"# pd bench ttft --vllm-bench {args.vllm_bench}: vllm bench serve, random {args.tokens}-token "
                  f"prompts, {args.output_tokens} output tokens, seed {args.seed}, run twice; 1P1D, "
                  f"store/{args.backend}, vLLM prefix cache off")
            print(report(runs, "run"))
            return 0 if all(r["completed"] == args.vllm_bench and not r.get("failed") for r in runs.values()) else 1
        for i in range(args.prompts):
            prompt = [random.Random(i).randrange(16, 4000) for _ in range(args.tokens)]
            cold, cold_text = ttft(url, name, prompt)
            time.sleep(0.5)  # let the write-through reach the store
            warm, warm_text = ttft(url, name, prompt)
            rows.append((cold, warm, cold_text == warm_text))
    finally:
        deployment.stop()
        store.cleanup()
    cold = statistics.median(r[0] for r in rows)
    warm = statistics.median(r[1] for r in rows)
    print(f"# pd bench ttft: {args.tokens}-token prompts, {args.prompts} prompts, 1P1D, "
          f"store/{args.backend}, vLLM prefix cache off")
    if store.note:
        print(f"# {store.note}")
    print("| prompt | cold TTFT ms | warm TTFT ms | cold/warm | same output |")
    print("|---:|---:|---:|---:|---|")
    for i, (c, w, same) in enumerate(rows):
        print(f"| {i} | {c * 1e3:.1f} | {w * 1e3:.1f} | {c / w:.2f} | {'yes' if same else 'NO'} |")
    print(f"| median | {cold * 1e3:.1f} | {warm * 1e3:.1f} | {cold / warm:.2f} | |")
    return 0 if all(r[2] for r in rows) else 1
