"""The shm transport with its chunks in GPU memory (``shm_memory: gpu``, transport/shm_gpu.py).

On a machine without CUDA: the clear refusals, and a reader without a GPU meeting a GPU arena
(a miss and one warning, never an error or foreign bytes). With CUDA (the GPU machine, see
docs/gpu-runs/): a producer process writes chunks into its GPU arena and this process reads
them through CUDA IPC, device to device, through the connector's ``ChunkCodec``; a slot the
producer reuses during a read is reported by ``release``.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os

import pytest
import torch

from common.config import ConfigError
from transport import make_transport, shm_gpu
from transport.base import TransportError
from transport.config import TransportConfig
from transport.shm import ShmTransport

SPAWN = mp.get_context("spawn")
CUDA = torch.cuda.is_available()
MB = 1 << 20


def _cfg(tmp_path, memory: str = "gpu", pool_mb: int = 16) -> TransportConfig:
    return TransportConfig(kind="shm", pool_size_mb=pool_mb, shm_dir=str(tmp_path), name="g", shm_memory=memory)


def test_gpu_memory_without_a_gpu_is_refused_clearly(tmp_path):
    with pytest.raises(TransportError, match="shm_memory: gpu .* needs a CUDA device; this instance runs on "
                                             "the CPU; allowed here: host"):
        make_transport(_cfg(tmp_path))
    with pytest.raises(TransportError, match="runs on cpu"):
        ShmTransport(_cfg(tmp_path), device=torch.device("cpu"))


def test_launch_refuses_gpu_memory_on_cpu_instances():
    from launch.procs import check_config  # (imports ZMQ: not on the GPU machine without the carry)
    from pd.config import DeploymentConfig

    dep = DeploymentConfig(model="/m")
    dep.connector.transport.shm_memory = "gpu"
    with pytest.raises(ConfigError, match="shm_memory: gpu .* vllm.device is cpu; allowed there: host"):
        check_config(dep)
    dep.vllm.device = "cuda"
    check_config(dep)


def test_unknown_memory_kind_is_refused():
    from common.config import load

    with pytest.raises(ConfigError, match="shm_memory"):
        load(TransportConfig, {"shm_memory": "vram"})


def test_reader_without_cuda_misses_a_gpu_arena_and_warns_once(tmp_path, caplog):
    """A producer's arena whose page 0 says its values are on a GPU (as shm_gpu.create writes
    it): a reader without CUDA gets misses for its keys, one warning, no exception."""
    prod = ShmTransport(_cfg(tmp_path, "host"))
    cons = ShmTransport(_cfg(tmp_path, "host"))
    try:
        assert prod.put(["pad", "a", "b"], [bytes(5000), b"x" * 100, b"y" * 100]) == [True] * 3
        arena = os.path.join(prod.path, prod._own.arena.name)
        with open(arena, "r+b") as f:  # the "pad" value's slot at offset 0 is overwritten: never read again
            f.write(shm_gpu.MAGIC + b"\0" * 8)
        with caplog.at_level(logging.WARNING, logger="transport.shm_maps"):
            assert cons.acquire(["a", "b"]) == [None, None]
            assert cons.get(["a"], [bytearray(100)]) == [0]
        warned = [r for r in caplog.records if "GPU memory" in r.getMessage()]
        assert len(warned) == 1 and "read as misses" in warned[0].getMessage()
    finally:
        cons.close()
        prod.close()


# -- with CUDA (the GPU machine) ---------------------------------------------------------------

def _producer(cfg: TransportConfig, q_out, q_in) -> None:
    """Another process: a GPU arena with one value per key (byte i of key k = (k*7 + i) % 251)."""
    t = ShmTransport(cfg, pin_cuda=True, device=torch.device("cuda", 0))
    keys = [f"k{i}" for i in range(4)]
    slots = t.reserve(keys, [3 * MB] * 4)
    for i, s in enumerate(slots):
        s.view.copy_((torch.arange(s.size, device="cuda:0") + i * 7).remainder(251).to(torch.uint8))
    torch.cuda.synchronize()
    assert t.commit(slots) == [True] * 4
    q_out.put(t._own.arena.name)
    q_in.get(timeout=60)  # the reader holds k0: evict it under the read
    t.delete(["k0"])
    assert t.put(["k9"], [bytearray(b"z" * (3 * MB))]) == [True] * 1  # reuses k0's slot
    q_out.put("evicted")
    q_in.get(timeout=60)
    t.close()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the GPU machine: docs/gpu-runs/)")
def test_gpu_arena_read_through_cuda_ipc_in_another_process(tmp_path):
    cfg = _cfg(tmp_path, "gpu", pool_mb=16)
    q_out, q_in = SPAWN.Queue(), SPAWN.Queue()
    p = SPAWN.Process(target=_producer, args=(cfg, q_out, q_in))
    p.start()
    cons = ShmTransport(cfg, pin_cuda=True, device=torch.device("cuda", 0))
    try:
        name = q_out.get(timeout=60)
        reads = cons.acquire(["k0", "k1", "k2", "k3"])
        assert all(r is not None and r.view.is_cuda and r.size == 3 * MB for r in reads)
        for i, r in enumerate(reads[1:], 1):
            want = (torch.arange(r.size, device="cuda:0") + i * 7).remainder(251).to(torch.uint8)
            assert torch.equal(r.view, want)
        host = bytearray(3 * MB)
        assert cons.get(["k2"], [host]) == [3 * MB]
        assert host[:3] == bytes([14, 15, 16])
        assert cons.release(reads[1:]) == [True] * 3
        q_in.put("go")
        assert q_out.get(timeout=60) == "evicted"
        assert cons.release([reads[0]]) == [False]  # reused under the read: never reported intact
        assert cons.acquire(["k0"]) == [None]
        assert name in cons._maps.maps
    finally:
        q_in.put("done")
        p.join(60)
        cons.close()
    assert p.exitcode == 0


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the GPU machine: docs/gpu-runs/)")
def test_codec_moves_a_chunk_through_a_gpu_arena(tmp_path):
    """The connector's ChunkCodec: gather into a GPU slot, header, verify, scatter; a wrong key
    or layout is refused from the device header."""
    from pd.connector.chunk import Chunking, ChunkError
    from pd.connector.codec import ChunkCodec
    from pd.connector.keys import chunk_key, layout_fingerprint
    from pd.connector.kv_layout import KVLayout

    caches = {f"l.{i}": torch.randn(32, 2, 16, 64, device="cuda:0", dtype=torch.bfloat16) for i in range(2)}
    dst = {n: torch.zeros_like(t) for n, t in caches.items()}
    fp = layout_fingerprint(test="gpu")
    src_c, dst_c = (ChunkCodec(KVLayout(c, 16), Chunking(64, 16), "ns", fp, checksum, (0,), 1)
                    for c, checksum in ((caches, False), (dst, True)))
    t = ShmTransport(_cfg(tmp_path), device=torch.device("cuda", 0))
    try:
        blocks = torch.tensor([3, 9, 1, 30])
        size = src_c.chunk_bytes(4)
        key, other = chunk_key("ns", 0, b"a" * 16), chunk_key("ns", 0, b"b" * 16)
        (slot,) = t.reserve([key], [size])
        src_c.gather_into(slot.view, blocks, key, 64, 4, 0)
        assert t.commit([slot]) == [True]
        (r,) = t.acquire([key])
        dst_c.verify(r.view, key, size, 4)
        with pytest.raises(ChunkError, match="key hash"):
            dst_c.verify(r.view, other, size, 4)
        dst_c.scatter_from(r.view, torch.tensor([0, 1, 2, 4]), 4, 0, 0)
        assert t.release([r]) == [True]
        for n in caches:
            assert torch.equal(dst[n][[0, 1, 2, 4]], caches[n][blocks])
    finally:
        t.close()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the GPU machine: docs/gpu-runs/)")
def test_codec_keys_gpu_chunks_with_the_deployment_secret(tmp_path):
    """connector.chunk_secret_file on the GPU path: the header's keyed checksum is made from the
    device payload; a reader with the secret accepts the chunk, one with another or none refuses it."""
    from pd.connector.chunk import FLAG_KEYED, Chunking, ChunkError, read_header, secret_key
    from pd.connector.codec import ChunkCodec
    from pd.connector.keys import chunk_key, layout_fingerprint
    from pd.connector.kv_layout import KVLayout

    caches = {f"l.{i}": torch.randn(32, 2, 16, 64, device="cuda:0", dtype=torch.bfloat16) for i in range(2)}
    fp = layout_fingerprint(test="gpu")
    ours, theirs = secret_key(b"o" * 32), secret_key(b"t" * 32)
    src_c, ok_c, other_c, none_c = (ChunkCodec(KVLayout(caches, 16), Chunking(64, 16), "ns", fp, False, (0,), 1, s)
                                    for s in (ours, ours, theirs, None))
    t = ShmTransport(_cfg(tmp_path), device=torch.device("cuda", 0))
    try:
        size = src_c.chunk_bytes(4)
        key = chunk_key("ns", 0, b"a" * 16)
        (slot,) = t.reserve([key], [size])
        src_c.gather_into(slot.view, torch.tensor([3, 9, 1, 30]), key, 64, 4, 0)
        assert t.commit([slot]) == [True]
        (r,) = t.acquire([key])
        assert read_header(r.view[:128].cpu().numpy().tobytes())[3] & FLAG_KEYED
        ok_c.verify(r.view, key, size, 4)
        for c, why in ((other_c, "another secret"), (none_c, "secret this reader lacks")):
            with pytest.raises(ChunkError, match=why):
                c.verify(r.view, key, size, 4)
        assert t.release([r]) == [True]
    finally:
        t.close()


def _producer_to_kill(cfg: TransportConfig, q_out) -> None:
    t = ShmTransport(cfg, device=torch.device("cuda", 0))
    assert t.put(["k"], [bytearray(b"v" * MB)]) == [True]
    q_out.put("ready")
    import time

    time.sleep(600)  # SIGKILLed by the test


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the GPU machine: docs/gpu-runs/)")
def test_a_dead_producers_gpu_arena_is_never_read(tmp_path, capsys):
    """Its memory goes with its process: once the pid is gone its keys miss (store, then
    recompute); while the killed process still exists (CUDA may hold it while this reader maps
    its memory), a read gives the right bytes or a miss. Nothing faults."""
    import signal
    import time

    from transport.shm_index import pid_alive

    cfg = _cfg(tmp_path, "gpu", pool_mb=8)
    q_out = SPAWN.Queue()
    p = SPAWN.Process(target=_producer_to_kill, args=(cfg, q_out))
    p.start()
    cons = ShmTransport(cfg, device=torch.device("cuda", 0))
    try:
        assert q_out.get(timeout=60) == "ready"
        host = bytearray(MB)
        assert cons.get(["k"], [host]) == [MB] and host[:1] == b"v"
        os.kill(p.pid, signal.SIGKILL)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            host[:] = bytes(MB)
            n = cons.get(["k"], [host])[0]
            assert n == 0 or (n == MB and host[:1] == b"v" and host[-1:] == b"v")
            p.join(0.2)
            if not pid_alive(p.pid):
                break
        with capsys.disabled():
            print(f"\n# killed GPU producer: pid gone after SIGKILL: {not pid_alive(p.pid)}")
        if not pid_alive(p.pid):
            assert cons.acquire(["k"]) == [None]
            assert cons.get(["k"], [host]) == [0]
        torch.cuda.synchronize()  # this process's CUDA context is still sound
    finally:
        cons.close()
