"""Helper of the crash tests: writes chunks to a store until it is killed.

Usage: python store_crash_writer.py DIR [O_DIRECT(0/1)] [BACKEND(local|hf3fs|local-dram)]

``local-dram`` is store/local with the DRAM tier in front (a kill can land inside a DRAM copy).

For backend hf3fs, DIR is a mount made by ``tests.doubles.usrbio_emulator.emulate_mount`` and the store
is built by ``store.make_store`` with ``tests/doubles`` on the path (``hf3fs_fuse.io`` is the
emulator there), the way an instance builds it.

Each key's content is derived from the key alone (``content``), so after the kill the test can
check every chunk the store finds against what this process would have written. Prints
``progress N`` (N = puts accepted so far) every few puts, flushed, so the test knows when to
kill.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time

NAMESPACE = "crash-ns"


def key_of(i: int) -> str:
    return f"{NAMESPACE}/0/{i:032x}"


def content(key: str) -> bytes:
    """Deterministic bytes of ``key``: 64 KiB .. ~1 MiB, not a multiple of 4096."""
    h = hashlib.blake2b(key.encode(), digest_size=8).digest()
    size = 65536 + int.from_bytes(h, "little") % (1 << 20) + 1
    return hashlib.shake_128(key.encode()).digest(size)


def crash_config(path: str, backend: str, o_direct: bool = False):
    """The store config of this writer (also what the test reopens the store with)."""
    from store.config import Hf3fsConfig, StoreConfig

    # A budget of ~40 chunks: eviction runs while the writer is killed, too.
    if backend == "hf3fs":
        return StoreConfig(backend="hf3fs", paths=["kv"], size_gb=0.025, queue_mb=8,
                           hf3fs=Hf3fsConfig(mount_point=path, iov_size_mb=100, io_threads=2))
    # local-dram: a DRAM tier of ~10 chunks, so it evicts while the writer is killed, too.
    return StoreConfig(backend="local", paths=[path], size_gb=0.025, queue_mb=8, write_threads=2,
                       o_direct=o_direct, dram_gb=0.008 if backend == "local-dram" else 0.0)


def run_until_killed(argv: list[str], n: int, on_progress=None, timeout_s: float = 30.0, until=None) -> int:
    """Run this script with ``argv`` until it has accepted ``n`` puts and ``until()`` (if given) is
    true, or ``timeout_s`` has passed; then SIGKILL it. Returns the progress reached; each step also
    goes to ``on_progress``."""
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], stdout=subprocess.PIPE,
                            text=True)
    progress = 0
    try:
        deadline = time.monotonic() + timeout_s
        while (progress < n or (until is not None and not until())) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("progress"):
                progress = int(line.split()[1])
                if on_progress is not None:
                    on_progress(progress)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    return progress


def main() -> None:
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    sys.path[:0] = [root, os.path.join(root, "tests", "doubles")]
    from store import make_store

    path = sys.argv[1]
    o_direct = len(sys.argv) > 2 and sys.argv[2] == "1"
    backend = sys.argv[3] if len(sys.argv) > 3 else "local"
    store = make_store(crash_config(path, backend, o_direct))
    print("ready", flush=True)
    accepted = 0
    for i in range(1_000_000):
        data = content(key_of(i))
        while not store.put(key_of(i), data):
            time.sleep(0.001)
        accepted += 1
        if accepted % 5 == 0:
            print(f"progress {accepted}", flush=True)


if __name__ == "__main__":
    main()
