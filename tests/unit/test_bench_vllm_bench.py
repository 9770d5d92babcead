"""launch/bench/vllm_bench.py: seed 004's `vllm bench serve` workflow, its command line and result."""
from __future__ import annotations

import json
import sys

import pytest

from launch.bench import vllm_bench

RESULT = {"completed": 3, "failed": 0, "total_input_tokens": 300, "mean_ttft_ms": 80.0, "median_ttft_ms": 75.0,
          "p99_ttft_ms": 120.0, "mean_tpot_ms": 5.0, "median_tpot_ms": 4.9, "p99_tpot_ms": 7.0,
          "request_throughput": 2.0}


def test_command_has_seed_004s_flags_and_skips_the_warming_readiness_check():
    cmd = vllm_bench.command("http://127.0.0.1:9", "tiny-llama", "/m", 50, 8192, 128, 42)
    assert cmd[:2] == [sys.executable, "-c"] and "vllm.benchmarks.serve" in cmd[2]
    assert cmd[3:].count("--ignore-eos") == 1
    args = cmd[3:]
    for flag, value in (("--backend", "vllm"), ("--base-url", "http://127.0.0.1:9"), ("--model", "tiny-llama"),
                        ("--tokenizer", "/m"), ("--num-prompts", "50"), ("--dataset-name", "random"),
                        ("--random-input-len", "8192"), ("--random-output-len", "128"), ("--seed", "42"),
                        ("--ready-check-timeout-sec", "0")):
        assert args[args.index(flag) + 1] == value, flag


@pytest.mark.parametrize("bad", [(0, 10, 10), (5, 0, 10), (5, 10, 0)])
def test_command_refuses_empty_workloads(bad):
    with pytest.raises(ValueError, match="must each be at least 1"):
        vllm_bench.command("u", "m", "/m", *bad, 0)


def test_parse_takes_the_last_result_line_and_says_what_came_instead():
    out = "Starting...\nPDKV-RESULT {\"completed\": 1}\nnoise\n" + vllm_bench.MARK + json.dumps(RESULT) + "\n"
    assert vllm_bench.parse(out) == RESULT
    with pytest.raises(ValueError, match=r"(?s)printed no result.*Traceback"):
        vllm_bench.parse("Traceback (most recent call last):\n  boom")


def test_run_once_reports_a_failed_child_with_its_output():
    with pytest.raises(RuntimeError, match=r"(?s)failed \(exit 3\).*went wrong"):
        vllm_bench.run_once([sys.executable, "-c", "print('went wrong'); raise SystemExit(3)"], 30)


def test_report_has_both_runs_and_the_ratio():
    text = vllm_bench.report({"cold": RESULT, "warm": {**RESULT, "mean_ttft_ms": 20.0}}, "run")
    assert "| cold | 80.0 | 75.0 | 120.0 | 4.90 | 3 | 0 |" in text and "| warm | 20.0 |" in text
    assert "cold/warm mean TTFT: 4.00" in text
