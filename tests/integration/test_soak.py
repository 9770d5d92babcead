"""`pd bench soak` against the shared 1P1D deployment: a short soak, judged on its real figures."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

from launch.bench.soak_report import series
from launch.bench.soak_verdict import judge_all
from tests.integration.conftest import ROOT

MiB = 2**20


def test_short_soak_samples_every_process_and_stays_flat(deployments, tmp_path):
    pd, _ = deployments
    out = tmp_path / "soak.jsonl"
    argv = [sys.executable, "-m", "launch.cli", "bench", "soak", "--url", pd.url, "--config",
            str(pd.run_dir / "config.yaml"), "--minutes", "1.25", "--rate", "2", "--interval", "4",
            "--prompts", "8", "--long-tokens", "700", "--max-tokens", "16", "--drain-s", "60", "--out", str(out)]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "# verdict: PASS" in r.stdout and "## Verdict per series" in r.stdout
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(samples) >= 15
    # Found from the proxy's port: pd launch (the launcher), and every process it started, with
    # the vLLM instances' engine processes.
    names = set(samples[0]["procs"])
    assert {"launcher", "proxy", "coordinator", "prefill-0", "decode-0"} <= names, names
    assert any(n.startswith("prefill-0/") for n in names) and any(n.startswith("decode-0/") for n in names)
    assert all(v[0] > MiB and v[1] > 0 for v in samples[-1]["procs"].values())
    counts = samples[-1]["requests"]
    assert counts["ok"] >= 60 and counts.get("aborted", 0) >= 1 and not counts.get("failed")
    assert not counts.get("differ")
    assert samples[-1]["pool"] is not None and "entries" in samples[-1]["coordinator"]
    assert samples[-1]["kv_usage"] and set(samples[-1]["kv_usage"]) >= {"prefill-0", "decode-0"}
    # The verdict on these figures, recomputed here, is flat; the same figures with the proxy
    # leaking 8 MiB per sample are not, and the other series stay flat.
    judged = {(j.name, j.kind): j for j in judge_all(series(samples[:-1]))}
    assert judged and all(j.flat for j in judged.values())
    leaky = copy.deepcopy(samples[:-1])
    for i, s in enumerate(leaky):
        s["procs"]["proxy"][0] += i * 8 * MiB
    again = {(j.name, j.kind): j for j in judge_all(series(leaky))}
    assert not again[("proxy", "rss")].flat
    assert all(j.flat for k, j in again.items() if k != ("proxy", "rss"))
