"""`pd bench serve --rates R,.. --workloads W,..`: where P/D pays, swept over load and workloads.

For each workload (``launch.bench.workloads``) each mode at each split (``launch.bench.modes``) is
started once, warmed up with one request, then sent each rate's requests in turn (``--requests``
per rate, Poisson arrivals, prompts seeded by workload and rate index, so every mode gets the same
ones and no rate replays another's prompts into the prefix cache), then stopped. Per rate: TTFT,
TPOT and ITL percentiles, SLO attainment (requests within both SLOs / requests sent) and goodput
per GPU (on the CPU per instance); per mode the highest swept rate up to which attainment stays at
``--slo-attainment`` or more (DistServe's goodput). Everything goes to ``--out`` (JSON), with a
Markdown report and one PNG per workload (``launch.bench.plot``) beside it. Progress (requests
done / total, the rates) goes to stderr. docs/bench_serve.md, "Sweeps".
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launch.bench.gpu import PD_MODES, gpu_deployment, instance_urls, nixl_send, pick_gpus, transfer_summary, transfers
from launch.bench.modes import Variant, cpu_deployment, mode_list, units, variants
from launch.bench.plot import draw_all
from launch.bench.serve_load import Progress, Request, Result, run_load, send_one, summarize
from launch.bench.sweep_report import format_sweep, sustained
from launch.bench.workloads import CUSTOM, Workload, longest, make_requests, parse_rates, parse_splits, parse_workloads
from launch.procs import check_model, check_ports, served_name
from launch.supervise import Deployment
from pd.config import DeploymentConfig

CPU_LENGTH_SCALE = 0.2  # the CPU default of --length-scale: an 8192-token prompt becomes 1638 tokens
WARM_UP = Request(0.0, [11, 12, 13, 14] * 8, 4, False)


@dataclass
class SweepPlan:
    device: str
    model: str
    workloads: list[Workload]
    rates: list[float]
    variants: list[Variant]
    deps: dict[str, DeploymentConfig]
    units: dict[str, int]
    scale: float
    n_gpus: int


def is_sweep(args) -> bool:
    return args.rates is not None or args.workloads is not None


def plan_sweep(args) -> SweepPlan:
    """Everything checked before anything starts: rates, workloads, splits, modes, lengths, ports."""
    rates = parse_rates(args.rates) if args.rates is not None else parse_rates(str(args.rate))
    workloads = parse_workloads(args.workloads if args.workloads is not None else CUSTOM, args)
    vs = variants(mode_list(args), parse_splits(args.split), args.colocated)
    scale = args.length_scale if args.length_scale is not None else (1.0 if args.device == "cuda" else CPU_LENGTH_SCALE)
    if not scale > 0 or args.requests < 1 or not 0 < args.slo_attainment <= 1:
        raise ValueError(f"need --length-scale > 0, --requests >= 1 and 0 < --slo-attainment <= 1 (got "
                         f"{scale:g}, {args.requests}, {args.slo_attainment:g})")
    model = str(check_model(args.model))
    n_gpus = pick_gpus(args, vs) if args.device == "cuda" else 0
    deps = {v.label: (gpu_deployment(v.mode, model, args, n_gpus, v.prefill, v.decode) if args.device == "cuda"
                      else cpu_deployment(v, model, args)) for v in vs}
    max_len = min(d.vllm.max_model_len for d in deps.values())
    for w in workloads:
        if longest(w, scale) > max_len:
            raise ValueError(f"--workloads {w.name}: a request can need {longest(w, scale)} tokens (prompt + output) "
                             f"at --length-scale {scale:g}, more than max_model_len {max_len}; give a smaller "
                             "--length-scale (or on cuda a larger --max-model-len)")
    for dep in deps.values():  # each is started in turn, and a larger split listens on more ports
        check_ports(dep)
    return SweepPlan(args.device, model, workloads, rates, vs, deps,
                     {v.label: units(v, args.device, n_gpus) for v in vs}, scale, n_gpus)


def slo_ms(w: Workload, args) -> tuple[float, float]:
    """(TTFT, TPOT) SLOs of ``w`` in ms: the options where given, else the workload's defaults."""
    return (args.slo_ttft_ms if args.slo_ttft_ms is not None else w.slo_ttft_ms,
            args.slo_tpot_ms if args.slo_tpot_ms is not None else w.slo_tpot_ms)


def rate_entry(rate: float, results: list[Result], wall_s: float, slo: tuple[float, float], n_units: int) -> dict:
    """The figures of one rate (``slo`` in ms), with each request's TTFT and TPOT for the CDFs."""
    s = summarize(results, wall_s, slo[0] / 1e3, slo[1] / 1e3)
    errors = sorted({r.error for r in results if not r.ok})
    return {"rate": rate, "summary": s, "slo_attainment": s["slo_attainment"],
            "goodput_per_unit": s["goodput"] / n_units,
            "ttft_ms": [r.ttft * 1e3 if r.ok else None for r in results],
            "tpot_ms": [r.tpot * 1e3 if r.ok and r.tpot is not None else None for r in results],
            "errors": errors[:5]}


def run_variant(plan: SweepPlan, v: Variant, w: Workload, args, deployment=Deployment) -> dict:
    """Start ``v`` once, warm it up, run every rate of ``w`` in turn, stop it."""
    dep, n_units, slo = plan.deps[v.label], plan.units[v.label], slo_ms(w, args)
    entry: dict = {"mode": v.mode, "split": v.split, "instances": v.instances, "units": n_units, "rates": []}
    d = deployment(dep)
    t0 = time.perf_counter()
    try:
        d.start(progress=lambda line: print(f"  [{w.name} {v.label}] {line}", file=sys.stderr, flush=True))
        entry["startup_s"] = time.perf_counter() - t0
        name = served_name(dep)
        send = nixl_send(*instance_urls(dep)) if v.mode == "nixl" else send_one
        run_load(d.proxy_url, name, [WARM_UP], send)
        for i, rate in enumerate(plan.rates):
            reqs = make_requests(w, args.requests, rate, plan.scale, f"{args.seed}/{i}")
            progress = Progress(f"[{w.name}] {v.label} at {rate:g}/s", len(reqs), rate)
            results, wall = run_load(d.proxy_url, name, reqs, send, progress)
            entry["rates"].append(rate_entry(rate, results, wall, slo, n_units))
            if v.mode in PD_MODES:
                entry["rates"][-1]["transfer_summary"] = transfer_summary(transfers(d.proxy_url, results))
    except Exception as e:  # noqa: BLE001 - one mode failing must not lose the others' figures
        entry["error"] = f"{type(e).__name__}: {e}"
        print(f"# [{w.name}] {v.label}: FAILED: {entry['error']}", file=sys.stderr, flush=True)
    finally:
        d.stop()
    entry["sustained_rate"] = sustained(entry["rates"], args.slo_attainment)
    entry["sustained_rate_per_unit"] = entry["sustained_rate"] / n_units
    return entry


def header(plan: SweepPlan, args) -> dict:
    """The run's description in the results JSON."""
    return {"kind": "pd bench serve sweep", "version": 1, "device": plan.device,
            "unit": "GPU" if plan.device == "cuda" else "instance", "n_gpus": plan.n_gpus, "model": plan.model,
            "rates": plan.rates, "requests_per_rate": args.requests, "length_scale": plan.scale,
            "slo_attainment_target": args.slo_attainment, "seed": args.seed,
            "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "workloads": {}}


def run_sweep(args, deployment=Deployment) -> int:
    """The sweep; 0 if every request of every mode got its answer, else 1."""
    plan = plan_sweep(args)
    out = Path(args.out or os.path.join(os.environ.get("OUT", "."), "bench_sweep.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    results = header(plan, args)
    print(f"# pd bench serve sweep: workloads {', '.join(w.name for w in plan.workloads)}; rates "
          f"{', '.join(f'{r:g}' for r in plan.rates)}/s, {args.requests} requests each; modes "
          f"{', '.join(v.label for v in plan.variants)}; results to {out}", file=sys.stderr, flush=True)
    for w in plan.workloads:
        ttft, tpot = slo_ms(w, args)
        wres = {"about": w.about, "slo_ttft_ms": ttft, "slo_tpot_ms": tpot, "modes": {}}
        results["workloads"][w.name] = wres
        for v in plan.variants:
            wres["modes"][v.label] = run_variant(plan, v, w, args, deployment)
            out.write_text(json.dumps(results, indent=1, default=str))
    return finish(results, out)


def finish(results: dict, out: Path) -> int:
    """Write the JSON, the plots (when matplotlib is there) and the Markdown report; print the report."""
    out.write_text(json.dumps(results, indent=1, default=str))
    drawn, note = draw_all(results, out)
    text = format_sweep(results, {w: p.name for w, p in drawn.items()}, note)
    out.with_suffix(".md").write_text(text + "\n")
    print(text, flush=True)
    print(f"# results: {out}, {out.with_suffix('.md')}" + "".join(f", {p}" for p in drawn.values()), flush=True)
    modes = [m for w in results["workloads"].values() for m in w["modes"].values()]
    return 0 if all("error" not in m and all(r["summary"]["failed"] == 0 for r in m["rates"]) for m in modes) else 1
