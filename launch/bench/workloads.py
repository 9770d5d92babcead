"""What a ``pd bench serve`` sweep replays: named request mixes with their default SLOs, the rates,
and the prefill:decode splits (``xPyD``) of the P/D modes; each spec parsed with errors that name
the option, the bad value and what is allowed. docs/bench_serve.md, "Sweeps", describes them.

SLO defaults are DistServe-like (Zhong et al., OSDI 2024), not re-checked against the paper's Table 1:
chatbot on ShareGPT TTFT 0.25 s, TPOT 0.1 s (OPT-13B); summarization on LongBench TTFT 15 s, TPOT
0.15 s (OPT-66B), as DistServe's artifact-evaluation plot script has them (docs/bench_serve.md says
where). The decode-heavy mix keeps the chatbot's SLOs (an interactive answer that is long).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from launch.bench.common import VOCAB
from launch.bench.serve_load import Request


@dataclass(frozen=True)
class Mix:
    """One class of requests: its share of the workload and uniform length ranges (inclusive)."""

    share: float
    prompt: tuple[int, int]
    output: tuple[int, int]


@dataclass(frozen=True)
class Workload:
    name: str
    about: str
    mixes: tuple[Mix, ...]
    slo_ttft_ms: float
    slo_tpot_ms: float
    long_from: int  # prompts of at least this many tokens (before scaling) count as long
    scalable: bool = True  # False: --length-scale leaves its lengths alone (custom: given in tokens)


WORKLOADS: dict[str, Workload] = {
    "chat": Workload("chat", "chat mix: prompts of 128-1024 tokens, 64-384 output tokens",
                     (Mix(1.0, (128, 1024), (64, 384)),), 250.0, 100.0, 512),
    "longdoc": Workload("longdoc", "long documents: prompts of 4096-8192 tokens, 128-512 output tokens",
                        (Mix(1.0, (4096, 8192), (128, 512)),), 15000.0, 150.0, 6144),
    "decode_heavy": Workload("decode_heavy", "decode-heavy: prompts of 64-256 tokens, 512-1024 output tokens",
                             (Mix(1.0, (64, 256), (512, 1024)),), 250.0, 100.0, 192),
}
CUSTOM = "custom"  # the single-rate options: --long-fraction, --long-tokens, --short-tokens, --max-tokens
LEGACY_SLO_MS = (2000.0, 100.0)  # the SLOs of custom, as pd bench serve had them before the sweep


def fill_legacy_slos(args) -> None:
    """A single-rate run's SLOs: the options where given, else ``LEGACY_SLO_MS``."""
    args.slo_ttft_ms = LEGACY_SLO_MS[0] if args.slo_ttft_ms is None else args.slo_ttft_ms
    args.slo_tpot_ms = LEGACY_SLO_MS[1] if args.slo_tpot_ms is None else args.slo_tpot_ms


def custom_workload(args) -> Workload:
    """The workload of the single-rate options (fixed lengths, a share of long prompts)."""
    if not 0 <= args.long_fraction <= 1 or min(args.long_tokens, args.short_tokens, args.max_tokens) < 1:
        raise ValueError("--workloads custom: need 0 <= --long-fraction <= 1 and positive --long-tokens, "
                         "--short-tokens, --max-tokens")
    mixes = (Mix(args.long_fraction, (args.long_tokens,) * 2, (args.max_tokens,) * 2),
             Mix(1.0 - args.long_fraction, (args.short_tokens,) * 2, (args.max_tokens,) * 2))
    return Workload(CUSTOM, f"{args.long_fraction:g} of the prompts {args.long_tokens} tokens, the rest "
                    f"{args.short_tokens}; {args.max_tokens} output tokens", mixes, *LEGACY_SLO_MS,
                    long_from=max(args.long_tokens, args.short_tokens), scalable=False)


def parse_workloads(text: str, args) -> list[Workload]:
    names = [w.strip() for w in text.split(",") if w.strip()]
    allowed = ", ".join([*WORKLOADS, CUSTOM])
    if not names:
        raise ValueError(f"--workloads: {text!r} names no workload; allowed: {allowed}")
    out = []
    for name in names:
        if name not in WORKLOADS and name != CUSTOM:
            raise ValueError(f"--workloads: unknown workload {name!r}; allowed: {allowed}")
        if name in (w.name for w in out):
            raise ValueError(f"--workloads: {name!r} is given twice; give each workload once")
        out.append(custom_workload(args) if name == CUSTOM else WORKLOADS[name])
    return out


def parse_rates(text: str) -> list[float]:
    """``1,2,4`` -> [1.0, 2.0, 4.0]; each a finite number > 0 (requests per second), given once."""
    out: list[float] = []
    for item in (x.strip() for x in text.split(",")):
        try:
            rate = float(item)
        except ValueError:
            rate = float("nan")
        if not rate > 0 or rate == float("inf"):
            raise ValueError(f"--rates: {item!r} is not allowed; give request rates per second > 0, "
                             "comma-separated, e.g. 1,2,4")
        if rate in out:
            raise ValueError(f"--rates: {item!r} is given twice; give each rate once")
        out.append(rate)
    return out


_SPLIT = re.compile(r"(\d+)P(\d+)D", re.IGNORECASE)


def parse_splits(text: str) -> list[tuple[int, int]]:
    """``1P1D,1P3D`` -> [(1, 1), (1, 3)]: prefill and decode instances of the P/D modes."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        m = _SPLIT.fullmatch(item)
        if not m or min(int(m.group(1)), int(m.group(2))) < 1 or int(m.group(1)) + int(m.group(2)) > 64:
            raise ValueError(f"--split: {item!r} is not allowed; give xPyD with x prefill and y decode "
                             "instances, x, y >= 1 and x + y <= 64, comma-separated, e.g. 1P1D,1P3D,2P2D")
        split = (int(m.group(1)), int(m.group(2)))
        if split in out:
            raise ValueError(f"--split: {item!r} is given twice; give each split once")
        out.append(split)
    return out


def split_name(prefill: int, decode: int) -> str:
    return f"{prefill}P{decode}D"


def scaled(lo_hi: tuple[int, int], scale: float) -> tuple[int, int]:
    """A length range times ``scale`` (at least one token)."""
    return max(1, round(lo_hi[0] * scale)), max(1, round(lo_hi[1] * scale))


def longest(w: Workload, scale: float) -> int:
    """The most tokens (prompt + output) one request of ``w`` can need at ``scale``."""
    scale = scale if w.scalable else 1.0
    return max(scaled(m.prompt, scale)[1] + scaled(m.output, scale)[1] for m in w.mixes if m.share > 0)


def make_requests(w: Workload, n: int, rate: float, scale: float, seed: str) -> list[Request]:
    """``n`` requests of ``w`` (lengths times ``scale``) with Poisson arrivals of ``rate``/s; the
    prompts depend on ``seed`` only, so every mode gets the same ones and another seed others."""
    if n < 1 or not rate > 0 or not scale > 0:
        raise ValueError(f"need --requests >= 1, rates > 0 and --length-scale > 0 (got {n}, {rate}, {scale})")
    scale = scale if w.scalable else 1.0
    rng = random.Random(f"{seed}/{w.name}")
    times = random.Random(f"{seed}/{w.name}/arrivals")
    shares = [m.share for m in w.mixes]
    long_from = max(1, round(w.long_from * scale))
    t, out = 0.0, []
    for _ in range(n):
        mix = rng.choices(w.mixes, weights=shares)[0]
        size = rng.randint(*scaled(mix.prompt, scale))
        out.append(Request(t, [rng.randrange(*VOCAB) for _ in range(size)], rng.randint(*scaled(mix.output, scale)),
                           size >= long_from))
        t += times.expovariate(rate)
    return out
