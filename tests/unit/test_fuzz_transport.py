"""The shm transport's index links and slot headers, fuzzed (hypothesis): a link pointing anywhere
(any arena name, offset, length, sequence, or text), and every byte of the value's 64-byte slot
header flipped. A reader in another ``ShmTransport`` (as a decode instance is) gets a miss or
exactly the bytes that were put, through ``get`` and through ``acquire``/``release``; it never
reads outside the arena and never raises."""
from __future__ import annotations

import os

import numpy as np
import pytest
from fuzzing import fuzz_settings, tried
from hypothesis import example, given
from hypothesis import strategies as st

from transport import arena as arena_mod
from transport import shm_index
from transport.config import TransportConfig
from transport.shm import ShmTransport

pytestmark = pytest.mark.timeout(600)

KEY, OTHER = "xfer/0123/model-ns/0/00ff", "xfer/4567/model-ns/0/00ff"
VALUE = np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8)
OTHER_VALUE = np.random.default_rng(4).integers(0, 256, 5000, dtype=np.uint8)  # same length, another request


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    cfg = TransportConfig(kind="shm", pool_size_mb=4, shm_dir=str(tmp_path_factory.mktemp("shm")), name="fuzz")
    producer, reader = ShmTransport(cfg), ShmTransport(cfg)
    assert producer.put([KEY, OTHER], [VALUE, OTHER_VALUE]) == [True, True]
    link = os.path.join(producer.path, shm_index.key_to_name(KEY))
    target = os.readlink(link)
    name, off, length, seq = shm_index.parse_target(target)
    other = os.readlink(os.path.join(producer.path, shm_index.key_to_name(OTHER)))
    yield producer, reader, link, target, os.path.join(producer.path, name), off, other
    reader.close()
    producer.close()


def read_back(reader: ShmTransport) -> None:
    """A miss, or exactly VALUE, through both read paths."""
    out = np.zeros(len(VALUE) + 4096, dtype=np.uint8)
    (n,) = reader.get([KEY], [out])
    assert n == 0 or (n == len(VALUE) and np.array_equal(out[:n], VALUE)), "another value was read"
    (slot,) = reader.acquire([KEY])
    if slot is not None:
        assert slot.size == len(VALUE) and bytes(slot.view) == VALUE.tobytes(), "another value was acquired"
    reader.release([slot])


def _relink(link: str, target: str) -> None:
    tmp = link + ".fuzz"
    os.symlink(target, tmp)
    os.replace(tmp, link)


@fuzz_settings(200)
@given(name=st.sampled_from(["ARENA", ".arena-1-0000abcd", "../x", ""]) | st.text(max_size=20),
       off=st.integers(-(2**64), 2**64) | st.sampled_from([0, 4096, 8192, 4 << 20, (4 << 20) - 64, "OTHER"]),
       length=st.integers(-(2**64), 2**64) | st.sampled_from([0, 1, 4999, 5000, 5001, 4 << 20]),
       seq=st.integers(-(2**64), 2**64) | st.sampled_from([0, 1, 2, "OTHER"]),
       raw=st.none() | st.text(min_size=1, max_size=60))
@example(name="ARENA", off="OTHER", length=5000, seq="OTHER", raw=None)  # another request's committed slot
@example(name="ARENA", off=(4 << 20) - 64, length=5000, seq=1, raw=None)  # a slot running past the arena
@example(name="ARENA", off=4 << 20, length=-64, seq=0, raw=None)  # found by the 10x pass: struct.error
def test_a_link_pointing_anywhere_is_a_miss_or_the_value(pool, name, off, length, seq, raw):
    producer, reader, link, target, arena, _, other = pool
    _, other_off, _, other_seq = shm_index.parse_target(other)
    off = other_off if off == "OTHER" else off
    seq = other_seq if seq == "OTHER" else seq
    if name == "ARENA":
        name = os.path.basename(arena)
    try:
        _relink(link, raw if raw is not None and "\0" not in raw else f"{name}:{off}:{length}:{seq}")
    except (OSError, ValueError):  # a target the filesystem refuses
        return
    tried("transport-shm")
    try:
        read_back(reader)
    finally:
        _relink(link, target)


@fuzz_settings(150)
@given(i=st.integers(0, arena_mod.HEADER - 1), mask=st.integers(1, 255))
def test_every_slot_header_byte_flipped_is_a_miss_or_the_value(pool, i, mask):
    producer, reader, link, target, arena, off, _ = pool
    fd = os.open(arena, os.O_RDWR)
    try:
        old = os.pread(fd, 1, off + i)
        os.pwrite(fd, bytes([old[0] ^ mask]), off + i)
        tried("transport-shm")
        try:
            read_back(reader)
        finally:
            os.pwrite(fd, old, off + i)
    finally:
        os.close(fd)
    read_back(reader)
    out = np.zeros(len(VALUE), dtype=np.uint8)
    assert reader.get([KEY], [out]) == [len(VALUE)], "the restored slot is no longer found"
