"""`pd bench ttft --device cuda`: cold vs warm TTFT of prefix reuse, pdkv's store beside LMCache's
local disk and CPU tiers (issue 19), one mode after the other on the same GPU, model and prompts.

For each mode (``launch.bench.peers``): start it (an LMCache MP mode: its server first, healthy,
``launch.bench.lmcache_mp``), send a warm-up prompt twice, then for each length (``--lengths``)
``--prompts`` distinct seeded prompts, each twice: cold = the first send (computed, and written to
the store / LMCache), ``--settle-s`` of pause (``lmcache_mp_disk``: then until its server's disk
writes are done), warm = the second send (vLLM's prefix cache is off, so only the store / LMCache
can spare the prefill). Every send streams greedy tokens through the pd proxy; answers (token ids)
are compared warm with cold and each mode's with the first mode's. The logs are searched for the
warm loads (LMCache's "LMCache hit tokens", its MP server's "Retrieved N tokens", pdkv's "loaded a
N-token prefix from the store"). Then stop it (the MP server last), remove its store. Results: a
JSON (``--out``) and the tables beside it (.md), written after every mode.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from launch.bench.common import VOCAB
from launch.bench.lmcache_mp import DISK_MODE, MP_MODES, MPServer, mp_server
from launch.bench.peers import (
    LMCACHE_MODES,
    check_args,
    check_modes,
    deployment,
    hits_in_logs,
    lengths,
    lmcache_config,
    mode_list,
    model_max_len,
    write_lmcache_config,
)
from launch.bench.serve_load import Request, Result, answer, send_one
from launch.bench.vllm_bench import cold_then_warm, command
from launch.bench.vllm_bench import report as vllm_report
from launch.gpus import gpu_count
from launch.procs import check_model, check_ports, served_name
from launch.supervise import Deployment

WARMUP_TOKENS = 1024
STOP_MARGIN_S = 30.0  # with --deadline: no send begins later than this before it (stopping takes up to 15 s)


def plan(args: argparse.Namespace) -> dict:
    """Everything decided before a GPU is touched: modes, model, lengths, prompts, where results go."""
    check_args(args)
    modes = mode_list(args.modes)
    check_modes(args, modes)
    model = check_model(args.model).resolve()
    max_len = args.max_model_len or model_max_len(model)
    if getattr(args, "vllm_bench", 0) and args.tokens + args.output_tokens > max_len:
        raise ValueError(f"--vllm-bench: --tokens {args.tokens} + --output-tokens {args.output_tokens} is more than "
                         f"the model's max_model_len {max_len}; give shorter prompts")
    chunk = max(args.chunk_size, args.lmcache_chunk_size)
    lens = lengths(args.lengths, max_len, args.max_tokens, chunk)
    out = Path(args.out or os.path.join(os.environ.get("OUT", "."), "ttft_gpu.json"))
    return {"modes": modes, "model": str(model), "max_model_len": max_len, "lengths": lens,
            "prompts": prompts(lens, args.prompts, args.seed), "out": out}


def prompts(lens: list[int], n: int, seed: int) -> dict[int, list[list[int]]]:
    """``n`` distinct token-id prompts of each length, the same for the same seed (no two share a
    first chunk, so one cannot serve another's prefix)."""
    return {length: [[random.Random(f"{seed}/{length}/{i}").randrange(*VOCAB) for _ in range(length)]
                     for i in range(n)] for length in lens}


def send(url: str, name: str, prompt: list[int], max_tokens: int) -> Result:
    res = Result(False, True, 0.0)
    send_one(url, name, Request(0.0, prompt, max_tokens, True), res)
    return res


def settle_fn(mode: str, args: argparse.Namespace, server: MPServer | None = None) -> Callable[[], dict]:
    """What is done between a cold send and its warm one: ``--settle-s`` of pause; ``lmcache_mp_disk``
    then waits (at most ``--lmcache-mp-wait-s``, and not into --deadline's stop margin) until its
    server's disk writes are done, so that the warm send reads from disk: {"store_wait_ms": ...} or
    {"store_wait_error": ...}, else {}."""
    def settle() -> dict:
        time.sleep(args.settle_s)
        if mode != DISK_MODE or server is None:
            return {}
        limit = args.lmcache_mp_wait_s
        if args.deadline:
            limit = min(limit, args.deadline - STOP_MARGIN_S - time.time())
            if limit <= 0:  # --deadline is here: the run stops after this send, cut short, not failed
                return {}
        return server.wait_stored(limit)
    return settle


def measure(url: str, name: str, p: dict, args: argparse.Namespace, settle: Callable[[], dict] | None = None) -> dict:
    """The warm-up pair, then a cold and a warm send of every prompt (``settle`` between them,
    default ``--settle-s`` of pause; what it returns goes into the row); per length the rows."""
    settle = settle or settle_fn("", args)
    warm_up = [random.Random(f"warmup/{args.seed}").randrange(*VOCAB) for _ in range(WARMUP_TOKENS)]
    first = send(url, name, warm_up, args.max_tokens)
    waited = settle()
    again = send(url, name, warm_up, args.max_tokens)
    out: dict = {"warmup_ms": [r.ttft * 1e3 if r.ttft else None for r in (first, again)],
                 **({"warmup_wait": waited} if waited else {})}
    rows: dict[int, list[dict]] = {}
    for length, ps in p["prompts"].items():
        for prompt in ps:
            if args.deadline and time.time() > args.deadline - STOP_MARGIN_S:
                return {**out, "rows": rows, "truncated": "--deadline: the remaining prompts were not sent"}
            cold = send(url, name, prompt, args.max_tokens)
            waited = settle()
            warm = send(url, name, prompt, args.max_tokens)
            rows.setdefault(length, []).append({
                "cold_ms": cold.ttft * 1e3 if cold.ttft else None, "warm_ms": warm.ttft * 1e3 if warm.ttft else None,
                "same": cold.ok and warm.ok and answer(cold) == answer(warm),
                "cold": answer(cold), "warm": answer(warm),
                "error": "; ".join(e for e in (cold.error, warm.error) if e), **waited})
    return {**out, "rows": rows}


def run_mode(mode: str, p: dict, args: argparse.Namespace, n_gpus: int, work: Path) -> dict:
    """Start ``mode``, measure it, stop it; its store directory (an MP mode's L2) is removed after. An
    LMCache MP mode's server starts first (healthy before the vLLM instance starts) and stops last."""
    run_dir = work / mode
    store = Path(tempfile.mkdtemp(prefix=f"{mode}-", dir=args.store_path or None))
    try:
        if mode not in MP_MODES:
            return serve_mode(mode, p, args, n_gpus, run_dir, store)
        server = mp_server(mode, args, run_dir, store).start()
        try:
            got = serve_mode(mode, p, args, n_gpus, run_dir, store, server)
            died = server.exited()
        finally:
            stopped = server.stop()
        got["lmcache_server"] = {"argv": server.argv, "log": str(server.log_path), "healthy_s": server.started_s,
                                 "stop": stopped, **({"died": died} if died else {})}
        got["hits"] = hits_in_logs(run_dir, mode)  # the server's log is complete once it stopped
        return got
    finally:
        shutil.rmtree(store, ignore_errors=True)


def serve_mode(mode: str, p: dict, args: argparse.Namespace, n_gpus: int, run_dir: Path, store: Path,
               server: MPServer | None = None) -> dict:
    """Start ``mode``'s deployment (an MP mode's reaching ``server``), measure it, stop it."""
    yaml_path = ""
    if mode in LMCACHE_MODES:
        yaml_path = write_lmcache_config(run_dir / "lmcache.yaml", lmcache_config(mode, args, store))
    dep = deployment(mode, p["model"], args, p["max_model_len"], n_gpus, store, yaml_path,
                     server.zmq_port if server else 0)
    dep.run_dir = str(run_dir)
    check_ports(dep)
    d = Deployment(dep)
    t0 = time.perf_counter()
    try:
        d.start(progress=lambda line: print(f"  [{mode}] {line}", flush=True))
        started = time.perf_counter() - t0
        got = measure(d.proxy_url, served_name(dep), p, args, settle_fn(mode, args, server))
        if getattr(args, "vllm_bench", 0):  # seed 004's workflow, after this mode's own prompts
            got.update(vllm_bench_runs(d.proxy_url, served_name(dep), p["model"], args,
                                       settle_fn(mode, args, server) if mode == DISK_MODE else None))
    finally:
        d.stop()
    return {"startup_s": started, "run_dir": str(run_dir), "lmcache_yaml": str(yaml_path),
            "hits": hits_in_logs(run_dir, mode), **got}


def vllm_bench_runs(url: str, name: str, model: str, args: argparse.Namespace,
                    settle: Callable[[], dict] | None = None) -> dict:
    """``--vllm-bench``: {"vllm_bench": both runs} or {"vllm_bench_error": why} (a failure keeps the
    mode's own rows); each run gets half the time --deadline leaves (less the time between them;
    at most 30 minutes). Between the runs ``settle`` (lmcache_mp_disk's ``settle_fn``: the pause,
    then its wait for the disk writes, at most ``--lmcache-mp-wait-s``; what it returns goes in
    "vllm_bench_wait"), else ``--settle-s`` of pause."""
    timeout_s = 1800.0
    if args.deadline:
        between = args.settle_s + (args.lmcache_mp_wait_s if settle is not None else 0.0)
        timeout_s = min(timeout_s, (args.deadline - STOP_MARGIN_S - time.time() - between) / 2)
        if timeout_s < 30:
            return {"vllm_bench_error": "skipped: --deadline leaves too little time"}
    try:
        waited: dict = {}
        runs = cold_then_warm(command(url, name, model, args.vllm_bench, args.tokens, args.output_tokens, args.seed),
                              pause_s=args.settle_s, timeout_s=timeout_s,
                              between=(lambda: waited.update(settle())) if settle else None)
        return {"vllm_bench": runs, **({"vllm_bench_wait": waited} if waited else {})}
    except Exception as e:  # noqa: BLE001 - reported beside the mode's rows
        return {"vllm_bench_error": f"{type(e).__name__}: {str(e)[-600:]}"}


def med(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def same_as_first(results: dict) -> dict[str, str]:
    """Per mode after the first: 'k of n' of its cold and warm answers equal to the first mode's cold ones."""
    ok = {m: r for m, r in results.items() if "rows" in r}
    if len(ok) < 2:
        return {}
    ref_mode, *others = ok
    ref = [row["cold"] for rows in ok[ref_mode]["rows"].values() for row in rows]
    out = {}
    for m in others:
        mine = [row for rows in ok[m]["rows"].values() for row in rows]
        k = sum(a is not None and a == r["cold"] for a, r in zip(ref, mine)) + \
            sum(a is not None and a == r["warm"] for a, r in zip(ref, mine))
        out[m] = f"{k} of {2 * len(ref)}"
    return out


# (pdkv mode, LMCache mode) pairs the goals compare (warm TTFT: pdkv <= 0.8x LMCache's).
PAIRS = (("pdkv", "lmcache_disk"), ("pdkv_dram", "lmcache_cpu"), ("pdkv", "lmcache_cpu"),
         ("pdkv", "lmcache_mp_disk"), ("pdkv_dram", "lmcache_mp_cpu"), ("pdkv", "lmcache_mp_cpu"))


def quotient(x: float | None, y: float | None) -> str:
    return f"{x / y:.2f}" if x and y else "-"


def ratio_lines(results: dict) -> list[str]:
    """pdkv's cold and warm TTFT p50 over LMCache's, per length, for each pair that ran."""
    lines = []
    for mine, theirs in PAIRS:
        a, b = results.get(mine, {}).get("rows"), results.get(theirs, {}).get("rows")
        if not a or not b:
            continue
        for length in (n for n in a if n in b):
            q = [quotient(med([x[key] for x in a[length]]), med([x[key] for x in b[length]]))
                 for key in ("cold_ms", "warm_ms")]
            lines.append(f"| {mine} / {theirs} | {length} | {q[0]} | {q[1]} |")
    return (["", "| pdkv / LMCache (TTFT p50) | tokens | cold | warm |", "|:---|---:|---:|---:|"] + lines) if lines else []


def mp_lines(mode: str, r: dict) -> list[str]:
    """An LMCache MP mode's server (seconds until healthy, how it stopped, whether it died) and, for
    lmcache_mp_disk, how long the warm sends waited for its disk writes, with any timeouts."""
    server = r.get("lmcache_server")
    if not server:
        return []
    lines = [f"# {mode}: LMCache MP server healthy after {server['healthy_s']:.0f} s, stopped: {server['stop']}"
             + (f"; it DIED during the run: {server['died']}" if server.get("died") else "")]
    waits = [r[k] for k in ("warmup_wait", "vllm_bench_wait") if r.get(k)]
    waits += [x for rows in r.get("rows", {}).values() for x in rows]
    ms = [x["store_wait_ms"] for x in waits if "store_wait_ms" in x]
    errors = [x["store_wait_error"] for x in waits if "store_wait_error" in x]
    if ms or errors:
        lines.append(f"# {mode}: waited for the server's disk writes before {len(ms) + len(errors)} warm sends (the "
                     f"warm-up's included): p50 {fmt(med(ms))} ms, max {fmt(max(ms, default=None))} ms"
                     + (f"; {len(errors)} timed out, first: {errors[0]}" if errors else ""))
    return lines


def failed(r: dict, args: argparse.Namespace) -> bool:
    """Whether a mode's results fail the run: no rows, a warm answer unlike its cold one, a failed
    ``--vllm-bench``, a wait for LMCache's disk writes that timed out, its MP server dying."""
    rows = [x for rs in r.get("rows", {}).values() for x in rs]
    bench = r.get("vllm_bench", {}).values()
    return ("rows" not in r or not all(x["same"] for x in rows) or bool(r.get("vllm_bench_error"))
            or any(x["completed"] != args.vllm_bench or x.get("failed") for x in bench)
            or any("store_wait_error" in x for x in [*rows, r.get("warmup_wait") or {}, r.get("vllm_bench_wait") or {}])
            or bool(r.get("lmcache_server", {}).get("died")))


def format_report(header: str, results: dict) -> str:
    lines = [header, "", "| mode | tokens | prompts | cold TTFT ms p50 | warm TTFT ms p50 | cold/warm | "
             "warm = cold | start-up s |", "|:---|---:|---:|---:|---:|---:|---|---:|"]
    for mode, r in results.items():
        if "rows" not in r:
            lines.append(f"| {mode} | - | - | - | - | - | {r.get('error') or r.get('skipped')} | - |")
            continue
        for length, rows in r["rows"].items():
            c, w = med([x["cold_ms"] for x in rows]), med([x["warm_ms"] for x in rows])
            ratio = f"{c / w:.2f}" if c and w else "-"
            lines.append(f"| {mode} | {length} | {len(rows)} | {fmt(c)} | {fmt(w)} | {ratio} | "
                         f"{sum(x['same'] for x in rows)} of {len(rows)} | {r['startup_s']:.0f} |")
    lines += ratio_lines(results)
    lines.append("")
    same = same_as_first(results)
    if same:
        lines.append(f"# answers equal to {next(iter(results))}'s cold ones (cold and warm sends): "
                     + ", ".join(f"{m} {k}" for m, k in same.items()))
    for mode, r in results.items():
        if "rows" in r:
            colds = [json.dumps(x["cold"]) for rows in r["rows"].values() for x in rows]
            lines.append(f"# {mode}: warm loads in the logs (prefix tokens): {r['hits'] or 'none'}; warm-up pair "
                         f"TTFT ms {', '.join(fmt(x) for x in r['warmup_ms'])}; {len(set(colds))} distinct answers "
                         f"to {len(colds)} prompts (few: the model's answers hardly depend on the prompt)"
                         + (f"; {r['truncated']}" if r.get("truncated") else ""))
        errors = [x["error"] for rows in r.get("rows", {}).values() for x in rows if x["error"]]
        if errors:
            lines.append(f"# {mode}: {len(errors)} failed sends, first: {errors[0]}")
        lines += mp_lines(mode, r)
    for mode, r in results.items():
        if r.get("vllm_bench"):
            lines += ["", f"## {mode}: vllm bench serve (seed 004's workflow), cold then warm", "",
                      vllm_report(r["vllm_bench"], "run")]
        elif r.get("vllm_bench_error"):
            lines += ["", f"## {mode}: vllm bench serve (seed 004's workflow): {r['vllm_bench_error']}"]
    return "\n".join(lines)


def run_gpu(args: argparse.Namespace) -> int:
    p = plan(args)
    n_gpus = min(max(gpu_count(), 0), 2)
    if n_gpus < 1:
        raise ValueError("--device cuda: no GPU found (nvidia-smi -L lists none)")
    work = Path(tempfile.mkdtemp(prefix="pdkv-ttft-gpu-"))
    header = (f"# pd bench ttft --device cuda: model {p['model']} (--load-format {args.load_format}), max_model_len "
              f"{p['max_model_len']}, {n_gpus} GPU(s) (pdkv: prefill and decode {'on GPU 0 and 1' if n_gpus > 1 else 'both on GPU 0'}); "
              f"{args.prompts} prompt(s) per length, each sent cold then warm ({args.settle_s:g} s apart), "
              f"{args.max_tokens} greedy tokens; vLLM prefix cache off; enforce_eager {args.enforce_eager}; "
              f"pdkv chunk_size {args.chunk_size}, read_threads {args.read_threads}, io_threads {args.io_threads}; "
              f"LMCache chunk_size {args.lmcache_chunk_size}")
    if any(m in MP_MODES for m in p["modes"]):
        header += (f"; LMCache MP server: L1 {args.lmcache_cpu_gb:g} GB pinned DRAM, lmcache_mp_disk: L2 "
                   f"{args.lmcache_l2}, L1 a write buffer (skip_l1)")
    print(header, flush=True)
    results: dict = {}
    for mode in p["modes"]:
        if args.deadline and time.time() + args.mode_budget_s > args.deadline:
            results[mode] = {"skipped": f"skipped: less than {args.mode_budget_s:.0f} s left before --deadline"}
            print(f"# {mode}: {results[mode]['skipped']}", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            results[mode] = run_mode(mode, p, args, n_gpus, work)
        except Exception as e:  # noqa: BLE001 - one mode failing must not lose the others' figures
            results[mode] = {"error": f"FAILED: {type(e).__name__}: {e}", "run_dir": str(work / mode)}
        print(f"# {mode}: done in {time.perf_counter() - t0:.0f}s {results[mode].get('error', '')}", flush=True)
        write(p["out"], args, p, results, format_report(header, results))
    text = format_report(header, results)
    print(text, flush=True)
    write(p["out"], args, p, results, text)
    return 1 if any(failed(r, args) for r in results.values()) else 0


def write(out: Path, args: argparse.Namespace, p: dict, results: dict, text: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "lengths": p["lengths"],
           "max_model_len": p["max_model_len"], "modes": results, "report": text}
    out.write_text(json.dumps(doc, indent=1, default=str))
    out.with_suffix(".md").write_text(text + "\n")
