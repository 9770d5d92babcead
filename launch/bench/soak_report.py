"""`pd bench soak`'s output: a line per sample, each process over time, the judged series, the verdict."""
from __future__ import annotations

from typing import TYPE_CHECKING

from launch.bench.soak_verdict import format_verdicts, judge_all

if TYPE_CHECKING:
    from launch.bench.soak import Target, Traffic


def line(s: dict) -> str:
    """One sample as one line."""
    r, procs = s["requests"], s["procs"]
    mib = sum(v[0] for v in procs.values()) / 2**20
    fds = sum(v[1] for v in procs.values())
    c, pool, store = s["coordinator"], s["pool"], s["store"]
    parts = [f"t={s['t']:6.0f}s sent {r.get('sent', 0)} ok {r.get('ok', 0)} aborted {r.get('aborted', 0)} "
             f"failed {r.get('failed', 0)} differ {r.get('differ', 0)} in flight {s['in_flight']}",
             f"{len(procs)} procs rss {mib:.0f} MiB fds {fds}"]
    if pool:
        parts.append(f"pool {pool['values']} values {pool['value_bytes'] / 2**20:.1f} MiB")
    if store:
        parts.append(f"store {store['files']} files {store['bytes'] / 2**20:.1f} MiB")
    parts.append(f"coordinator entries {c.get('entries', '-'):g} waiters {c.get('waiters', '-'):g} "
                 f"done_failed {c.get('done_failed', 0):g} wait_timeouts {c.get('wait_timeouts', 0):g}"
                 if c else "coordinator -")
    parts.append(f"proxy 5xx {s['proxy']['5xx']:g} 499 {s['proxy']['499']:g}")
    if s["kv_usage"]:
        parts.append("kv " + " ".join(f"{n} {v * 100:.1f}%" for n, v in s["kv_usage"].items()))
    return " | ".join(parts)


def series(samples: list[dict]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """The judged series of the samples: per process rss/fds/threads, the pool, the coordinator."""
    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for s in samples:
        t = s["t"]
        for name, (rss, fds, threads) in s["procs"].items():
            for kind, v in (("rss", rss), ("fds", fds), ("threads", threads)):
                out.setdefault((name, kind), []).append((t, v))
        if s["pool"]:
            out.setdefault(("pool", "pool_values"), []).append((t, s["pool"]["values"]))
            out.setdefault(("pool", "pool_bytes"), []).append((t, s["pool"]["value_bytes"]))
        for k in ("entries", "waiters"):
            if k in s["coordinator"]:
                out.setdefault(("coordinator", k), []).append((t, s["coordinator"][k]))
    return out


def over_time(samples: list[dict], points: int = 6) -> str:
    """Each process's resident MiB and fds at ``points`` times spread over the run."""
    picks = sorted({round(i * (len(samples) - 1) / (points - 1)) for i in range(points)}) if samples else []
    names = sorted({n for s in samples for n in s["procs"]})
    head = "| process | " + " | ".join(f"t={samples[i]['t']:.0f}s" for i in picks) + " |"
    lines = [head, "|:---|" + "---:|" * len(picks)]
    for n in names:
        cells = []
        for i in picks:
            v = samples[i]["procs"].get(n)
            cells.append(f"{v[0] / 2**20:.0f} MiB, {v[1]} fds" if v else "-")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leftovers(s: dict) -> dict[str, float]:
    """What a sample shows still held though no request is in flight (empty: nothing)."""
    left = {}
    for k in ("entries", "waiters"):
        if s["coordinator"].get(k):
            left[f"coordinator {k}"] = s["coordinator"][k]
    if s["pool"].get("values"):
        left["pool values"] = s["pool"]["values"]
    for name, v in s["kv_usage"].items():
        if v > 0:
            left[f"{name} kv cache usage"] = v
    return left


def report(samples: list[dict], last: dict, traffic: Traffic, target: Target, progress=print) -> bool:
    """Print the processes over time, the verdicts and what was left; whether the soak passed."""
    judged = judge_all(series(samples[:-1]))  # the drained sample is not under traffic
    progress("\n## Processes over time (resident memory, open fds)\n" + over_time(samples))
    progress("\n## Verdict per series\n" + format_verdicts(judged))
    c = traffic.counts
    ok = True
    why = []
    if not judged:
        ok = False
        why.append("too few samples for a verdict (run longer or sample more often)")
    grown = [f"{j.name} {j.kind}" for j in judged if not j.flat]
    if grown:
        ok = False
        why.append(f"not flat: {', '.join(grown)}")
    if c["failed"]:
        ok = False
        why.append(f"{c['failed']} requests failed ({dict(traffic.errors)})")
    if c["differ"]:
        ok = False
        why.append(f"{c['differ']} answers differed from the first answer of their prompt")
        for d in traffic.differing:
            progress(f"# differed: prompt {d['prompt']} ({'streamed' if d['stream'] else 'whole'}), pd_id "
                     f"{d['pd_id'] or '?'}: {d['text']!r}; its first answer, pd_id {d['first_pd_id'] or '?'}: "
                     f"{d['first']!r}")
    left = leftovers(last)
    if left:
        ok = False
        why.append(f"left after the drain: {left}")
    if target.store_budget is not None and samples:
        peak = max(s["store"].get("bytes", 0) for s in samples)
        progress(f"# store: at most {peak / 2**20:.1f} MiB on disk, budget {target.store_budget / 2**20:.1f} MiB")
        if peak > target.store_budget * 1.05:
            ok = False
            why.append("the store went over its budget")
    progress(f"\n# requests: {c['sent']} sent, {c['ok']} ok, {c['aborted']} aborted by the client, "
             f"{c['failed']} failed, {c['differ']} differing; coordinator at the end: "
             + ", ".join(f"{k} {last['coordinator'].get(k, 0):g}" for k in
                         ("done_ok", "done_failed", "aborts", "wait_timeouts", "expired", "malformed",
                          "internal_errors")))
    progress(f"# verdict: {'PASS' if ok else 'FAIL'}" + ("" if ok else ": " + "; ".join(why)))
    return ok
