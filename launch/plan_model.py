"""``pd plan``'s model: the most requests per second each prefill:decode split of N GPUs (and N
colocated GPUs) serves within the TTFT and TPOT SLOs, from one instance's profile.

DistServe-style (Zhong et al., OSDI 2024): each phase is sized on its own and a split serves
``min(x * prefill rate, y * decode rate)``. Prefill: an M/G/1 queue of prompts (Poisson
arrivals, service = the profile's prefill time), the waiting time's tail taken as exponential
(Pollaczek-Khinchine mean). Decode: by Little's law the batch is B = rate * tokens after the
first * step time, and step time grows with B (``Profile.step_ms``); TPOT is the step time at a
high quantile of the batch (the number in service is about Poisson). Colocated (chunked
prefill): prefills take their share of the GPU's time, so TPOT is the step time over the share
left, and each prompt's chunks also wait for the decode batch they ride with. docs/plan.md
explains it with its limits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from launch.plan_inputs import Lengths, Profile

SEARCH_STEPS = 60  # bisection steps for a rate (far below 1e-6 relative)


@dataclass(frozen=True)
class SLO:
    ttft_ms: float
    tpot_ms: float
    attainment: float  # the share of requests that must meet each SLO (DistServe: 0.9)


@dataclass(frozen=True)
class Check:
    """One instance at one rate: the fraction meeting the TTFT SLO, TPOT at the attainment
    quantile, the mean decode batch, and why it misses the SLOs ("" if it meets them)."""

    ttft_attainment: float
    tpot_ms: float
    batch: float
    why: str


def ttft_attainment(rate: float, services: list[tuple[float, float]], slo_ms: float) -> float:
    """Share of requests whose wait + service <= ``slo_ms`` in an M/G/1 queue with arrivals at
    ``rate``/s and service times ``services`` ((ms, probability) pairs)."""
    es = sum(s * p for s, p in services)
    rho = rate * es / 1000.0
    if rho >= 1.0:
        return 0.0
    wait = rate / 1000.0 * sum(s * s * p for s, p in services) / (2.0 * (1.0 - rho))  # E[W], ms
    out = 0.0
    for s, p in services:
        if s <= slo_ms:
            out += p * (1.0 if wait <= 0 or rho <= 0 else 1.0 - rho * math.exp(-(slo_ms - s) * rho / wait))
    return out


def _decode(profile: Profile, lens: Lengths, rate: float, free: float, slo: SLO) -> tuple[float, float, str]:
    """Mean batch, TPOT at the attainment quantile and why it misses (""), for decode at
    ``rate``/s on an instance whose time is ``free`` (a share) for decode steps."""
    if lens.out_after_first <= 0:
        return 0.0, 0.0, ""
    a, b, c = profile.decode_coef
    k = b + c * lens.decode_context
    demand = rate * lens.out_after_first / 1000.0  # sequence-steps per ms
    room = free - demand * k
    if room <= 0:
        return math.inf, math.inf, "decode saturated"
    batch = demand * a / room
    high = batch + NormalDist().inv_cdf(slo.attainment) * math.sqrt(batch)
    tpot = profile.step_ms(high, lens.decode_context) / free
    if high > profile.max_batch:
        return batch, tpot, f"decode batch {high:.1f} > max_batch {profile.max_batch}"
    if profile.kv_capacity_tokens and high * lens.decode_context > profile.kv_capacity_tokens:
        return batch, tpot, f"KV {high * lens.decode_context:.0f} tokens > kv_capacity_tokens"
    if tpot > slo.tpot_ms:
        return batch, tpot, f"TPOT {tpot:.1f} ms > {slo.tpot_ms:g}"
    return batch, tpot, ""


def _ttft_why(att: float, slo: SLO) -> str:
    return "" if att >= slo.attainment else f"TTFT attainment {att:.3f} < {slo.attainment:g}"


def prefill_check(profile: Profile, lens: Lengths, rate: float, slo: SLO) -> Check:
    """A prefill instance of a P/D split at ``rate``/s."""
    att = ttft_attainment(rate, [(profile.prefill_ms(t), p) for t, p in lens.prompts], slo.ttft_ms)
    return Check(att, 0.0, 0.0, _ttft_why(att, slo))


def decode_check(profile: Profile, lens: Lengths, rate: float, slo: SLO) -> Check:
    """A decode instance of a P/D split at ``rate``/s (the KV transfer delays token 2: spread over
    the answer's tokens)."""
    batch, tpot, why = _decode(profile, lens, rate, 1.0, slo)
    if lens.out_after_first > 0 and not why and profile.kv_transfer_ms_per_1k:
        mean_prompt = sum(t * p for t, p in lens.prompts)
        tpot += profile.kv_transfer_ms_per_1k * mean_prompt / 1000.0 / lens.out_after_first
        why = f"TPOT {tpot:.1f} ms > {slo.tpot_ms:g}" if tpot > slo.tpot_ms else ""
    return Check(1.0, tpot, batch, why)


def colocated_check(profile: Profile, lens: Lengths, rate: float, slo: SLO) -> Check:
    """A colocated instance (chunked prefill) at ``rate``/s."""
    services = [(profile.prefill_ms(t), p) for t, p in lens.prompts]
    share = rate * sum(s * p for s, p in services) / 1000.0  # of the GPU's time, prefilling
    if share >= 1.0:
        return Check(0.0, math.inf, math.inf, "prefill saturated")
    batch, tpot, why = _decode(profile, lens, rate, 1.0 - share, slo)
    if batch == math.inf:
        return Check(0.0, tpot, batch, why)
    step = profile.step_ms(batch, lens.decode_context) if lens.out_after_first > 0 else 0.0
    budget = max(1.0, profile.max_num_batched_tokens - batch)
    chunked = [(s + math.ceil(t / budget) * step, p) for (s, p), (t, _) in zip(services, lens.prompts)]
    att = ttft_attainment(rate, chunked, slo.ttft_ms)
    return Check(att, tpot, batch, _ttft_why(att, slo) or why)


def max_rate(check, profile: Profile, lens: Lengths, slo: SLO) -> tuple[float, str]:
    """The highest rate one instance serves within the SLOs under ``check``, and what stops
    it going faster."""
    hi = 1.0
    while not check(profile, lens, hi, slo).why:
        hi *= 2.0
        if hi > 1e9:
            return math.inf, "nothing within the model's reach"
    lo = 0.0
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if not check(profile, lens, mid, slo).why else (lo, mid)
    return lo, check(profile, lens, hi * 1.01, slo).why  # what fails 1% beyond it (at it, "60.0 > 60")


@dataclass(frozen=True)
class Option:
    """One way to use the GPUs: ``prefill`` P and ``decode`` D instances, or (``prefill`` 0)
    ``decode`` colocated instances; the most it serves within the SLOs and what stops it there;
    ``at_rate``: its instances' checks at the workload's rate (prefill, decode; or colocated)."""

    name: str
    prefill: int
    decode: int
    gpus: int
    rate: float
    limit: str
    at_rate: tuple[Check, ...] = ()

    @property
    def per_gpu(self) -> float:
        return self.rate / self.gpus

    @property
    def colocated(self) -> bool:
        return self.prefill == 0

    @property
    def meets_rate(self) -> bool:
        return bool(self.at_rate) and not any(c.why for c in self.at_rate)


def options(profile: Profile, lens: Lengths, slo: SLO, gpus: int, rate: float | None = None) -> list[Option]:
    """Colocated and every xPyD split of ``gpus`` GPUs (x + y instances of the profile's size),
    best first (colocated first among equals: it is the simpler deployment)."""
    g = profile.gpus_per_instance
    m = gpus // g
    if m < 1:
        raise ValueError(f"--gpus {gpus}: not enough for one instance of gpus_per_instance {g}")
    rc, why_c = max_rate(colocated_check, profile, lens, slo)
    at = (colocated_check(profile, lens, rate / m, slo),) if rate else ()
    out = [Option(f"colocated x{m}", 0, m, m * g, m * rc, why_c, at)]
    if m >= 2:
        rp, why_p = max_rate(prefill_check, profile, lens, slo)
        rd, why_d = max_rate(decode_check, profile, lens, slo)
        for x in range(1, m):
            y = m - x
            limit = f"prefill: {why_p}" if x * rp <= y * rd else f"decode: {why_d}"
            at = (prefill_check(profile, lens, rate / x, slo), decode_check(profile, lens, rate / y, slo)) if rate else ()
            out.append(Option(f"{x}P{y}D", x, y, m * g, min(x * rp, y * rd), limit, at))
    return sorted(out, key=lambda o: -o.rate)


def advice(opts: list[Option], rate: float | None = None) -> list[str]:
    """What to deploy, in a few sentences."""
    best, colo = opts[0], next(o for o in opts if o.colocated)
    pd = [o for o in opts if not o.colocated]
    lines = []
    if best.rate <= 0:
        lines.append("No option meets the SLOs at any rate: the prompts alone take longer than the TTFT SLO, or one "
                     "decode step longer than the TPOT SLO (see 'limited by').")
    elif not pd:
        lines.append(f"Colocated: P/D needs at least 2 instances; {best.name} serves {best.rate:.3g} req/s.")
    elif best.colocated:
        top = pd[0]
        lines.append(f"Colocated is the better choice: {colo.name} serves {colo.rate:.3g} req/s within the SLOs, "
                     f"{_ratio(colo.rate, top.rate)} the best P/D split ({top.name}, {top.rate:.3g} req/s). The "
                     "SLOs leave room for prefill to share the GPUs with decode, and no split of these GPUs matches "
                     "the two phases' loads as well as every GPU doing both.")
    else:
        lines.append(f"{best.name}: {best.rate:.3g} req/s within the SLOs ({best.per_gpu:.3g} per GPU), "
                     f"{_ratio(best.rate, colo.rate)} colocated ({colo.rate:.3g} req/s, limited by {colo.limit}).")
    if rate:
        ok = [o.name for o in opts if o.meets_rate]
        lines.append(f"At {rate:g} req/s: " + (f"{', '.join(ok)} meet the SLOs." if ok else
                     f"no option meets the SLOs; the most any serves is {best.rate:.3g} req/s."))
    return lines


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "more than"
