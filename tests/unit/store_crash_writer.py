"""Helper of test_store_local's crash test: writes chunks to a LocalStore until it is killed.

Usage: python store_crash_writer.py DIR [O_DIRECT(0/1)]

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


def main() -> None:
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    sys.path.insert(0, root)
    from pd.config import StoreConfig
    from store.local import LocalStore

    path = sys.argv[1]
    o_direct = len(sys.argv) > 2 and sys.argv[2] == "1"
    # A budget of ~40 chunks: eviction runs while the writer is killed, too.
    cfg = StoreConfig(backend="local", paths=[path], size_gb=0.025, queue_mb=8,
                      write_threads=2, o_direct=o_direct)
    store = LocalStore(cfg)
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
