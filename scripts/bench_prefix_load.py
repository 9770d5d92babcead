"""A prefix load from the local store into CPU KV caches, pipelined vs batch after batch.

    .venv/bin/python scripts/bench_prefix_load.py [--tokens 8192] [--loads 20] [--rounds 2]

A writer worker saves one prompt's KV (Llama-3-8B's shape: 32 layers, 8 KV heads, head 128,
16-bit: 128 KiB a token, 1 GiB at 8192 tokens) to a local store in a temporary directory under
.bench-tmp; a reader worker then loads it as prefix reuse ``--loads`` times with
``pd.connector.load.PIPELINED_STORE_LOADS`` on (a helper thread reads the next batch while the
last is scattered) and off (read a batch, then scatter it), alternating for ``--rounds``. Reads
come from the page cache (the files were just written), as a warm prefix right after its first
request does. Prints p50, min and max per mode and round, and the pipelined/sequential ratio.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

import pd.connector.load as load_mod
from pd.config import ConnectorConfig, CoordinatorConfig
from pd.connector.scheduler import LoadSpec, PDMetadata, SaveSpec
from pd.connector.worker import WorkerConfig, WorkerSide
from pd.coordinator.client import CoordinatorClient
from pd.coordinator.server import Coordinator
from store import make_store
from store.config import StoreConfig
from transport.config import TransportConfig
from transport.shm import ShmTransport

BLOCK, CHUNK, LAYERS, HEADS, HEAD = 16, 256, 32, 8, 128
SEED = b"S" * 16


def _worker(coord, tmp: str, seed: int, writer: bool, n_blocks: int) -> WorkerSide:
    cfg = ConnectorConfig(coordinator=coord.address, chunk_size=CHUNK, io_threads=2,
                          transport=TransportConfig(pool_size_mb=64, shm_dir=tmp, name=f"b{os.getpid()}"))
    cfg.store = StoreConfig(backend="local", paths=[os.path.join(tmp, "store")], size_gb=4, read_threads=4,
                            queue_mb=2048)
    os.makedirs(cfg.store.paths[0], exist_ok=True)
    w = WorkerSide(WorkerConfig(cfg, 0, "m", BLOCK, instance_id=f"bench-{seed}"), CoordinatorClient(coord.address),
                   ShmTransport(cfg.transport), {0: make_store(cfg.store, 0, writer=writer)})
    g = torch.Generator().manual_seed(seed)
    w.caches = {f"layers.{i}.attn": torch.randn(n_blocks, 2, BLOCK, HEADS, HEAD, generator=g).half()
                for i in range(LAYERS)}
    w.register_kv_caches(w.caches)
    return w


def _load_ms(d: WorkerSide, rid: str, prompt: list[int], blocks: list[int]) -> float:
    t = time.perf_counter()
    d.start_step(PDMetadata(loads=[LoadSpec(rid, "", prompt, blocks, 0, SEED)]))
    end = time.monotonic() + 300
    while rid not in d.loads._done_recving:
        if time.monotonic() > end:
            raise SystemExit(f"load {rid} did not finish in 300 s")
        time.sleep(0.0005)
    ms = (time.perf_counter() - t) * 1e3
    if d.take_load_errors():
        raise SystemExit(f"load {rid} failed: see the log")
    return ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--loads", type=int, default=20, help="timed loads per mode and round (default 20)")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    if a.tokens < CHUNK or a.loads < 1 or a.rounds < 1:
        ap.error(f"--tokens must be at least {CHUNK}, --loads and --rounds at least 1")
    os.makedirs(".bench-tmp", exist_ok=True)
    tmp = tempfile.mkdtemp(dir=".bench-tmp")
    coord = Coordinator(CoordinatorConfig(port=0)).start_in_thread()
    n_blocks = a.tokens // BLOCK + 8
    prompt, blocks = list(range(1000, 1000 + a.tokens)), list(range(a.tokens // BLOCK))
    p = _worker(coord, tmp, 1, True, n_blocks)
    d = _worker(coord, tmp, 2, False, n_blocks)
    try:
        p.after_forward(PDMetadata(saves=[SaveSpec("p1", "x", prompt, blocks, 0, -1, True, SEED)]))
        while not p._save_jobs["p1"].done():
            time.sleep(0.05)
        p.store.flush(120)
        print(f"# {a.tokens} tokens, {a.tokens * LAYERS * 2 * HEADS * HEAD * 2 / 2**30:.2f} GiB, "
              f"{a.tokens // CHUNK} chunks; {os.cpu_count()} CPUs; p50 of {a.loads} loads (ms)")
        p50 = {True: [], False: []}
        for r in range(a.rounds):
            for on in (True, False):
                load_mod.PIPELINED_STORE_LOADS = on
                _load_ms(d, f"warm{r}{on}", prompt, blocks)  # untimed
                ts = [_load_ms(d, f"r{r}-{on}-{i}", prompt, blocks) for i in range(a.loads)]
                p50[on].append(statistics.median(ts))
                print(f"| round {r} | {'pipelined' if on else 'sequential'} | p50 {p50[on][-1]:.1f} | "
                      f"min {min(ts):.1f} | max {max(ts):.1f} |", flush=True)
        print(f"# pipelined / sequential (p50 over rounds): {statistics.median(p50[True]) / statistics.median(p50[False]):.2f}")
    finally:
        load_mod.PIPELINED_STORE_LOADS = True
        for w in (d, p):
            w.shutdown()
            w.transport.close()
            w.store.close()
        coord.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
