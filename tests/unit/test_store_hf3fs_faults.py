"""store/hf3fs on the strict USRBIO emulator (tests/doubles/usrbio_emulator.py, a test double of
3FS's ``hf3fs_fuse.io``; its rules and their sources are in its docstring): failures midway
through a batch, waits that time out, completions out of order, mount points that do not exist
yet or are reached through a symlink, writers of two hosts. Every read returns the right key's
bytes or a miss, never another key's, and nothing stays blocked.

Each of these failed on the store before issue 17's fixes (with the emulator made strict).
"""
from __future__ import annotations

import errno
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from store.config import Hf3fsConfig, StoreConfig
from store.hf3fs import Hf3fsStore
from tests.doubles import usrbio_emulator as emu

NS = "model-0123456789abcdef"


@pytest.fixture
def mount(tmp_path) -> Path:
    assert emu.STRICT, "these tests need the strict emulator (PDKV_USRBIO_LAX unset)"
    mp = Path(emu.emulate_mount(str(tmp_path / "3fs")))
    yield mp
    emu.forget_mounts()


def _open(mount: Path, writer: bool = True, timeout_s: float = 5.0, **kw) -> Hf3fsStore:
    h = Hf3fsConfig(mount_point=str(mount), iov_size_mb=100, io_threads=2, base_paths=kw.pop("base_paths", ["kv"]),
                    io_timeout_s=timeout_s)
    return Hf3fsStore(StoreConfig(backend="hf3fs", hf3fs=h, size_gb=0.01, **kw), io=emu, writer=writer)


def _key(i: int) -> str:
    return f"{NS}/0/{i:032x}"


def _data(i: int, n: int = 50_000) -> bytes:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes()


def _filled(mount: Path, n: int = 6, **kw) -> Hf3fsStore:
    s = _open(mount, **kw)
    for i in range(n):
        assert s.put(_key(i), _data(i))
    assert s.flush(10)
    return s


def _read(s: Hf3fsStore, ids: list[int]) -> list[bytes | None]:
    """Each value as read (None: a miss); a value that is not its key's fails the test."""
    bufs = [bytearray(60_000) for _ in ids]
    got = s.get_many([_key(i) for i in ids], bufs)
    out = []
    for i, n, b in zip(ids, got, bufs):
        if n:
            assert bytes(b[:n]) == _data(i), f"get of key {i} returned other bytes"
        out.append(bytes(b[:n]) if n else None)
    return out


def _nth(n: int, err: int, read: bool):
    """A PREPARE_FAULT: the n-th prepare (from 0) of that direction raises OSError(err)."""
    seen = [0]

    def fault(fd, off, length, is_read):
        if is_read != read:
            return None
        seen[0] += 1
        return err if seen[0] - 1 == n else None

    return fault


@pytest.mark.parametrize("pos", [0, 1, 3, 5])
def test_a_prepare_failing_midway_through_a_read_batch_never_serves_another_keys_bytes(mount, pos):
    s = _filled(mount)
    try:
        emu.PREPARE_FAULT = _nth(pos, errno.EAGAIN, read=True)
        got = _read(s, [0, 1, 2, 3, 4, 5])
        assert [g is not None for g in got] == [i < pos for i in range(6)]  # those prepared were read
        emu.PREPARE_FAULT = None
        # The next batches see none of the earlier batch's completions as theirs.
        assert all(g is not None for g in _read(s, [5, 0]))
        assert all(g is not None for g in _read(s, [0, 1, 2, 3, 4, 5]))
        assert s.stats["corrupt"] == 0 and _key(1) in s._index  # nothing judged corrupt and dropped
    finally:
        s.close()


@pytest.mark.parametrize("err", [errno.EBADF, errno.EACCES, errno.EINVAL])
def test_a_prepare_refused_midway_through_a_write_batch_drops_only_the_rest(mount, err):
    s = _open(mount)
    try:
        emu.PREPARE_FAULT = _nth(2, err, read=False)
        for i in range(5):
            assert s.put(_key(i), _data(i))
        assert s.flush(10)
        emu.PREPARE_FAULT = None
        got = _read(s, list(range(5)))
        assert got[0] is not None and got[1] is not None  # written before the refusal
        assert s.stats["write_errors"] >= 1
        for i in range(5, 8):  # the ring is used again afterwards
            assert s.put(_key(i), _data(i))
        assert s.flush(10)
        assert all(g is not None for g in _read(s, [5, 6, 7]))
    finally:
        s.close()


def test_a_read_that_hangs_times_out_and_its_late_completion_is_never_taken_for_another(mount):
    s = _filled(mount, timeout_s=0.3)
    try:
        fd_off = {}
        with s._lock:
            fd_off = s._where(s._index[_key(2)])
        emu.HANG = lambda fd, off, n, read: read and (fd, off) == fd_off
        t0 = time.monotonic()
        got = _read(s, [1, 2, 3])
        assert time.monotonic() - t0 < 3  # bounded by io_timeout_s, not stuck
        assert got[1] is None  # the hung one is a miss
        # While the hung read is out, the read area may still be written: every read misses
        # rather than wait or use it.
        assert _read(s, [4]) == [None]
        emu.HANG = None
        emu.release_hung()  # the daemon came back: its completion arrives late
        assert all(g is not None for g in _read(s, [0, 4, 5, 2]))
        assert s._usrbio.strays >= 1
    finally:
        s.close()


def test_a_write_that_hangs_is_dropped_and_the_area_is_not_reused_under_it(mount):
    s = _open(mount, timeout_s=0.3)
    try:
        emu.HANG = lambda fd, off, n, read: not read
        for i in range(3):
            assert s.put(_key(i), _data(i))
        s.flush(10)
        assert all(g is None for g in _read(s, [0, 1, 2]))
        emu.HANG = None
        emu.release_hung()
        for i in range(3, 6):
            assert s.put(_key(i), _data(i))
        assert s.flush(10)
        assert all(g is not None for g in _read(s, [3, 4, 5]))
        assert all(g is None for g in _read(s, [0, 1, 2]))  # dropped, never half-entered
    finally:
        s.close()


def test_many_threads_read_while_completions_come_out_of_order(mount):
    s = _filled(mount, n=12)
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(20):
                ids = [int(x) for x in rng.permutation(12)[:5]]
                assert all(g is not None for g in _read(s, ids))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    s.close()
    assert not errors, errors


def test_a_new_store_under_a_symlinked_mount_and_missing_directories_starts(mount, tmp_path):
    """The real extract_mount_point resolves with boost::filesystem::canonical: a path that does
    not exist yet raises, and a symlink resolves to the mount's real path."""
    with pytest.raises(RuntimeError, match="No such file"):
        emu.extract_mount_point(str(mount / "not" / "yet"))
    link = tmp_path / "link-to-3fs"
    link.symlink_to(mount)
    s = _open(link, base_paths=["deep/new/kv"])
    try:
        assert s.mount_point == os.path.realpath(mount)
        assert s.put(_key(1), _data(1)) and s.flush(10)
        assert _read(s, [1]) == [_data(1)]
    finally:
        s.close()
    reader = _open(mount, writer=False, base_paths=["other/kv"])  # a reader before any writer made it
    try:
        assert _read(reader, [1]) == [None]
    finally:
        reader.close()


def test_writers_of_two_hosts_never_share_a_directory(mount, monkeypatch):
    """3FS's FUSE has no lock operations: flock holds only within a host. Each host's writers
    claim <host>.w<k>, and a reader on a third host reads both."""
    monkeypatch.setattr(socket, "gethostname", lambda: "host-a")
    a = _open(mount)
    monkeypatch.setattr(socket, "gethostname", lambda: "host-b")
    b = _open(mount)
    try:
        assert Path(a.path).name == "host-a.w0" and Path(b.path).name == "host-b.w0"
        assert a.put(_key(1), _data(1)) and b.put(_key(2), _data(2))
        assert a.flush(10) and b.flush(10)
        monkeypatch.setattr(socket, "gethostname", lambda: "host-c")
        r = _open(mount, writer=False)
        try:
            assert _read(r, [1, 2]) == [_data(1), _data(2)]
        finally:
            r.close()
    finally:
        a.close()
        b.close()


def test_the_lax_emulator_hides_what_the_strict_one_shows(mount, monkeypatch):
    """The same failure on both behaviours: the strict emulator refuses a path that does not
    exist yet (as 3FS does); the lax one accepted it, which is how the defect went unseen."""
    monkeypatch.setattr(emu, "STRICT", False)
    assert emu.extract_mount_point(str(mount / "not" / "yet")) == str(mount)
    monkeypatch.setattr(emu, "STRICT", True)
    with pytest.raises(RuntimeError):
        emu.extract_mount_point(str(mount / "not" / "yet"))
