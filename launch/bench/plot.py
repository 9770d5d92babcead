"""`pd bench plot RESULTS.json`: the plots of a ``pd bench serve`` sweep, redrawn from its JSON.

One PNG per workload beside the JSON (``<stem>-<workload>.png``), every mode on it: goodput per GPU
(per instance on the CPU) against the rate, SLO attainment against the rate (the target dashed),
and the CDFs of TTFT and TPOT at the highest rate each mode ran (the SLO dashed; failed requests
keep a curve below 1). The Markdown report beside the JSON is rewritten with links to them.
With ``--slo-ttft-ms``/``--slo-tpot-ms`` the run is judged again at those SLOs (from each
request's TTFT and TPOT) into a new JSON, with its own report and plots.
matplotlib is an optional dependency (``pip install 'pdkv[plot]'``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from launch.bench.sweep_report import format_sweep, with_slos

KIND = "pd bench serve sweep"
NO_MATPLOTLIB = ("No plots: matplotlib is not installed (`pip install 'pdkv[plot]'`, then "
                 "`pd bench plot RESULTS.json`).")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="the JSON a pd bench serve sweep wrote (--out)")
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="judge the run again at this TTFT SLO (from each request's TTFT; default: the run's)")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="the same for TPOT")
    p.add_argument("--out", default=None,
                   help="with an SLO given: the re-judged JSON (default RESULTS-ttft<ms>-tpot<ms>.json beside it), "
                        "its report and plots beside it")


def load_results(path: Path) -> dict:
    """The sweep's results, checked enough to plot; ValueError saying what is wrong."""
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(results, dict) or results.get("kind") != KIND:
        raise ValueError(f"{path}: not the results of a pd bench serve sweep (its \"kind\" is not {KIND!r}); "
                         "give the --out JSON of pd bench serve --rates/--workloads")
    for name, w in results.get("workloads", {}).items():
        if not _SAFE_NAME.fullmatch(name) or not isinstance(w, dict) or not isinstance(w.get("modes"), dict):
            raise ValueError(f"{path}: workload {name!r} is not a workload of a sweep (a name of letters, "
                             "digits, _ . -, with its modes)")
    return results


def png_path(out: Path, workload: str) -> Path:
    return out.with_name(f"{out.stem}-{workload}.png")


def _cdf(ax, values: list, label: str) -> None:
    xs = sorted(v for v in values if v is not None)
    if xs:
        ax.step(xs, [(i + 1) / len(values) for i in range(len(xs))], where="post", label=label)


def _axes_text(axes, unit: str, wres: dict, target: float) -> None:
    (ax_g, ax_a), (ax_ttft, ax_tpot) = axes
    ax_g.set(xlabel="request rate, req/s", ylabel=f"goodput per {unit}, req/s", title=f"goodput per {unit}")
    ax_a.set(xlabel="request rate, req/s", ylabel="% within both SLOs", title="SLO attainment", ylim=(-3, 103))
    ax_a.axhline(100 * target, ls="--", color="grey", lw=1)
    for ax, key, what in ((ax_ttft, "slo_ttft_ms", "TTFT"), (ax_tpot, "slo_tpot_ms", "TPOT")):
        ax.axvline(wres[key], ls="--", color="grey", lw=1)
        ax.set(xlabel=f"{what}, ms", ylabel="share of requests", title=f"{what} CDF at each mode's highest rate",
               ylim=(0, 1.02))
    for ax in (ax_g, ax_a, ax_ttft, ax_tpot):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)


def draw_workload(plt, name: str, wres: dict, unit: str, target: float, path: Path, scale: float = 1.0) -> int:
    """One workload's figure to ``path`` (``scale``: the run's --length-scale); the number of axes drawn."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_g, ax_a), (ax_ttft, ax_tpot) = axes
    for label, m in wres["modes"].items():
        rates = sorted(m.get("rates", []), key=lambda r: r["rate"])
        if not rates:
            continue
        x = [r["rate"] for r in rates]
        ax_g.plot(x, [r["goodput_per_unit"] for r in rates], marker="o", label=label)
        ax_a.plot(x, [100 * r["slo_attainment"] for r in rates], marker="o", label=label)
        top = rates[-1]
        _cdf(ax_ttft, top["ttft_ms"], f"{label} at {top['rate']:g}/s")
        _cdf(ax_tpot, top["tpot_ms"], f"{label} at {top['rate']:g}/s")
    _axes_text(axes, unit, wres, target)
    fig.suptitle(f"{name}: {wres['about']}" + (f" (lengths x{scale:g})" if scale != 1 else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    n = len(fig.axes)
    plt.close(fig)
    return n


def draw_all(results: dict, out: Path) -> tuple[dict[str, Path], str]:
    """Every workload's PNG beside ``out``: ({workload: path}, a note when none could be drawn)."""
    try:
        import matplotlib  # noqa: PLC0415 - optional; only plotting needs it
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return {}, NO_MATPLOTLIB
    drawn = {}
    for name, wres in results["workloads"].items():
        path = png_path(out, name)
        draw_workload(plt, name, wres, results["unit"], results["slo_attainment_target"], path,
                      results.get("length_scale", 1.0))
        drawn[name] = path
    return drawn, ""


def run(args: argparse.Namespace) -> int:
    """Redraw the PNGs and rewrite the Markdown report of a sweep's results JSON."""
    path = Path(args.results)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; give the --out JSON of pd bench serve --rates/--workloads")
    results = load_results(path)
    if args.out and args.slo_ttft_ms is None and args.slo_tpot_ms is None:
        raise ValueError("--out: only with --slo-ttft-ms or --slo-tpot-ms (the re-judged JSON); without them "
                         "the plots and report go beside RESULTS.json")
    if args.slo_ttft_ms is not None or args.slo_tpot_ms is not None:
        for name, v in (("--slo-ttft-ms", args.slo_ttft_ms), ("--slo-tpot-ms", args.slo_tpot_ms)):
            if v is not None and not v > 0:
                raise ValueError(f"{name}: {v:g} is not allowed; give an SLO in ms > 0")
        results = with_slos(results, args.slo_ttft_ms, args.slo_tpot_ms)
        tag = "".join(f"-{k}{v:g}" for k, v in (("ttft", args.slo_ttft_ms), ("tpot", args.slo_tpot_ms)) if v is not None)
        path = Path(args.out) if args.out else path.with_name(f"{path.stem}{tag}.json")
        path.write_text(json.dumps(results, indent=1))
    drawn, note = draw_all(results, path)
    if note:
        print(f"pd bench plot: error: {note}", file=sys.stderr)
        return 2
    path.with_suffix(".md").write_text(format_sweep(results, {w: p.name for w, p in drawn.items()}) + "\n")
    for p in [*drawn.values(), path.with_suffix(".md")]:
        print(p)
    return 0
