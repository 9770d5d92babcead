"""`pd bench serve --device cuda`: pdkv P/D, colocated and vLLM's NixlConnector on GPUs, one workload.

Each mode gets the same GPUs, one after the other: instance i (prefill ones first) on GPU i mod
the GPUs used (``--gpus``, default all, at most the largest mode's instances); instances that share
a GPU get ``--kv-cache-gb`` of KV cache each (default 48 / instances per GPU) and a share of
``--gpu-memory-utilization``. With ``--split`` (``launch.bench.modes``) the P/D modes run each
split (1P3D, 2P2D, ...) and colocated the same number of instances; the default, 1P1D:

* ``pd``: pdkv, 1 prefill + 1 decode instance, coordinator and pd proxy (``pd launch``);
* ``colocated``: 2 plain instances behind the same pd proxy;
* ``nixl``: 2 instances with vLLM's NixlConnector (``kv_role`` kv_both, ``kv_buffer_device``
  cuda, a side-channel port each) and vLLM's proxy flow, done here by the client: the prompt goes
  to the prefill instance with ``kv_transfer_params`` ``{"do_remote_decode": true, ...}`` and
  ``max_tokens`` 1, then the ``kv_transfer_params`` of its answer go with the request to the
  decode instance, whose stream is the answer. TTFT counts from the prefill request's send.

Per mode: a warm-up (one request, then a burst of overlapping ones: ``warm_up``), then ``--sequential`` requests one at a time (the first ones of the
workload, long and short), then the whole workload under Poisson arrivals. Answers (greedy) are
compared with the first mode's, request by request. For pd, each request's transfer record
(``GET /pd/transfers/{pd_id}`` on the proxy: load_ms, wait_ms, bytes, READY parts, tail_ms) gives
the KV transfer time as a share of its TTFT: ``load`` is all the time decode spent loading (much
of it overlapped with the prefill, as chunks stream), ``tail`` the part after the prefill's last
chunks were out (final READY -> DONE), which is what the transfer adds to TTFT; the p50/p99 of each
span of the records' timelines (docs/design.md, "The timeline") show where the rest of the time goes.
A JSON with everything and the printed tables go to ``--out``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
import urllib.request
from pathlib import Path

from common.config import load, merge
from launch.bench.serve_load import (
    Request,
    Result,
    answer,
    completion_body,
    format_table,
    make_workload,
    run_load,
    send_one,
    stream_into,
    summarize,
)
from launch.bench import probe
from launch.bench import lmcache_pd
from launch.bench.modes import PD_FLOWS, Variant, mode_list, variants
from launch.bench.workloads import fill_legacy_slos, parse_splits
from launch.gpus import gpu_count
from launch.procs import check_model, check_ports, served_name
from launch.supervise import Deployment
from pd.config import DeploymentConfig
from pd.coordinator import timeline

NIXL_SIDE_CHANNEL_BASE = 5600
GPU_MODES = ("pd", "colocated", "nixl", "pd_old", "pd_after", "pd_recompute", "pd_handoff", "pd_host", lmcache_pd.MODE)
# pd_old: pdkv with the old flow (proxy.first_token decode); pd_after: the decode half sent once
# the prefill has answered (proxy.early_decode never); pd_recompute: the early decode computes token 1
# itself (proxy.early_decode greedy_recompute); pd_handoff: it is handed the prefill's
# token 1 (greedy, the default: pd does the same); pd_host: pdkv with its shm chunks in
# shared host memory (connector.transport.shm_memory host) instead of the prefill's GPU memory;
# lmcache_pd: LMCache's disaggregated prefill through LMCacheConnectorV1 (launch.bench.lmcache_pd).
PD_MODES = ("pd", "pd_old", "pd_after", "pd_recompute", "pd_handoff", "pd_host")


def add_gpu_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--device cuda")
    g.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all nvidia-smi lists, at most the largest mode's instance count)")
    g.add_argument("--load-format", default="dummy", help="vLLM --load-format (default dummy: random weights)")
    g.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV cache per instance, GiB (default: vLLM sizes it; 48 / instances per GPU when instances "
                        "share a GPU)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.0, help="per instance (0 = automatic)")
    g.add_argument("--max-model-len", type=int, default=10240, help="(default 10240)")
    g.add_argument("--block-size", type=int, default=32, help="(default 32)")
    g.add_argument("--chunk-size", type=int, default=1024, help="pdkv connector.chunk_size (default 1024)")
    g.add_argument("--pool-mb", type=int, default=16384,
                   help="pdkv connector.transport.pool_size_mb (default 16384: an 8k-token prompt of an "
                        "8B model is 1 GiB of KV, and several are in flight under load)")
    g.add_argument("--gpu-pool-mb", type=int, default=4096,
                   help="the same for modes pd and pd_old, whose shm chunks live in the prefill's GPU memory "
                        "(connector.transport.shm_memory gpu; default 4096: taken from the GPU, beside the KV cache)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="(default 64)")
    g.add_argument("--dtype", default="default", choices=("default", "bfloat16", "float16", "float32"),
                   help="vllm.dtype of every mode (default: bfloat16 on the GPU; float32 with a small random "
                        "model for greedy answers that batch shapes do not flip)")
    g.add_argument("--prefill-step-tokens", type=int, default=0,
                   help="pdkv's prefill instance: --max-num-batched-tokens, so a long prompt is prefilled "
                        "over several steps and its KV streams to decode meanwhile (default 0 = vLLM's, as "
                        "the colocated instances: with token 1 from the prefill, smaller steps cost TTFT)")
    g.add_argument("--enforce-eager", dest="enforce_eager", action="store_true", default=False,
                   help="every mode without CUDA graphs (faster start, slower decode); by default vLLM compiles "
                        "and captures them, its compile cache (VLLM_CACHE_ROOT, default ~/.cache/vllm) shared by "
                        "the instances of the run")
    g.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false",
                   help="CUDA graphs (the default)")
    g.add_argument("--sequential", type=int, default=8,
                   help="requests sent one at a time before the Poisson phase (default 8; on the CPU too)")
    g.add_argument("--prefill-probe", type=int, default=20, metavar="N",
                   help="pd mode: N fresh prompts of each length straight to the prefill instance, plain vs as the "
                        "proxy's prefill half, and to the decode instance for its floor (launch/bench/probe.py; default 20, 0 = off)")
    g.add_argument("--ucx-tls", default="", help="UCX_TLS for the nixl instances (default: UCX's choice)")
    g.add_argument("--lmcache-pd-buffer-gb", type=float, default=4.0,
                   help="lmcache_pd: LMCache pd_buffer_size, GiB, in each instance's GPU memory (default 4)")
    g.add_argument("--out", default=None, help="JSON results file (default $OUT/bench_gpu.json, else ./bench_gpu.json; a sweep, "
                        "on the CPU too: bench_sweep.json)")


def gpu_lists(prefill: int, decode: int, n_gpus: int) -> tuple[str, str, int]:
    """The ``gpus`` of the prefill and decode groups, instance i (prefill first) on GPU i mod
    ``n_gpus``, and the most instances one GPU then has."""
    ids = [str(i % n_gpus) for i in range(prefill + decode)]
    return ";".join(ids[:prefill]), ";".join(ids[prefill:]), -(-(prefill + decode) // n_gpus)


def gpu_deployment(mode: str, model: str, args, n_gpus: int, prefill: int = 1, decode: int = 1) -> DeploymentConfig:
    """The DeploymentConfig of one mode with ``prefill`` + ``decode`` instances (colocated: that many
    plain ones) on ``n_gpus`` GPUs, instance i on GPU i mod ``n_gpus``."""
    if mode not in GPU_MODES:
        raise ValueError(f"--modes: unknown mode {mode!r}; allowed {', '.join(GPU_MODES)}")
    p_gpus, d_gpus, per_gpu = gpu_lists(prefill, decode, n_gpus)
    kv_gb = args.kv_cache_gb if args.kv_cache_gb is not None else (0.0 if per_gpu == 1 else 48.0 / per_gpu)
    vllm = {"device": "cuda", "load_format": args.load_format if args.load_format != "auto" else "",
            "max_model_len": args.max_model_len, "block_size": args.block_size, "max_num_seqs": args.max_num_seqs,
            "enforce_eager": args.enforce_eager, "kv_cache_memory_gb": kv_gb,
            "gpu_memory_utilization": args.gpu_memory_utilization, "dtype": args.dtype}
    over: dict = {"model": model, "proxy": {"port": args.port}, "vllm": vllm,
                  "prefill": {"count": prefill, "gpus": p_gpus}, "decode": {"count": decode, "gpus": d_gpus}}
    if mode in PD_MODES:
        over["proxy"].update(PD_FLOWS.get(mode, {}))
        gpu_memory = mode != "pd_host"
        over["connector"] = {"chunk_size": args.chunk_size,
                             "transport": {"name": "bench", "pool_size_mb": args.gpu_pool_mb if gpu_memory else args.pool_mb,
                                           "shm_memory": "gpu" if gpu_memory else "host"}}
        if args.prefill_step_tokens:
            over["prefill"]["extra_args"] = ["--max-num-batched-tokens", str(args.prefill_step_tokens)]
    else:
        over["mode"] = "colocated"
    if mode in ("nixl", lmcache_pd.MODE) and (prefill, decode) != (1, 1):
        raise ValueError(f"--modes {mode}: runs 1P1D only, not {prefill}P{decode}D (its side-channel ports are "
                         f"per instance, and a group's env is the same for all its instances); give {mode} "
                         "--split 1P1D alone, or leave it out")
    if mode == lmcache_pd.MODE:
        for group, o in lmcache_pd.overrides(lmcache_pd.conf_dir(args.port)).items():
            over[group].update(o)
    if mode == "nixl":
        kv = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cuda"})
        for i, group in enumerate(("prefill", "decode")):
            env = [f"VLLM_NIXL_SIDE_CHANNEL_PORT={NIXL_SIDE_CHANNEL_BASE + i}", "VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1"]
            if args.ucx_tls:
                env.append(f"UCX_TLS={args.ucx_tls}")
            over[group].update(extra_args=["--kv-transfer-config", kv], env=env)
    return merge(load(DeploymentConfig, {}), over)


# ---- vLLM's proxy flow for the NixlConnector -------------------------------------------------


def nixl_prefill_params() -> dict:
    """What the prefill request carries: compute, keep the blocks for a remote decode."""
    return {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}


def nixl_send(prefill_urls: list[str], decode_urls: list[str]):
    """A ``send(url, model, req, res)`` for ``run_load`` that does the two hops of the NIXL flow,
    request k on prefill instance k mod x and decode instance k mod y (xPyD)."""
    turns = itertools.count()

    def send(_url: str, model: str, req: Request, res: Result) -> None:
        res.sent = time.perf_counter()
        k = next(turns)  # atomic under the GIL
        prefill_url, decode_url = prefill_urls[k % len(prefill_urls)], decode_urls[k % len(decode_urls)]
        try:
            body = completion_body(model, req)
            first = dict(body, stream=False, max_tokens=1, kv_transfer_params=nixl_prefill_params())
            first.pop("stream_options", None)
            r = urllib.request.Request(f"{prefill_url}/v1/completions", json.dumps(first).encode(),
                                       {"Content-Type": "application/json"})
            with urllib.request.urlopen(r, timeout=600) as resp:
                params = json.loads(resp.read()).get("kv_transfer_params")
            if params:
                body["kv_transfer_params"] = params
            stream_into(decode_url, body, res)
            if not params:
                res.error = "prefill answered without kv_transfer_params (decode recomputed)"
        except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
            res.error = f"{type(e).__name__}: {e}"

    return send


# ---- phases ------------------------------------------------------------------------------------


def instance_urls(dep: DeploymentConfig) -> tuple[list[str], list[str]]:
    """The URLs of the prefill and of the decode instances (this host)."""
    p, d = ([f"http://127.0.0.1:{g.port_base + i}" for i in range(g.count)] for g in (dep.prefill, dep.decode))
    return p, d


# The one-at-a-time phase's prompts come from their own seed: had they been the load phase's, the
# load phase would find them in vLLM's prefix cache (as runs before 2026-12-07 did, unevenly
# between modes: a pool's cache holds what fits, LRU).
SEQUENTIAL_SEED = 7919


def sequential_part(workload: list[Request], n: int) -> list[Request]:
    """The workload's first long and short requests, alternating, ``n`` in all (one kind only
    where the workload has only one)."""
    longs = [r for r in workload if r.long]
    shorts = [r for r in workload if not r.long]
    if not longs or not shorts:
        return (longs or shorts)[:n]
    return [x for pair in zip(longs, shorts) for x in pair][:n]


def sequential_requests(args) -> list[Request]:
    """The one-at-a-time phase: ``args.sequential`` requests, long and short alternating (only
    one kind for ``--long-fraction`` 0 or 1), with prompts of their own (seed ``args.seed +
    SEQUENTIAL_SEED``), none of the load phase's."""
    n = args.sequential
    fraction = args.long_fraction if args.long_fraction in (0, 1) else 0.5
    pool = make_workload(max(2 * n, 2), 1.0, fraction, args.long_tokens, args.short_tokens, args.max_tokens,
                         args.seed + SEQUENTIAL_SEED)
    return sequential_part(pool, n)


def run_sequential(url: str, model: str, workload: list[Request], send) -> tuple[list[Result], float]:
    """Each request after the previous one has finished; (results, wall seconds)."""
    results = []
    t0 = time.perf_counter()
    for req in workload:
        res = Result(False, req.long, 0.0)
        send(url, model, req, res)
        results.append(res)
    return results, time.perf_counter() - t0


def transfers(proxy_url: str, results: list[Result]) -> list[dict]:
    """The coordinator's record of each pd request's transfer, with its TTFT (ms) and long flag."""
    out = []
    for r in results:
        if not r.pd_id:
            continue
        try:
            with urllib.request.urlopen(f"{proxy_url}/pd/transfers/{r.pd_id}", timeout=10) as resp:
                rec = json.loads(resp.read())
        except Exception as e:  # noqa: BLE001 - a missing record is reported, not fatal
            rec = {"pd_id": r.pd_id, "error": f"no record: {type(e).__name__}: {e}"}
        rec["ttft_ms"] = r.ttft * 1e3 if r.ttft is not None else None
        rec["long"] = r.long
        out.append(rec)
    return out


def transfer_summary(recs: list[dict]) -> dict:
    """Medians of the KV transfer (load) time, the wait for READY, and load / TTFT, long and short."""
    out = {}
    for label, pick in (("long", True), ("short", False)):
        rs = [r for r in recs if r.get("long") == pick and r.get("ok") and r.get("ttft_ms")]
        if not rs:
            continue
        med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        out[label] = {"n": len(rs), "tokens": med([r["n_tokens"] for r in rs]),
                      "mb": med([r["n_bytes"] / 1e6 for r in rs]),
                      "load_ms_p50": med([r["load_ms"] for r in rs]), "wait_ms_p50": med([r["wait_ms"] for r in rs]),
                      "ttft_ms_p50": med([r["ttft_ms"] for r in rs]),
                      "load_share_of_ttft_p50": med([r["load_ms"] / r["ttft_ms"] for r in rs]),
                      "tail_ms_p50": med([r.get("tail_ms", 0.0) for r in rs]),
                      "tail_share_of_ttft_p50": med([r.get("tail_ms", 0.0) / r["ttft_ms"] for r in rs]),
                      "ready_parts_p50": med([r.get("n_ready_parts", 0) for r in rs]),
                      "gb_s_p50": med([r["n_bytes"] / 1e6 / r["load_ms"] for r in rs if r["load_ms"] > 0]),
                      "spans": span_summary(rs)}
    out["failed"] = sum(1 for r in recs if not r.get("ok"))
    return out


def span_summary(recs: list[dict]) -> dict[str, dict]:
    """p50/p99 (ms) of each span of the records' timelines (``spans`` and ``cross_spans``), by name."""
    got = timeline.summarize([{**r.get("spans", {}), **r.get("cross_spans", {})} for r in recs if r.get("ok")])
    return {name: {"n": s.n, "p50": s.p50, "p99": s.p99} for name, s in got.items()}


def format_spans(spans: dict[str, dict], label: str = "") -> str:
    """``span_summary`` as a table."""
    lines = [f"| span{f' ({label})' if label else ''} | n | p50 ms | p99 ms |", "|:---|---:|---:|---:|"]
    lines += [f"| {name} | {s['n']} | {s['p50']:.2f} | {s['p99']:.2f} |" for name, s in spans.items()]
    return "\n".join(lines)


def format_transfers(summary: dict) -> str:
    lines = ["| prompts | n | tokens | KV MB | READY parts | load ms p50 | waited for READY ms p50 | TTFT ms p50 | "
             "load/TTFT p50 | GB/s | tail ms p50 | tail/TTFT p50 |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label in ("long", "short"):
        s = summary.get(label)
        if s:
            gbs = f"{s['gb_s_p50']:.2f}" if s["gb_s_p50"] is not None else "-"
            lines.append(f"| {label} | {s['n']} | {s['tokens']:.0f} | {s['mb']:.1f} | {s['ready_parts_p50']:g} | "
                         f"{s['load_ms_p50']:.1f} | {s['wait_ms_p50']:.1f} | {s['ttft_ms_p50']:.1f} | "
                         f"{s['load_share_of_ttft_p50']:.3f} | {gbs} | {s['tail_ms_p50']:.1f} | "
                         f"{s['tail_share_of_ttft_p50']:.3f} |")
    for label in ("long", "short"):
        if summary.get(label, {}).get("spans"):
            lines += ["", format_spans(summary[label]["spans"], f"{label} prompts")]
    return "\n".join(lines)


def same_answers(texts: dict[str, list]) -> dict[str, int]:
    """For each mode after the first: how many answers equal the first mode's."""
    modes = list(texts)
    if not modes:
        return {}
    ref = texts[modes[0]]
    return {m: sum(a is not None and a == b for a, b in zip(ref, texts[m])) for m in modes[1:]}


def first_differences(texts: dict[str, list]) -> dict[str, list[int]]:
    """For each mode after the first: at which output token each answer of token ids first differs
    from the first mode's (answers that agree, or are not token ids, are left out)."""
    modes = list(texts)
    out: dict[str, list[int]] = {}
    for m in modes[1:]:
        out[m] = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                  for a, b in zip(texts[modes[0]], texts[m])
                  if isinstance(a, list) and isinstance(b, list) and a != b]
    return out


WARM_BURST = 4  # overlapping warm-up requests (32, 64, 128, 256 tokens)


def warm_up(url: str, name: str, send) -> None:
    """One request alone, then ``WARM_BURST`` overlapping ones (batches of several requests, a
    prefill beside decodes). An engine's first batch of a new shape compiles (torch.compile,
    FlexAttention, Triton) for hundreds of ms: without the burst, the first mode of a run paid
    that in its load phase (2026-12-07, H100: token 1 to 2 p90 582 ms against 20 ms for the
    second mode). Prompts of their own (no prefix-cache hit for the workload's)."""
    run_sequential(url, name, [Request(0, [11, 12, 13, 14] * 8, 4, False)], send)
    run_load(url, name, [Request(0.01 * i, [11 + i, 12, 13, 14] * (8 << i), 16, False) for i in range(WARM_BURST)],
             send)


def run_mode(mode: str, dep: DeploymentConfig, seq: list[Request], load_: list[Request], args) -> dict:
    d = Deployment(dep)
    name = served_name(dep)
    t_start = time.perf_counter()
    notes = None
    try:
        if mode == lmcache_pd.MODE:
            lmcache_pd.write_configs(lmcache_pd.conf_dir(args.port), args.lmcache_pd_buffer_gb)
            notes = lmcache_pd.Notifications()
        d.start(progress=lambda line: print(f"  [{mode}] {line}", flush=True))
        started_s = time.perf_counter() - t_start
        if mode == "nixl":
            send = nixl_send(*instance_urls(dep))
        elif notes is not None:
            send = lmcache_pd.send_fn(*instance_urls(dep), notes)
        else:
            send = send_one
        url = d.proxy_url
        warm_up(url, name, send)
        seq_res, seq_wall = run_sequential(url, name, seq, send)
        load_res, load_wall = run_load(url, name, load_, send)
        probed = {}
        if mode == "pd" and getattr(args, "prefill_probe", 0) > 0:
            prefill_url = instance_urls(dep)[0][0]
            decode_url = instance_urls(dep)[1][0]
            lengths = sorted({args.short_tokens, args.long_tokens})
            try:
                probed = {"prefill": {n: probe.probe(prefill_url, name, n, args.prefill_probe) for n in lengths},
                          "decode_floor": {n: probe.decode_floor(decode_url, name, n, args.prefill_probe)
                                           for n in lengths}}
            except Exception as e:  # noqa: BLE001 - the probe failing must not lose the mode's figures
                print(f"# pd: the prefill probe failed: {type(e).__name__}: {e}", flush=True)
        recs = {"sequential": transfers(url, seq_res), "load": transfers(url, load_res)} if mode in PD_MODES else {}
    finally:
        d.stop()
        if notes is not None:
            notes.close()
    for phase, rs in (("sequential", seq_res), ("load", load_res)):
        for r in rs:
            if not r.ok or r.error:
                print(f"# {mode} {phase}: {'failed' if not r.ok else 'note'}: {r.error}", flush=True)
    slo = (args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    return {"startup_s": started_s, "run_dir": str(d.run_dir),
            "sequential": summarize(seq_res, seq_wall, *slo), "load": summarize(load_res, load_wall, *slo),
            "texts": {"sequential": [answer(r) for r in seq_res], "load": [answer(r) for r in load_res]},
            "per_request": {ph: [{"long": r.long, "ttft_ms": r.ttft * 1e3 if r.ttft else None,
                                  "tpot_ms": r.tpot * 1e3 if r.tpot else None, "ok": r.ok, "error": r.error}
                                 for r in rs] for ph, rs in (("sequential", seq_res), ("load", load_res))},
            "transfers": recs, "prefill_probe": probed,
            "transfer_summary": {ph: transfer_summary(v) for ph, v in recs.items()}}


def pick_gpus(args, vs: list[Variant]) -> int:
    """The GPUs to use: ``--gpus`` or all nvidia-smi lists, at most as many as the largest mode's instances."""
    n_gpus = min(args.gpus if args.gpus is not None else gpu_count(), max(v.instances for v in vs))
    if n_gpus < 1:
        raise ValueError("--device cuda: no GPU found (nvidia-smi -L lists none)")
    return n_gpus


def run_gpu(args) -> int:
    fill_legacy_slos(args)
    model = str(check_model(args.model))
    vs = variants(mode_list(args), parse_splits(args.split), args.colocated)
    n_gpus = pick_gpus(args, vs)
    workload = make_workload(args.requests, args.rate, args.long_fraction, args.long_tokens,
                             args.short_tokens, args.max_tokens, args.seed)
    longs = [r for r in workload if r.long]
    seq = sequential_requests(args)
    deps = {v.label: (v, gpu_deployment(v.mode, model, args, n_gpus, v.prefill, v.decode)) for v in vs}
    for _v, dep in deps.values():  # each is started in turn, and a larger split listens on more ports
        check_ports(dep)
    out_path = Path(args.out or os.path.join(os.environ.get("OUT", "."), "bench_gpu.json"))
    n_long = len(longs)
    header = (f"# pd bench serve --device cuda: {n_gpus} GPU(s), model {model} (--load-format {args.load_format}); "
              f"{args.requests} requests, Poisson {args.rate}/s, {n_long} long ({args.long_tokens} tokens) and "
              f"{args.requests - n_long} short ({args.short_tokens} tokens), {args.max_tokens} output tokens "
              f"each, seed {args.seed}; first {len(seq)} of them one at a time; SLOs TTFT <= {args.slo_ttft_ms:g} ms, "
              f"TPOT <= {args.slo_tpot_ms:g} ms; enforce_eager {args.enforce_eager}, chunk_size {args.chunk_size}")
    print(header, flush=True)
    results: dict = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "n_gpus": n_gpus,
                     "modes": {}}
    for mode, (v, dep) in deps.items():
        t0 = time.perf_counter()
        try:
            results["modes"][mode] = run_mode(v.mode, dep, seq, workload, args)
        except Exception as e:  # noqa: BLE001 - one mode failing must not lose the others' figures
            print(f"# {mode}: FAILED: {type(e).__name__}: {e}", flush=True)
            results["modes"][mode] = {"error": f"{type(e).__name__}: {e}"}
        print(f"# {mode}: done in {time.perf_counter() - t0:.0f}s", flush=True)
        out_path.write_text(json.dumps(results, indent=1, default=str))
    text = gpu_report(header, results, len(seq), len(workload))
    print(text, flush=True)
    results["report"] = text
    out_path.write_text(json.dumps(results, indent=1, default=str))
    out_path.with_suffix(".md").write_text(text + "\n")
    print(f"# results: {out_path} and {out_path.with_suffix('.md')}", flush=True)
    failed = any("error" in r or r["load"]["failed"] or r["sequential"]["failed"] for r in results["modes"].values())
    return 1 if failed else 0


def gpu_report(header: str, results: dict, n_seq: int, n_all: int) -> str:
    """The markdown report of a run: start-up, each phase's table, answers, transfers, the probe."""
    ok = {m: r for m, r in results["modes"].items() if "error" not in r}
    report = [header, "\n# start-up (pd launch to ready, s): " +
              ", ".join(f"{m} {r['startup_s']:.0f}" for m, r in ok.items())]
    for phase in ("sequential", "load"):
        report.append(f"\n## {phase}: {'one request at a time' if phase == 'sequential' else 'Poisson arrivals'}\n")
        report.append(format_table({m: r[phase] for m, r in ok.items()}))
        same = same_answers({m: r["texts"][phase] for m, r in ok.items()})
        n = n_seq if phase == "sequential" else n_all
        if same:
            first = next(iter(ok))
            diff = first_differences({m: r["texts"][phase] for m, r in ok.items()})
            report.append("\n# same answer as " + first + " (token ids where returned): " + ", ".join(
                f"{m} {k} of {n}" + (f" (the others first differ at output token {sorted(diff[m])})" if diff.get(m)
                                     else "") for m, k in same.items()))
        if "pd" in ok and ok["pd"]["transfer_summary"].get(phase):
            report.append(f"\n# pdkv KV transfer ({phase}; load = the decode connector's transport reads and "
                          "scatter, from the coordinator's records)\n")
            report.append(format_transfers(ok["pd"]["transfer_summary"][phase]))
    probed = ok.get("pd", {}).get("prefill_probe") or {}
    if probed.get("prefill"):
        report.append("\n## the prefill instance alone (pd mode; fresh prompts, alternating; launch/bench/probe.py)\n")
        report.append(probe.format_probe({int(k): v for k, v in probed["prefill"].items()}))
    if probed.get("decode_floor"):
        report.append("\n## the decode instance's floor (pd mode; prompt + 1 token, the prompt's KV in vLLM's "
                      "prefix cache; launch/bench/probe.py)\n")
        report.append(probe.format_floor({int(k): v for k, v in probed["decode_floor"].items()}))
    for m, r in results["modes"].items():
        if "error" in r:
            report.append(f"\n# {m}: FAILED: {r['error']}")
    return "\n".join(report)
