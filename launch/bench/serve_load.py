"""The load of ``pd bench serve`` (CPU and GPU runs): a seeded workload with Poisson arrivals, the
streaming client that times every token, and the figures of one mode (TTFT, TPOT, ITL, goodput).
"""
from __future__ import annotations

import json
import random
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from launch.bench.common import VOCAB


@dataclass
class Request:
    arrival_s: float
    prompt: list[int]
    max_tokens: int
    long: bool


@dataclass
class Result:
    ok: bool
    long: bool
    sent: float
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # where the server returns them (return_token_ids)
    error: str = ""
    pd_id: str = ""  # the proxy's x-pd-id (P/D mode)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def tpot(self) -> float | None:
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


def make_workload(n: int, rate: float, long_fraction: float, long_tokens: int, short_tokens: int,
                  max_tokens: int, seed: int = 0) -> list[Request]:
    """``n`` requests with Poisson arrivals of ``rate``/s; the same for the same arguments."""
    if n < 1 or rate <= 0 or not 0 <= long_fraction <= 1 or min(long_tokens, short_tokens, max_tokens) < 1:
        raise ValueError("need --requests >= 1, --rate > 0, 0 <= --long-fraction <= 1 and positive "
                         "--long-tokens, --short-tokens, --max-tokens")
    rng = random.Random(seed)
    n_long = round(n * long_fraction)
    kinds = [True] * n_long + [False] * (n - n_long)
    rng.shuffle(kinds)
    t, out = 0.0, []
    for is_long in kinds:
        size = long_tokens if is_long else short_tokens
        out.append(Request(t, [rng.randrange(*VOCAB) for _ in range(size)], max_tokens, is_long))
        t += rng.expovariate(rate)
    return out


def completion_body(model: str, req: Request) -> dict:
    return {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}


def stream_into(url: str, body: dict, res: Result) -> None:
    """POST ``body`` to ``url``/v1/completions and record the streamed tokens' arrival times in ``res``."""
    r = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                               {"Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=600) as resp:
        res.pd_id = resp.headers.get("x-pd-id") or ""
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            now = time.perf_counter()
            choice = json.loads(line[6:])["choices"][0]
            ids = choice.get("token_ids") or []
            res.token_ids += ids
            if choice.get("text") or ids:  # a token whose text is "" still came (its ids say so)
                res.token_times.append(now)
                res.text += choice.get("text") or ""
    res.ok = bool(res.token_times)
    res.error = "" if res.ok else "no tokens"


def answer(r: Result) -> list[int] | str | None:
    """What answers are compared by: the token ids where the server returned them (texts of
    random-weight models' tokens can render alike or differ for the same ids), else the text."""
    return None if not r.ok else (list(r.token_ids) if r.token_ids else r.text)


def send_one(url: str, model: str, req: Request, res: Result) -> None:
    res.sent = time.perf_counter()
    try:
        stream_into(url, completion_body(model, req), res)
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(e).__name__}: {e}"


class Progress:
    """Requests done / total and the rates on stderr (or ``stream``): on a terminal one line redrawn
    (``\\r``) at most once a second, otherwise a line at each tenth done."""

    def __init__(self, label: str, total: int, rate: float, stream=None, clock=time.monotonic):
        self.label, self.total, self.rate, self.clock = label, total, rate, clock
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.done = self.failed = self._tenths = 0
        self._lock = threading.Lock()
        self._t0, self._last = clock(), float("-inf")

    def tick(self, ok: bool) -> None:
        """One request has finished (``ok``: it got its tokens)."""
        with self._lock:
            self.done += 1
            self.failed += not ok
            now, last = self.clock(), self.done == self.total
            if self.tty and (now - self._last >= 1.0 or last):
                self._last = now
                self._write(now, "\r", "\n" if last else "")
            elif not self.tty and self.done * 10 // self.total > self._tenths:
                self._tenths = self.done * 10 // self.total
                self._write(now, "", "\n")

    def _write(self, now: float, head: str, tail: str) -> None:
        elapsed = now - self._t0
        done_rate = self.done / elapsed if elapsed > 0 else 0.0
        self.stream.write(f"{head}{self.label}: {self.done}/{self.total} done ({self.failed} failed), "
                          f"{self.rate:g}/s sent, {done_rate:.2f}/s done, {elapsed:.0f} s{tail}")
        self.stream.flush()


def run_load(url: str, model: str, workload: list[Request], send=send_one,
             progress: Progress | None = None) -> tuple[list[Result], float]:
    """Send each request at its arrival time (one thread each, ``send(url, model, req, res)``),
    ticking ``progress`` as each finishes; (results, wall seconds)."""
    results = [Result(False, r.long, 0.0) for r in workload]

    def one(req: Request, res: Result) -> None:
        send(url, model, req, res)
        if progress is not None:
            progress.tick(res.ok)

    threads = []
    t0 = time.perf_counter()
    for req, res in zip(workload, results):
        delay = t0 + req.arrival_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one, args=(req, res), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    ends = [r.token_times[-1] for r in results if r.token_times]
    return results, (max(ends) if ends else time.perf_counter()) - t0


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summarize(results: list[Result], wall_s: float, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    """The figures of one mode (seconds; None where no request gave one)."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    short_tpot = [r.tpot for r in ok if r.tpot is not None and not r.long]
    itl = [x for r in ok for x in r.itls]
    good = [r for r in ok if r.ttft <= slo_ttft_s and (r.tpot is None or r.tpot <= slo_tpot_s)]
    out = {"requests": len(results), "failed": len(results) - len(ok), "wall_s": wall_s,
           "throughput_tok_s": sum(len(r.token_times) for r in ok) / wall_s if wall_s > 0 else 0.0,
           "request_rate": len(ok) / wall_s if wall_s > 0 else 0.0,
           "goodput": len(good) / wall_s if wall_s > 0 else 0.0, "slo_met": len(good),
           "slo_attainment": len(good) / len(results) if results else 0.0}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("tpot_short", short_tpot), ("itl", itl)):
        for q in (0.5, 0.9, 0.99):
            out[f"{name}_p{int(q * 100)}"] = _pct(xs, q)
    out["ttft_long_p50"] = _pct([r.ttft for r in ok if r.long], 0.5)
    out["ttft_short_p50"] = _pct([r.ttft for r in ok if not r.long], 0.5)
    # From token 1 to token 2: in P/D with the first token from the prefill, the decode's start
    # (its request, admission, KV load, first step); beside the ITL of the same prompts.
    for kind, pick in (("", lambda r: True), ("_long", lambda r: r.long), ("_short", lambda r: not r.long)):
        out[f"gap12{kind}_p50"] = _pct([r.itls[0] for r in ok if r.itls and pick(r)], 0.5)
        out[f"itl{kind}_p50" if kind else "itl_p50"] = _pct([x for r in ok if pick(r) for x in r.itls], 0.5)
    out["gap12_p90"] = _pct([r.itls[0] for r in ok if r.itls], 0.9)
    return out


ROWS = [("TTFT p50 ms", "ttft_p50", 1e3), ("TTFT p90 ms", "ttft_p90", 1e3), ("TTFT p99 ms", "ttft_p99", 1e3),
        ("TTFT p50 ms, long prompts", "ttft_long_p50", 1e3), ("TTFT p50 ms, short prompts", "ttft_short_p50", 1e3),
        ("TPOT p50 ms", "tpot_p50", 1e3), ("TPOT p90 ms", "tpot_p90", 1e3), ("TPOT p99 ms", "tpot_p99", 1e3),
        ("TPOT p99 ms, short prompts", "tpot_short_p99", 1e3),
        ("ITL p50 ms", "itl_p50", 1e3), ("ITL p90 ms", "itl_p90", 1e3), ("ITL p99 ms", "itl_p99", 1e3),
        ("ITL p50 ms, long prompts", "itl_long_p50", 1e3),
        ("token 1 to 2 p50 ms", "gap12_p50", 1e3), ("token 1 to 2 p90 ms", "gap12_p90", 1e3),
        ("token 1 to 2 p50 ms, long prompts", "gap12_long_p50", 1e3),
        ("token 1 to 2 p50 ms, short prompts", "gap12_short_p50", 1e3),
        ("output tokens/s", "throughput_tok_s", 1.0), ("requests/s", "request_rate", 1.0),
        ("goodput (SLO met)/s", "goodput", 1.0), ("requests meeting the SLOs", "slo_met", 1.0),
        ("failed requests", "failed", 1.0)]


def format_table(figures: dict[str, dict]) -> str:
    """One row per metric, one column per mode, then <first>/<mode> ratios when the first mode is a
    P/D one (pd, or pd-1P3D at another split)."""
    modes = list(figures)
    others = modes[1:] if modes and modes[0].split("-")[0] == "pd" else []
    head = ["metric", *modes] + [f"{modes[0]}/{m}" for m in others]
    lines = ["| " + " | ".join(head) + " |", "|:---|" + "---:|" * (len(head) - 1)]
    for label, key, scale in ROWS:
        vals = [figures[m].get(key) for m in modes]
        cells = ["-" if v is None else f"{v * scale:.1f}" for v in vals]
        for b in vals[1:] if others else []:
            a = vals[0]
            cells.append(f"{a / b:.2f}" if a is not None and b else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
