"""``pd plan``: which prefill:decode split of N GPUs (or colocated) serves the most requests per
second within the TTFT and TPOT SLOs, from one instance's profile (a file, or measured from a
running vLLM with ``--measure URL``) and a workload. The model is ``launch.plan_model``; the
inputs ``launch.plan_inputs``; docs/plan.md explains both.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict

from common.config import ConfigError
from launch.bench.workloads import WORKLOADS
from launch.plan_inputs import lengths, load_profile, load_workload
from launch.plan_measure import measure_profile
from launch.plan_model import SLO, Option, advice, options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", metavar="FILE", help="one instance's profile, YAML or JSON (docs/plan.md)")
    p.add_argument("--measure", metavar="URL",
                   help="measure the profile from the vLLM instance at URL instead (minutes; see --save-profile)")
    p.add_argument("--save-profile", metavar="FILE", help="with --measure: write the measured profile here")
    p.add_argument("--gpus-per-instance", type=int, default=1,
                   help="with --measure: GPUs of the measured instance (its TP size; default 1)")
    p.add_argument("--max-batch", type=int, default=256,
                   help="with --measure: the instance's vLLM max_num_seqs (default %(default)s)")
    p.add_argument("--workload", required=True, metavar="NAME|FILE",
                   help=f"a workload name ({', '.join(WORKLOADS)}, as pd bench serve) or a YAML/JSON file")
    p.add_argument("--gpus", type=int, required=True, help="GPUs to split")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT SLO (default: the workload's)")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT SLO (default: the workload's)")
    p.add_argument("--attainment", type=float, default=0.9,
                   help="share of requests that must meet each SLO (default %(default)s)")
    p.add_argument("--rate", type=float, default=None, help="the offered load, req/s: which options meet it")
    p.add_argument("--json", metavar="FILE", help="also write every option's figures here")


def slo_of(args, workload) -> SLO:
    ttft = args.slo_ttft_ms if args.slo_ttft_ms is not None else workload.slo_ttft_ms
    tpot = args.slo_tpot_ms if args.slo_tpot_ms is not None else workload.slo_tpot_ms
    for flag, v in (("--slo-ttft-ms", ttft), ("--slo-tpot-ms", tpot)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{flag}: {v!r} is not allowed; give a number of ms > 0 (the workload has no default)")
    if not 0.5 <= args.attainment < 1.0:
        raise ConfigError(f"--attainment: {args.attainment!r} is not allowed; give a share in [0.5, 1)")
    return SLO(float(ttft), float(tpot), args.attainment)


def table(opts: list[Option], slo: SLO, rate: float | None) -> str:
    q = f"p{slo.attainment * 100:g}"
    head = ["option", "GPUs", "max req/s", "req/s per GPU", "limited by"]
    if rate:
        head += [f"TTFT met at {rate:g}/s", f"TPOT {q} ms", "meets"]
    lines = ["| " + " | ".join(head) + " |", "|:---|" + "---:|" * (len(head) - 2) + ":---|"]
    for o in opts:
        row = [o.name, str(o.gpus), f"{o.rate:.3g}", f"{o.per_gpu:.3g}", o.limit or "-"]
        if rate:
            ttft = min(c.ttft_attainment for c in o.at_rate)
            tpot = max(c.tpot_ms for c in o.at_rate)
            row += [f"{ttft:.1%}", "inf" if tpot == math.inf else f"{tpot:.1f}", "yes" if o.meets_rate else "no"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.gpus < 1:
        raise ConfigError(f"--gpus: {args.gpus} is not allowed; give a number of GPUs >= 1")
    if args.rate is not None and not (math.isfinite(args.rate) and args.rate > 0):
        raise ConfigError(f"--rate: {args.rate!r} is not allowed; give requests per second > 0")
    if bool(args.profile) == bool(args.measure):
        raise ConfigError("give one of --profile FILE or --measure URL")
    workload = load_workload(args.workload)
    slo = slo_of(args, workload)
    if args.measure:
        profile = measure_profile(args.measure, args.gpus_per_instance, args.save_profile, args.max_batch)
    else:
        profile = load_profile(args.profile)
    opts = options(profile, lengths(workload), slo, args.gpus, args.rate)
    print(f"# pd plan: {args.gpus} GPUs, workload {workload.name}, TTFT <= {slo.ttft_ms:g} ms and "
          f"TPOT <= {slo.tpot_ms:g} ms for {slo.attainment:.0%} of requests\n")
    print(table(opts, slo, args.rate) + "\n")
    print("\n".join(advice(opts, args.rate)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_finite({"slo": asdict(slo), "workload": workload.name, "gpus": args.gpus, "rate": args.rate,
                               "options": [{**asdict(o), "per_gpu": o.per_gpu} for o in opts]}), f, indent=1)
    return 0


def _finite(v):
    """``v`` with infinities as None (JSON has no infinity)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
