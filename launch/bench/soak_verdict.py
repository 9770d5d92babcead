"""`pd bench soak`'s verdict: did every resource series stay flat?

A series is a list of ``(t_s, value)`` samples taken under steady traffic. The first
``WARMUP`` of the run is left out (caches fill, pools and arenas are faulted in, the allocator
grows to its working set); the rest is cut into an early and a late half. The series' *growth*
is median(late) - median(early): medians, so a sample taken at a burst of in-flight requests
does not decide. A series is flat when its growth is at most its tolerance, ``max(abs, rel *
median(early))`` for its kind (``TOLERANCES``). The least-squares slope per minute over the same
samples is reported beside it, for reading, not judged.

A leak grows with the requests served, so it grows through the late half too; a process that
settles (allocator arenas, caches with a bound) does not. Over a short run the tolerance is
what a slow leak must beat; the longer the run, the smaller the leak per request it catches.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

WARMUP = 0.25  # share of the run's samples left out at the start
MIN_SAMPLES = 6  # after the warm-up (3 per half); fewer: no verdict

# kind -> (abs, rel): growth allowed = max(abs, rel * early level)
TOLERANCES: dict[str, tuple[float, float]] = {
    "rss": (32 * 2**20, 0.10),  # bytes resident
    "fds": (8, 0.10),  # open file descriptors
    "threads": (8, 0.10),
    "pool_values": (16, 0.0),  # live values in the transport pool (in flight ones included)
    "pool_bytes": (64 * 2**20, 0.0),
    "entries": (8, 0.0),  # coordinator: READYs held, WAITs parked
    "waiters": (8, 0.0),
}


@dataclass
class Judged:
    name: str
    kind: str
    early: float
    late: float
    growth: float
    allowed: float
    slope_per_min: float
    n: int

    @property
    def flat(self) -> bool:
        return self.growth <= self.allowed


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``points`` (value per second); 0 for fewer than two times."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0


def judge(name: str, kind: str, points: list[tuple[float, float]]) -> Judged | None:
    """The verdict on one series; None if it has too few samples after the warm-up."""
    if kind not in TOLERANCES:
        raise ValueError(f"series {name}: unknown kind {kind!r}; allowed: {', '.join(TOLERANCES)}")
    points = sorted(points)
    kept = points[int(len(points) * WARMUP):]
    if len(kept) < MIN_SAMPLES:
        return None
    half = len(kept) // 2
    early = statistics.median(v for _, v in kept[:half])
    late = statistics.median(v for _, v in kept[half:])
    a, r = TOLERANCES[kind]
    return Judged(name, kind, early, late, late - early, max(a, r * early), slope(kept) * 60, len(kept))


def judge_all(series: dict[tuple[str, str], list[tuple[float, float]]]) -> list[Judged]:
    """Every series ({(name, kind): points}) with enough samples; a process that was not there
    for the whole run (restarted, short-lived) is judged on the samples it has."""
    out = []
    for (name, kind), points in sorted(series.items()):
        j = judge(name, kind, points)
        if j is not None:
            out.append(j)
    return out


def _fmt(kind: str, v: float) -> str:
    if kind in ("rss", "pool_bytes"):
        return f"{v / 2**20:.1f} MiB"
    return f"{v:g}"


def format_verdicts(judged: list[Judged]) -> str:
    """One row per series: early and late level, growth, what is allowed, slope, flat or not."""
    lines = ["| series | early | late | growth | allowed | slope /min | flat |", "|:---|---:|---:|---:|---:|---:|:---|"]
    for j in judged:
        lines.append(f"| {j.name} {j.kind} | {_fmt(j.kind, j.early)} | {_fmt(j.kind, j.late)} | "
                     f"{_fmt(j.kind, j.growth)} | {_fmt(j.kind, j.allowed)} | {_fmt(j.kind, j.slope_per_min)} | "
                     f"{'yes' if j.flat else 'NO'} |")
    return "\n".join(lines)
