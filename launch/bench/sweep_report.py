"""The Markdown report of a ``pd bench serve`` sweep, made from its results JSON (``launch.bench.sweep``):
per workload its plot, a row per rate and mode, and the highest rate each mode sustains within the
SLOs, per GPU (per instance on the CPU) and against colocated serving on as many instances.
"""
from __future__ import annotations

import copy


def sustained(rates: list[dict], target: float) -> float:
    """The highest swept rate up to which every rate's SLO attainment is at least ``target`` (0: none)."""
    best = 0.0
    for r in sorted(rates, key=lambda r: r["rate"]):
        if r["slo_attainment"] < target:
            break
        best = r["rate"]
    return best


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def _triple(s: dict, name: str) -> str:
    return " / ".join(_ms(s.get(f"{name}_p{q}")) for q in (50, 90, 99))


def rate_table(wres: dict, unit: str) -> list[str]:
    """A row per rate and mode (rates ascending, modes in run order)."""
    head = ["rate/s", "mode", "split", f"{unit}s", "TTFT p50 / p90 / p99 ms", "TPOT p50 / p90 / p99 ms",
            "ITL p50 / p90 / p99 ms", "within SLOs", f"goodput/{unit} req/s", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|---:|:---|:---|" + "---:|" * (len(head) - 3)]
    rows = [(r["rate"], i, label, m, r) for i, (label, m) in enumerate(wres["modes"].items()) for r in m["rates"]]
    for rate, _, label, m, r in sorted(rows, key=lambda x: (x[0], x[1])):
        s = r["summary"]
        lines.append(f"| {rate:g} | {label} | {m['split']} | {m['units']} | {_triple(s, 'ttft')} | "
                     f"{_triple(s, 'tpot')} | {_triple(s, 'itl')} | {r['slo_attainment']:.0%} | "
                     f"{r['goodput_per_unit']:.3f} | {s['failed']} |")
    return lines


def min_rate(m: dict) -> float:
    return min((r["rate"] for r in m["rates"]), default=0.0)


def _colocated_like(wres: dict, m: dict) -> tuple[str, dict] | None:
    """The colocated mode with as many instances as ``m`` (None: none ran)."""
    return next(((label, c) for label, c in wres["modes"].items()
                 if c["mode"] == "colocated" and c["instances"] == m["instances"] and c is not m), None)


def sustained_table(wres: dict, unit: str, target: float) -> list[str]:
    """Per mode: the highest rate within the SLOs, per unit, and against colocated on as many instances."""
    lines = [f"| mode | split | {unit}s | highest rate with >= {target:.0%} within SLOs, req/s | per {unit} | "
             "/ colocated on as many instances |", "|:---|:---|---:|---:|---:|---:|"]
    for label, m in wres["modes"].items():
        if "error" in m and not m["rates"]:
            lines.append(f"| {label} | {m['split']} | {m['units']} | failed | - | - |")
            continue
        ratio = "-"
        other = _colocated_like(wres, m)
        if other and other[1]["sustained_rate_per_unit"] > 0:
            ratio = f"{m['sustained_rate_per_unit'] / other[1]['sustained_rate_per_unit']:.2f} ({other[0]})"
        rate = f"{m['sustained_rate']:g}" if m["sustained_rate"] else f"none (below at {min_rate(m):g}/s)"
        if "error" in m:  # the rates after its last one never ran: it may sustain more
            rate += f", then failed after {max(r['rate'] for r in m['rates']):g}/s"
        lines.append(f"| {label} | {m['split']} | {m['units']} | {rate} | "
                     f"{m['sustained_rate_per_unit']:.3f} | {ratio} |")
    return lines


def format_sweep(results: dict, pngs: dict[str, str], note: str = "") -> str:
    """The report: a header, then per workload its plot (``pngs``: workload -> file name beside the
    report), the table of rates and the table of sustained rates."""
    unit = results["unit"]
    out = [f"# pd bench serve sweep ({results['device']}, model {results['model']})",
           "",
           f"Command: `{results['command']}` ({results['started']}). Rates {', '.join(f'{r:g}' for r in results['rates'])}"
           f" req/s, {results['requests_per_rate']} requests each (Poisson arrivals, seed {results['seed']}); lengths "
           f"x{results['length_scale']:g} of the workloads' definitions; goodput = requests within both SLOs per "
           f"second per {unit}" + (f" ({results['n_gpus']} GPUs)" if results["device"] == "cuda" else "") + "."]
    for line in (results.get("rejudged"), note):
        if line:
            out += ["", line]
    for name, wres in results["workloads"].items():
        out += ["", f"## {name}: {wres['about']}", "",
                f"SLOs: TTFT <= {wres['slo_ttft_ms']:g} ms, TPOT <= {wres['slo_tpot_ms']:g} ms."]
        if name in pngs:
            out += ["", f"[![{name}: goodput, SLO attainment, TTFT and TPOT CDFs]({pngs[name]})]({pngs[name]})"]
        out += ["", *rate_table(wres, unit), "", *sustained_table(wres, unit, results["slo_attainment_target"])]
        out += [f"\n{label}: FAILED: {m['error']}" for label, m in wres["modes"].items() if "error" in m]
    return "\n".join(out)


def with_slos(results: dict, ttft_ms: float | None, tpot_ms: float | None) -> dict:
    """``results`` judged again at other SLOs (None: keep the workload's), from each request's TTFT
    and TPOT: attainment, goodput per unit and the sustained rates; the latencies are unchanged."""
    out = copy.deepcopy(results)
    out["rejudged"] = ("Judged again by `pd bench plot` from each request's TTFT and TPOT at "
                       + ", ".join(f"{k} <= {v:g} ms" for k, v in (("TTFT", ttft_ms), ("TPOT", tpot_ms)) if v is not None)
                       + " (the run's other SLOs kept); the latencies are the run's.")
    for wres in out["workloads"].values():
        wres["slo_ttft_ms"] = ttft_ms if ttft_ms is not None else wres["slo_ttft_ms"]
        wres["slo_tpot_ms"] = tpot_ms if tpot_ms is not None else wres["slo_tpot_ms"]
        for m in wres["modes"].values():
            for r in m["rates"]:
                s = r["summary"]
                met = sum(a is not None and a <= wres["slo_ttft_ms"] and (b is None or b <= wres["slo_tpot_ms"])
                          for a, b in zip(r["ttft_ms"], r["tpot_ms"]))
                s["slo_met"] = met
                s["goodput"] = met / s["wall_s"] if s["wall_s"] > 0 else 0.0
                r["slo_attainment"] = s["slo_attainment"] = met / len(r["ttft_ms"]) if r["ttft_ms"] else 0.0
                r["goodput_per_unit"] = s["goodput"] / m["units"]
            m["sustained_rate"] = sustained(m["rates"], out["slo_attainment_target"])
            m["sustained_rate_per_unit"] = m["sustained_rate"] / m["units"]
    return out
