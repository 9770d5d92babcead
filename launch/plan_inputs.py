"""What ``pd plan`` reads: one instance's profile and the workload, checked with errors that name
the file, the key, the bad value and what is allowed. The model that uses them is
``launch.plan_model``; docs/plan.md describes both files.

Profile (YAML or JSON)::

    gpus_per_instance: 1          # GPUs of one instance (its TP size)
    prefill_ms: {512: 35, 2048: 130, 8192: 640}   # one prompt of N tokens prefilled alone
    decode_step_ms:               # one decode step: [batch size, context tokens per sequence, ms]
      - [1, 1024, 11.5]
      - [64, 1024, 19.0]
      - [64, 8192, 41.0]
    max_batch: 256                # vLLM's max_num_seqs
    max_num_batched_tokens: 8192  # tokens per step (chunked prefill's budget, colocated)
    kv_capacity_tokens: 0         # tokens of KV an instance holds (0: not a limit)
    kv_transfer_ms_per_1k_tokens: 0   # P/D: KV transfer before token 2, per 1000 prompt tokens

Workload: a name of ``launch.bench.workloads.WORKLOADS`` (chat, longdoc, decode_heavy) or a file::

    mixes:                        # shares add up to 1; lengths uniform in [lo, hi] tokens
      - {share: 0.5, prompt: [4096, 8192], output: [128, 512]}
      - {share: 0.5, prompt: [128, 1024], output: [64, 384]}
    slo_ttft_ms: 2000             # optional: the SLOs (the command line's options win)
    slo_tpot_ms: 100
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from common.config import ConfigError
from launch.bench.workloads import WORKLOADS, Mix, Workload

POINTS_PER_MIX = 16  # prompt lengths each uniform range is cut into


@dataclass(frozen=True)
class Profile:
    """One instance: prefill time by prompt length, decode step time = a + b*B + c*B*context."""

    gpus_per_instance: int
    prefill_points: tuple[tuple[int, float], ...]  # (tokens, ms), tokens ascending
    decode_coef: tuple[float, float, float]  # a (ms), b (ms per sequence), c (ms per sequence-token)
    max_batch: int
    max_num_batched_tokens: int
    kv_capacity_tokens: int
    kv_transfer_ms_per_1k: float

    def prefill_ms(self, tokens: float) -> float:
        """Interpolated between the measured lengths; the shortest's time below them, the last
        segment's slope beyond them (one point: proportional to the length)."""
        pts = self.prefill_points
        if len(pts) == 1:
            return pts[0][1] * tokens / pts[0][0]
        if tokens <= pts[0][0]:
            return pts[0][1]
        (l0, t0), (l1, t1) = next(((a, b) for a, b in zip(pts, pts[1:]) if tokens <= b[0]), pts[-2:])
        return t0 + (t1 - t0) * (tokens - l0) / (l1 - l0)

    def step_ms(self, batch: float, context: float) -> float:
        a, b, c = self.decode_coef
        return a + b * batch + c * batch * context


@dataclass(frozen=True)
class Lengths:
    """What the model needs of a workload: prompt lengths with their probabilities, the mean
    number of tokens after the first, and the context a decoding sequence has on average over
    its steps (longer answers weigh more: they stay longer)."""

    prompts: tuple[tuple[float, float], ...]  # (tokens, probability)
    out_after_first: float
    decode_context: float


def _fail(where: str, key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{where}: {key}: {value!r} is not allowed; {allowed}")


def read_mapping(path: str | Path, what: str) -> dict:
    """A YAML or JSON file holding a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} file {p} is not valid YAML or JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {p}: expected a mapping of keys, got {type(data).__name__}")
    return data


def _number(where: str, key: str, v: Any, lo: float, integer: bool = False, strict: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > lo if strict else v >= lo)
    if not ok or (integer and v != int(v)):
        kind = "an integer" if integer else "a number"
        raise _fail(where, key, v, f"give {kind} {'>' if strict else '>='} {lo:g}")
    return int(v) if integer else float(v)


def _fit_decode(where: str, rows: Any) -> tuple[float, float, float]:
    """Non-negative least squares of step ms on [1, B, B*context] (a coefficient the fit makes
    negative is dropped and the rest refit)."""
    need = "give at least 3 [batch, context, ms] triples that differ in batch size and in context"
    if not isinstance(rows, list) or len(rows) < 3:
        raise _fail(where, "decode_step_ms", rows, need)
    pts = []
    for i, r in enumerate(rows):
        if not isinstance(r, (list, tuple)) or len(r) != 3:
            raise _fail(where, f"decode_step_ms[{i}]", r, "give [batch size, context tokens, step ms]")
        key = f"decode_step_ms[{i}]"
        pts.append((_number(where, key, r[0], 1, True), _number(where, key, r[1], 0), _number(where, key, r[2], 0, strict=True)))
    x = np.array([[1.0, b, b * c] for b, c, _ in pts])
    y = np.array([t for _, _, t in pts])
    if np.linalg.matrix_rank(x) < 3:
        raise _fail(where, "decode_step_ms", rows, need)
    keep = [0, 1, 2]
    while True:
        coef = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        if (coef >= 0).all():
            break
        keep = [k for k, c in zip(keep, coef) if c >= 0] or [0]
    out = [0.0, 0.0, 0.0]
    for k, c in zip(keep, coef):
        out[k] = max(0.0, float(c))
    return out[0], out[1], out[2]


PROFILE_KEYS = ("gpus_per_instance", "prefill_ms", "decode_step_ms", "max_batch", "max_num_batched_tokens",
                "kv_capacity_tokens", "kv_transfer_ms_per_1k_tokens")


def parse_profile(data: dict, where: str = "profile") -> Profile:
    unknown = sorted(set(map(str, data)) - set(PROFILE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]}; allowed keys: {', '.join(PROFILE_KEYS)}")
    for key in ("prefill_ms", "decode_step_ms"):
        if key not in data:
            raise ConfigError(f"{where}: {key} is missing (docs/plan.md shows a profile)")
    pre = data["prefill_ms"]
    if not isinstance(pre, dict) or not pre:
        raise _fail(where, "prefill_ms", pre, "give a mapping of prompt tokens to the ms one such prompt takes alone")
    points = []
    for k, v in pre.items():
        try:
            tokens = int(str(k))
        except ValueError:
            tokens = 0
        if tokens < 1:
            raise _fail(where, "prefill_ms", k, "each key is a prompt length in tokens, an integer >= 1")
        points.append((tokens, _number(where, f"prefill_ms[{k}]", v, 0, strict=True)))
    points.sort()
    if any(b[1] < a[1] for a, b in zip(points, points[1:])):
        raise _fail(where, "prefill_ms", pre, "a longer prompt cannot take less time than a shorter one")
    g = lambda key, lo, dflt: _number(where, key, data.get(key, dflt), lo, True)  # noqa: E731
    return Profile(g("gpus_per_instance", 1, 1), tuple(points), _fit_decode(where, data["decode_step_ms"]),
                   g("max_batch", 1, 256), g("max_num_batched_tokens", 1, 8192), g("kv_capacity_tokens", 0, 0),
                   _number(where, "kv_transfer_ms_per_1k_tokens", data.get("kv_transfer_ms_per_1k_tokens", 0), 0))


def load_profile(path: str | Path) -> Profile:
    return parse_profile(read_mapping(path, "profile"), f"profile {path}")


def _range(where: str, key: str, v: Any) -> tuple[int, int]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v, v]
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise _fail(where, key, v, "give [lo, hi] tokens (or one number)")
    lo, hi = (_number(where, key, x, 1, True) for x in v)
    if lo > hi:
        raise _fail(where, key, v, "lo must not exceed hi")
    return lo, hi


def parse_workload(data: dict, name: str = "custom") -> Workload:
    where = f"workload {name}"
    allowed = ("mixes", "slo_ttft_ms", "slo_tpot_ms")
    unknown = sorted(set(map(str, data)) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]}; allowed keys: {', '.join(allowed)}")
    mixes = data.get("mixes")
    if not isinstance(mixes, list) or not mixes:
        raise _fail(where, "mixes", mixes, "give a list of {share, prompt: [lo, hi], output: [lo, hi]}")
    out = []
    for i, m in enumerate(mixes):
        key = f"mixes[{i}]"
        if not isinstance(m, dict) or set(m) - {"share", "prompt", "output"} or not {"prompt", "output"} <= set(m):
            raise _fail(where, key, m, "give {share, prompt: [lo, hi], output: [lo, hi]} (share defaults to 1)")
        out.append(Mix(_number(where, f"{key}.share", m.get("share", 1.0), 0), _range(where, f"{key}.prompt", m["prompt"]),
                       _range(where, f"{key}.output", m["output"])))
    total = sum(m.share for m in out)
    if total <= 0:
        raise _fail(where, "mixes", mixes, "at least one share must be > 0")
    slo = [_number(where, k, data[k], 0, strict=True) if k in data else 0.0 for k in ("slo_ttft_ms", "slo_tpot_ms")]
    return Workload(name, "", tuple(Mix(m.share / total, m.prompt, m.output) for m in out), slo[0], slo[1], 0)


def load_workload(spec: str) -> Workload:
    """A named workload, or one from a file."""
    if spec in WORKLOADS:
        return WORKLOADS[spec]
    if not Path(spec).is_file():
        raise ConfigError(f"--workload: {spec!r} is neither a workload name ({', '.join(WORKLOADS)}) nor a file")
    return parse_workload(read_mapping(spec, "workload"), spec)


def lengths(w: Workload) -> Lengths:
    """The workload's lengths as the model takes them (each uniform range as ``POINTS_PER_MIX`` points)."""
    prompts: dict[float, float] = {}
    out_mean = ctx_weighted = 0.0
    for m in w.mixes:
        if m.share <= 0:
            continue
        (plo, phi), (olo, ohi) = m.prompt, m.output
        n = 1 if plo == phi else POINTS_PER_MIX
        for k in range(n):
            tokens = plo + (phi - plo) * (k + 0.5) / n if n > 1 else plo
            prompts[tokens] = prompts.get(tokens, 0.0) + m.share / n
        o = (olo + ohi) / 2 - 1  # tokens after the first; uniform: E[O'] and E[O'^2]
        o2 = ((ohi - 1) ** 3 - (olo - 2) ** 3) / (3 * (ohi - olo + 1)) if ohi > olo else o * o
        out_mean += m.share * o
        ctx_weighted += m.share * (o * (plo + phi) / 2 + o2 / 2)  # E[O' * (P + O'/2)]
    ctx = ctx_weighted / out_mean if out_mean > 0 else 0.0
    return Lengths(tuple(sorted(prompts.items())), out_mean, ctx)
