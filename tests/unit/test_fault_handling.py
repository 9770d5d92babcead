"""Fault handling found by the fault matrix (tests/integration/test_faults.py), on single real
components: a READY the coordinator never saw, the arena of a SIGKILLed producer, and the counters
that make such events visible."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import SimpleNamespace

from pd.connector.keys import transfer_key
from pd.connector.scheduler import LoadSpec, PDMetadata
from pd.coordinator.client import CoordinatorClient, InstanceAgent
from tests.unit.test_connector_worker import DST, PROMPT, _save, _until, _worker, coord  # noqa: F401 - fixture
from transport import shm_index
from transport.shm import ShmTransport


def test_chunks_whose_ready_was_lost_are_deleted_by_the_consumer(tmp_path, coord):
    """The coordinator was down (or restarted) when prefill sent READY: decode times out, recomputes,
    and deletes the chunks itself; the coordinator cannot free what it never heard of."""
    down = SimpleNamespace(address="tcp://127.0.0.1:9")  # nothing listens: READY is lost
    p = _worker(tmp_path, down, 1)
    d = _worker(tmp_path, coord, 2, wait_timeout_s=0.5)
    try:
        keys = [transfer_key("lost", k) for k in p.codec.keys(PROMPT)]
        p.after_forward(_save("lost", 0, 5, True))
        assert _until(lambda: all(p.transport.exists(keys)))
        d.start_step(PDMetadata(loads=[LoadSpec("d1", "lost", PROMPT, DST, 0)]))
        assert _until(lambda: "d1" in d.loads._done_recving)
        assert d.take_load_errors() == set(DST)  # recomputed
        assert not any(p.transport.exists(keys)), "chunks nobody will read stayed in the transport"
    finally:
        for w in (p, d):
            w.shutdown()
            w.transport.close()


def test_a_restarted_producer_removes_the_arena_and_links_of_a_killed_one(tmp_path):
    cfg = SimpleNamespace(pool_size_mb=4, shm_dir=str(tmp_path), name="reap")
    code = ("import sys, os; from types import SimpleNamespace as N; from transport.shm import ShmTransport;"
            f"t = ShmTransport(N(pool_size_mb=4, shm_dir={str(tmp_path)!r}, name='reap'));"
            "assert all(t.put(['a/0/1', 'a/0/2'], [b'x' * 100, b'y' * 100]));"
            "print('put', flush=True); os.kill(os.getpid(), 9)")
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert killed.returncode == -signal.SIGKILL and "put" in killed.stdout, killed.stderr
    pool = tmp_path / "pdkv-reap"
    assert sum(n.startswith(shm_index.ARENA_PREFIX) for n in os.listdir(pool)) == 1
    t = ShmTransport(cfg)
    try:
        assert t.get(["a/0/1"], [bytearray(100)]) == [100]  # a killed producer's values stay readable
        alive = ShmTransport(cfg)  # another live producer: its arena is left alone
        assert all(alive.put(["b/0/1"], [b"z" * 10]))  # its first write creates its arena: reaps the dead one
        assert all(t.put(["c/0/1"], [b"w" * 10]))
        names = os.listdir(pool)
        assert sum(n.startswith(shm_index.ARENA_PREFIX) for n in names) == 2, names
        assert t.exists(["a/0/1", "a/0/2", "b/0/1", "c/0/1"]) == [False, False, True, True]
        assert (alive.stats["reaped_arenas"], alive.stats["reaped_links"]) == (1, 2)
        assert (t.stats["reaped_arenas"], t.stats["reaped_links"]) == (0, 0)
        alive.close()
    finally:
        t.close()


def test_instance_counters_reach_the_coordinator_with_heartbeats(coord):
    """Faults only an instance sees (a full disk, an undelivered READY) are counted at the coordinator,
    summed per role, and stay counted after the instance is gone."""
    counts = {"store_write_errors": 3, "ready_undelivered": 1}
    agents = [InstanceAgent(coord.address, f"p{i}", "prefill", interval_s=0.05, stats=lambda: counts).start()
              for i in range(2)]
    broken = InstanceAgent(coord.address, "d0", "decode", interval_s=0.05, stats=lambda: 1 / 0).start()
    client = CoordinatorClient(coord.address)
    try:
        assert _until(lambda: client.query().counters.get("prefill.store_write_errors") == 6)
        c = client.query().counters
        assert c["prefill.ready_undelivered"] == 2
        assert not any(k.startswith("decode.") for k in c)  # a failing source sends none, beats go on
        assert _until(lambda: {i.instance_id for i in client.query().instances if i.alive} == {"p0", "p1", "d0"})
        agents[0].stop()
        assert client.query().counters["prefill.store_write_errors"] == 6
    finally:
        for a in (*agents, broken):
            a.stop()
        client.close()

