"""`pd bench serve`: P/D against colocated serving under the same load (TTFT, TPOT, ITL, goodput).

For each mode it launches a deployment of the same model on this machine, one after the other
(each gets the whole machine): ``pd`` = 1 prefill + 1 decode instance (``--split``: any xPyD, or
several); ``colocated`` = as many plain vLLM instances (``--colocated`` of them, default the
split's count), behind the same proxy. Then it replays one workload through the proxy, streaming
every answer (``--rates``/``--workloads`` make a sweep instead: ``launch.bench.sweep``):

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

from launch.bench.gpu import (
    add_gpu_arguments,
    format_spans,
    run_gpu,
    run_sequential,
    sequential_requests,
    span_summary,
    transfers,
)
from launch.bench.modes import PD_FLOWS, cpu_deployment, mode_list, variants
from launch.bench.serve_load import (
    answer,
    format_table,
    make_workload,
    run_load,
    send_one,
    summarize,
)
from launch.bench.sweep import is_sweep, run_sweep
from launch.bench.workloads import fill_legacy_slos, parse_splits
from launch.procs import check_model, check_ports, served_name
from launch.supervise import Deployment


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="models/tiny-llama")
    p.add_argument("--requests", type=int, default=32, help="requests per mode (default 32)")
    p.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second (Poisson; default 2)")
    p.add_argument("--long-fraction", type=float, default=0.25,
                   help="share of requests with a long prompt (default 0.25)")
    p.add_argument("--long-tokens", type=int, default=1500, help="long prompt length (default 1500)")
    p.add_argument("--short-tokens", type=int, default=128, help="short prompt length (default 128)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="goodput SLO on TTFT (default 2000; in a sweep each workload's, DistServe-like: see docs)")
    p.add_argument("--slo-tpot-ms", type=float, default=None,
                   help="goodput SLO on TPOT (default 100; in a sweep each workload's, DistServe-like: see docs)")
    p.add_argument("--colocated", type=int, default=None,
                   help="colocated instances (default: as many as each --split has, 2 for 1P1D)")
    p.add_argument("--split", default="1P1D", metavar="xPyD[,...]",
                   help="prefill:decode split(s) of the P/D modes, e.g. 1P1D,1P3D,2P2D,3P1D (default 1P1D); "
                        "colocated runs the same number of instances")
    s = p.add_argument_group("sweep (launch.bench.sweep; either option makes a sweep)")
    s.add_argument("--rates", default=None, metavar="R[,...]",
                   help="request rates per second, each run in turn on one start of each mode (default --rate)")
    s.add_argument("--workloads", default=None, metavar="W[,...]",
                   help="chat, longdoc, decode_heavy, custom (the --long-*/--short-tokens/--max-tokens mix; the "
                        "default)")
    s.add_argument("--length-scale", type=float, default=None,
                   help="prompt and output lengths times this (default 1 on cuda, 0.2 on the CPU, whose test "
                        "model is slow and has max_model_len 2048)")
    s.add_argument("--slo-attainment", type=float, default=0.9,
                   help="the share of requests within the SLOs a sustained rate needs (default 0.9, as DistServe's plots)")
    p.add_argument("--modes", default="pd,colocated",
                   help="modes to run, in order (default pd,colocated; pd_old: pdkv with the old flow, where "
                        "decode samples token 1; pd_after: the decode half sent once the prefill has answered, "
                        "not with it (proxy.early_decode never); pd_recompute: the early decode computes token 1 itself "
                        "(proxy.early_decode greedy_recompute); pd_handoff: it is handed the prefill's token 1 "
                        "(greedy, the default, as pd); --device cuda also nixl, pd_host: pd with its shm chunks in host "
                        "memory, and lmcache_pd: LMCache's disaggregated prefill, launch/bench/lmcache_pd.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8000, help="proxy port (default 8000)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: on GPUs, modes pd, colocated and nixl (launch.bench.gpu; its options below)")
    add_gpu_arguments(p)


def run(args) -> int:
    if is_sweep(args):
        return run_sweep(args)
    if getattr(args, "device", "cpu") == "cuda":
        return run_gpu(args)
    fill_legacy_slos(args)
    model = str(check_model(args.model))
    vs = variants(mode_list(args), parse_splits(args.split), args.colocated)
    workload = make_workload(args.requests, args.rate, args.long_fraction, args.long_tokens,
                             args.short_tokens, args.max_tokens, args.seed)
    deps = {v.label: cpu_deployment(v, model, args) for v in vs}
    modes = {v.label: v.mode for v in vs}
    for dep in deps.values():
        check_ports(dep)
    seq = sequential_requests(args)
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
            if modes[mode] in PD_FLOWS:
                spans[mode] = span_summary(transfers(d.proxy_url, results))
        finally:
            d.stop()
        if seq:
            seq_figures[mode] = summarize(seq_res, seq_wall, *slo)
        figures[mode] = summarize(results, wall, *slo)
        texts[mode] = [answer(r) for r in results]
        for r in results:
            if not r.ok:
                print(f"# {mode}: a request failed: {r.error}")
    n_long = sum(r.long for r in workload)
    print(f"# pd bench serve: {args.requests} requests, Poisson {args.rate}/s, {n_long} long "
          f"({args.long_tokens} tokens) and {args.requests - n_long} short ({args.short_tokens} tokens), "
          f"{args.max_tokens} output tokens each, seed {args.seed}; SLOs TTFT <= {args.slo_ttft_ms:g} ms, "
          f"TPOT <= {args.slo_tpot_ms:g} ms; " + ", ".join(f"{v.label} = {v.split}" for v in vs) +
          f"; model {model}")
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
