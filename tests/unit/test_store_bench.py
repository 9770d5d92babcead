"""``pd bench store``: a tiny real run on the local disk, and clear errors for bad backends."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import cli
from store.dram import default_dir

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_prints_table_and_cleans_up(tmp_path, capsys):
    rc = cli.main(["bench", "store", "--backend", "local", "--path", str(tmp_path),
                   "--sizes", "256K,1M", "--total-mb", "4", "--iters", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "# pd bench store" in out and "# command:" in out and "o_direct: off, on" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "GB/s" not in line]
    assert [r.split("|")[1:4] for r in rows] == [
        [" off ", " 256K ", " 16 "], [" off ", " 1M ", " 4 "],
        [" on ", " 256K ", " 16 "], [" on ", " 1M ", " 4 "]]
    header = next(line for line in out.splitlines() if line.startswith("| o_direct"))
    for col in ("write GB/s", "plain write GB/s", "write/plain", "read/plain", "put p99", "get p50"):
        assert col in header
    for r in rows:  # every number parses and the rates are positive
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert all(float(c) > 0 for c in cells[3:9])
    assert os.listdir(tmp_path) == []


def test_only_o_direct_rows(tmp_path, capsys):
    rc = cli.main(["bench", "store", "--path", str(tmp_path), "--sizes", "256K",
                   "--total-mb", "1", "--iters", "1", "--o-direct"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith("| on ") or line.startswith("| off ")]
    assert [r.split("|")[1].strip() for r in rows] == ["on"]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("backend, words", [("hf3fs", ["hf3fs_py_usrbio", "PYTHONPATH=tests/doubles"]),
                                            ("nfs", ["unknown store backend", "local", "hf3fs"])])
def test_bad_backend_exit_2(tmp_path, backend, words):
    p = subprocess.run([sys.executable, "-m", "launch.cli", "bench", "store", "--backend", backend,
                        "--path", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr + p.stdout
    assert p.stderr.startswith("pd bench store: error:")
    for w in words:
        assert w in p.stderr
    assert os.listdir(tmp_path) == []


def test_dram_tier_rows_and_its_arena_removed(tmp_path, capsys):
    shm = Path(default_dir())
    before = set(shm.iterdir()) if shm.exists() else set()
    rc = cli.main(["bench", "store", "--path", str(tmp_path), "--sizes", "256K", "--total-mb", "1",
                   "--iters", "1", "--no-o-direct", "--dram-gb", "0.01"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "# DRAM tier: 0.01 GB in /dev/shm" in out
    assert [r.split("|")[1:4] for r in out.splitlines() if r.startswith("| off ")] == [[" off ", " 256K ", " 4 "]]
    assert os.listdir(tmp_path) == [] and set(shm.iterdir()) == before
    assert cli.main(["bench", "store", "--path", str(tmp_path), "--dram-gb", "-1"]) == 2
    assert "--dram-gb must be 0" in capsys.readouterr().err


def test_bad_sizes_exit_2(tmp_path, capsys):
    assert cli.main(["bench", "store", "--path", str(tmp_path), "--sizes", "1000"]) == 2
    assert "multiples of 4096" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_hf3fs_on_the_emulator_says_so(tmp_path):
    """With tests/doubles on the path, hf3fs_fuse.io is the emulator: the run works and its
    header says the figures are not 3FS figures."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "doubles")}
    p = subprocess.run([sys.executable, "-m", "launch.cli", "bench", "store", "--backend", "hf3fs",
                        "--path", str(tmp_path), "--sizes", "256K,1M", "--total-mb", "2", "--iters", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert "USRBIO EMULATOR" in p.stdout and "NOT 3FS" in p.stdout and "backend=hf3fs" in p.stdout
    rows = [line for line in p.stdout.splitlines() if line.startswith("| - |")]
    assert [r.split("|")[2].strip() for r in rows] == ["256K", "1M"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert all(float(c) > 0 for c in cells[3:9])
    assert os.listdir(tmp_path) == []
