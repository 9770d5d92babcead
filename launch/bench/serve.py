"""`pd bench serve`: P/D against colocated serving under the same load (TTFT, TPOT, ITL, goodput).

For each mode it launches a deployment of the same model on this machine, one after the other
(each gets the whole machine): ``pd`` = 1 prefill + 1 decode instance; ``colocated`` = as many
plain vLLM instances (``--colocated`` of them, default 2: the same instance count), behind the
same proxy. Then it replays one workload through the proxy, streaming every answer:

* requests arrive as a Poisson process of ``--rate`` per second (seeded), ``--requests`` of them;
* a ``--long-fraction`` of them have ``--long-tokens`` prompt tokens, the rest ``--short-tokens``
  (random token ids, seeded; the same prompts in both modes), each asks ``--max-tokens`` tokens
  (``ignore_eos``, so every answer has that many).

Per request: TTFT (send .. first token), TPOT ((last token - first token) / (tokens - 1)), and
every inter-token latency (ITL, from the arrival times of the streamed tokens). Per mode:
p50/p90/p99 of each, output throughput (tokens / (first send .. last token)), request rate, and
goodput: requests per second that met both SLOs (``--slo-ttft-ms``, ``--slo-tpot-ms``). The last
column is pd / colocated. The answers of the two modes are compared (greedy decoding): the count
of equal ones is printed. For mode pd, each request's transfer record (``GET /pd/transfers/{pd_id}``)
gives the p50/p99 of each span of its timeline: where the time goes (docs/design.md, "The timeline").

Long prefills stall the decoding of other requests on a colocated instance; on a P/D deployment
they run on the prefill instance, so the short requests' TPOT/ITL tails are where P/D should win,
and TTFT of long prompts is where it pays (the transfer).

``--device cuda`` (``launch.bench.gpu``) runs the same on GPUs, with a third mode ``nixl`` (vLLM's
NixlConnector), a one-request-at-a-time phase before the Poisson one, and the KV transfer time as
a share of TTFT; see scripts/gpu/README.md.
"""
from __future__ import annotations

import argparse

from common.config import load, merge
from launch.bench.gpu import (
    add_gpu_arguments,
    format_spans,
    run_gpu,
    run_sequential,
    sequential_part,
    span_summary,
    transfers,
)
from launch.bench.serve_load import (
    format_table,
    make_workload,
    run_load,
    send_one,
    summarize,
)
from launch.procs import check_model, check_ports, served_name
from launch.supervise import Deployment
from pd.config import DeploymentConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="models/tiny-llama")
    p.add_argument("--requests", type=int, default=32, help="requests per mode (default 32)")
    p.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second (Poisson; default 2)")
    p.add_argument("--long-fraction", type=float, default=0.25,
                   help="share of requests with a long prompt (default 0.25)")
    p.add_argument("--long-tokens", type=int, default=1500, help="long prompt length (default 1500)")
    p.add_argument("--short-tokens", type=int, default=128, help="short prompt length (default 128)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="goodput SLO on TTFT (default 2000)")
    p.add_argument("--slo-tpot-ms", type=float, default=100.0, help="goodput SLO on TPOT (default 100)")
    p.add_argument("--colocated", type=int, default=2, help="colocated instances (default 2)")
    p.add_argument("--modes", default="pd,colocated",
                   help="modes to run, in order (default pd,colocated; pd_old: pdkv with the old flow, where "
                        "decode samples token 1; --device cuda also nixl, and pd_host: pd with its shm chunks in host memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8000, help="proxy port (default 8000)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: on GPUs, modes pd, colocated and nixl (launch.bench.gpu; its options below)")
    add_gpu_arguments(p)


def _deployment(mode: str, model: str, args) -> DeploymentConfig:
    over: dict = {"model": model, "proxy": {"port": args.port}}
    if mode == "colocated":
        over.update(mode="colocated", prefill={"count": args.colocated}, decode={"count": 0})
    elif mode == "pd_old":  # the old flow: decode samples token 1 (proxy.first_token decode)
        over["proxy"]["first_token"] = "decode"
    elif mode != "pd":
        raise ValueError(f"--modes: unknown mode {mode!r}; allowed pd, colocated, pd_old")
    return merge(load(DeploymentConfig, {}), over)


def run(args) -> int:
    if getattr(args, "device", "cpu") == "cuda":
        return run_gpu(args)
    model = str(check_model(args.model))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    workload = make_workload(args.requests, args.rate, args.long_fraction, args.long_tokens,
                             args.short_tokens, args.max_tokens, args.seed)
    deps = {m: _deployment(m, model, args) for m in modes}
    for dep in deps.values():
        check_ports(dep)
    seq = sequential_part(workload, args.sequential)
    figures, seq_figures, texts, spans = {}, {}, {}, {}
    slo = (args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    for mode, dep in deps.items():
        d = Deployment(dep)
        try:
            d.start(progress=lambda line: None)
            name = served_name(dep)
            run_load(d.proxy_url, name, [workload[0]])  # warm up the HTTP path and the engines
            seq_res, seq_wall = run_sequential(d.proxy_url, name, seq, send_one)
            results, wall = run_load(d.proxy_url, name, workload)
            if mode in ("pd", "pd_old"):
                spans[mode] = span_summary(transfers(d.proxy_url, results))
        finally:
            d.stop()
        if seq:
            seq_figures[mode] = summarize(seq_res, seq_wall, *slo)
        figures[mode] = summarize(results, wall, *slo)
        texts[mode] = [r.text if r.ok else None for r in results]
        for r in results:
            if not r.ok:
                print(f"# {mode}: a request failed: {r.error}")
    n_long = sum(r.long for r in workload)
    print(f"# pd bench serve: {args.requests} requests, Poisson {args.rate}/s, {n_long} long "
          f"({args.long_tokens} tokens) and {args.requests - n_long} short ({args.short_tokens} tokens), "
          f"{args.max_tokens} output tokens each, seed {args.seed}; SLOs TTFT <= {args.slo_ttft_ms:g} ms, "
          f"TPOT <= {args.slo_tpot_ms:g} ms; pd = 1 prefill + 1 decode, colocated = {args.colocated} "
          f"instance(s); model {model}")
    if seq_figures:
        print(f"\n## one request at a time ({len(seq)}: long and short alternating)\n")
        print(format_table(seq_figures))
        print("\n## Poisson arrivals\n")
    print(format_table(figures))
    first, *others = list(texts) or [""]
    for m in others:  # the Poisson phase's answers
        same = sum(x is not None and x == y for x, y in zip(texts[first], texts[m]))
        print(f"# same answer in {first} and {m}: {same} of {len(workload)}")
    for mode, summary in spans.items():
        print(f"\n# {mode}: where the time goes (each request's timeline, /pd/transfers)\n")
        print(format_spans(summary))
    return 0 if all(f["failed"] == 0 for f in [*figures.values(), *seq_figures.values()]) else 1
