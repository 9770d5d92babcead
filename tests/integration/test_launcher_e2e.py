"""The launcher with real vLLM: a child that dies is reported and everything else is stopped."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from tests.integration.conftest import start, wait_ready

pytestmark = pytest.mark.integration


def _pids_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a group: this container's init does not reap orphans."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True).stdout
    return [int(p) for p, g, st in (line.split() for line in out.splitlines())
            if int(g) == pgid and not st.startswith("Z")]


def test_dead_child_is_reported_and_the_rest_stopped(model_path, tmp_path):
    cfg = {"model": str(model_path), "mode": "colocated", "prefill": {"count": 1, "port_base": 18500},
           "decode": {"count": 0, "port_base": 18600}, "proxy": {"port": 18002},
           "vllm": {"block_size": 32, "kv_cache_space_gb": 1, "cpu_bind": "1"}}
    proc, log = start(cfg, tmp_path, "dies")
    dep = wait_ready(proc, log, cfg)
    run_dir = dep.run_dir
    # The instance's API server: the process listening on its port, in its own process group.
    out = subprocess.run(["pgrep", "-f", "--", "--port 18500"], capture_output=True, text=True).stdout.split()
    victim = next(int(p) for p in out if os.getpgid(int(p)) == int(p))
    os.kill(victim, signal.SIGKILL)
    code = proc.wait(120)
    text = log.read_text()
    assert code == 1, text[-2000:]
    assert re.search(r"(instance|prefill)-0 \(pid \d+\) was killed by SIGKILL", text), text[-2000:]
    assert "last lines of" in text and str(run_dir) in text
    time.sleep(1)
    assert not _pids_in_group(victim), "the dead instance's engine processes were left running"
    assert subprocess.run(["pgrep", "-f", "--", "--port 18002"], capture_output=True).returncode == 1, \
        "the proxy was left running"
