"""Damaged chunks and store files, fuzzed (hypothesis): every byte flipped, truncated, extended,
lengths rewritten, random bytes. A reader either refuses them (``ChunkError``; a store miss, the
file deleted) or returns exactly the bytes that were written: damaged KV is never accepted and
nothing but the documented error is raised. The stores are real (files on this disk; the 3FS
store over its USRBIO emulator, tests/doubles), reopened after each damage as a restarted or
second process would find them."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from fuzzing import fuzz_settings, tried
from hypothesis import example, given
from hypothesis import strategies as st

from pd.connector import chunk as chunkfmt
from store.config import Hf3fsConfig, StoreConfig
from store.hf3fs import Hf3fsStore
from store.local import LocalStore
from store.local_format import key_to_relpath
from tests.doubles import usrbio_emulator as emu

pytestmark = pytest.mark.timeout(600)

FP, KH = b"F" * 16, b"K" * 16
NS = "model-0123456789abcdef"


def make_chunk(payload: bytes, n_tokens: int = 64, n_blocks: int = 2, with_checksum: bool = True) -> bytearray:
    buf = bytearray(chunkfmt.HEADER_SIZE + len(payload))
    buf[chunkfmt.HEADER_SIZE:] = payload
    chunkfmt.write_header(memoryview(buf), FP, KH, n_tokens, n_blocks, len(payload), with_checksum)
    return buf


def accepted_intact(buf, payload: bytes) -> None:
    """``buf`` is refused, or what a loader takes from it (checking what it knows: payload length
    and block count, as pd/connector/load.py does) is what was written."""
    try:
        _, blocks, got = chunkfmt.verify(memoryview(buf), FP, KH, len(payload), 2)
    except chunkfmt.ChunkError as e:
        assert str(e)
        return
    assert blocks == 2 and bytes(got) == payload, "a damaged chunk was accepted with other KV"


# ---- pd/connector/chunk.py -------------------------------------------------------------------------

@fuzz_settings(400)
@given(payload=st.binary(min_size=1, max_size=512), data=st.data())
def test_every_byte_flipped_in_a_chunk_is_refused_or_harmless(payload, data):
    buf = make_chunk(payload)
    i = data.draw(st.integers(0, len(buf) - 1), label="byte")
    buf[i] ^= data.draw(st.integers(1, 255), label="mask")
    tried("chunk")
    accepted_intact(buf, payload)


@fuzz_settings(200)
@given(payload=st.binary(min_size=1, max_size=512), cut=st.integers(0, 10_000), extra=st.binary(max_size=64))
def test_truncated_or_extended_chunks_are_refused(payload, cut, extra):
    buf = make_chunk(payload)
    short = buf[: cut % len(buf)]
    tried("chunk", 2)
    with pytest.raises(chunkfmt.ChunkError):
        chunkfmt.verify(memoryview(short), FP, KH, len(payload))
    accepted_intact(buf + extra, payload)  # trailing bytes are not payload


@fuzz_settings(200)
@given(payload=st.binary(min_size=1, max_size=256),
       field=st.sampled_from(["n_blocks", "payload_len", "header_size", "version", "flags"]),
       value=st.integers(0, 2**32 - 1))
@example(payload=b"x" * 8, field="payload_len", value=4)
@example(payload=b"x" * 8, field="flags", value=0)
def test_header_lengths_and_fields_rewritten(payload, field, value):
    """Any value in a header field: refused, or (payload intact) the same payload and blocks."""
    buf = make_chunk(payload)
    offsets = {"version": (8, "<H"), "header_size": (10, "<H"), "flags": (12, "<I"), "n_blocks": (52, "<I"),
               "payload_len": (56, "<Q")}
    off, fmt = offsets[field]
    struct.pack_into(fmt, buf, off, value % (1 << (8 * struct.calcsize(fmt))))
    tried("chunk")
    accepted_intact(buf, payload)


@fuzz_settings(200)
@given(raw=st.binary(max_size=400))
@example(raw=chunkfmt.MAGIC)
def test_random_bytes_are_never_a_chunk(raw):
    tried("chunk")
    with pytest.raises(chunkfmt.ChunkError):
        chunkfmt.verify(memoryview(raw), FP, KH, None)


# ---- store/local.py ----------------------------------------------------------------------

def _key(i: int) -> str:
    return f"{NS}/0/{i:032x}"


def _value(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def local_originals(tmp_path_factory):
    """One stored file per layout (buffered; O_DIRECT's padded and aligned one): its bytes."""
    out = {}
    for direct in (False, True):
        d = tmp_path_factory.mktemp(f"local-{int(direct)}")
        cfg = StoreConfig(backend="local", paths=[str(d)], size_gb=0.01, o_direct=direct)
        with LocalStore(cfg) as s:
            value = _value(5000, 7)
            assert s.put(_key(1), value) and s.flush(10)
            path = os.path.join(s.path, key_to_relpath(_key(1)))
            out[direct] = (cfg, path, open(path, "rb").read(), value)
    return out


def _local_read(cfg: StoreConfig, path: str, raw: bytes, value: bytes) -> tuple[int, bytes, LocalStore]:
    with open(path, "wb") as fh:
        fh.write(raw)
    s = LocalStore(cfg, writer=False)  # a restarted reader: the scan at start reads the damaged file too
    out = np.zeros(len(value) + 8192, dtype=np.uint8)
    n = s.get(_key(1), out)
    return n, out[:n].tobytes(), s


def _check_local(s: LocalStore, n: int, got: bytes, value: bytes, path: str) -> None:
    try:
        if n:
            assert n == len(value) and got == value, "the local store returned damaged bytes"
        else:
            assert not os.path.exists(path), "a refused file was kept (a later reader would try it again)"
    finally:
        s.close()


@fuzz_settings(150)
@given(direct=st.booleans(), data=st.data())
def test_local_store_file_with_a_byte_flipped(local_originals, direct, data):
    cfg, path, raw, value = local_originals[direct]
    i = data.draw(st.integers(0, len(raw) - 1), label="byte")
    mask = data.draw(st.integers(1, 255), label="mask")
    damaged = bytearray(raw)
    damaged[i] ^= mask
    tried("store-local")
    n, got, s = _local_read(cfg, path, bytes(damaged), value)
    _check_local(s, n, got, value, path)


@fuzz_settings(100)
@given(direct=st.booleans(), cut=st.integers(0, 1 << 20), extra=st.binary(max_size=100),
       length=st.integers(0, 2**64 - 1), where=st.sampled_from(["truncate", "extend", "payload_len", "key_len"]))
@example(direct=False, cut=0, extra=b"", length=0, where="payload_len")
@example(direct=False, cut=0, extra=b"", length=2**64 - 1, where="payload_len")
@example(direct=True, cut=0, extra=b"", length=0xFFFF, where="key_len")
def test_local_store_file_truncated_extended_or_lengths_rewritten(local_originals, direct, cut, extra, length, where):
    cfg, path, raw, value = local_originals[direct]
    if where == "truncate":
        damaged = raw[: cut % len(raw)]
    elif where == "extend":
        damaged = raw + (extra or b"\0")
    else:
        damaged = bytearray(raw)
        if where == "payload_len":
            struct.pack_into("<Q", damaged, 16, length)
        else:
            struct.pack_into("<H", damaged, 10, length & 0xFFFF)
        damaged = bytes(damaged)
    tried("store-local")
    n, got, s = _local_read(cfg, path, damaged, value)
    _check_local(s, n, got, value, path)


# ---- store/hf3fs.py (over the USRBIO emulator) -------------------------------------------

@pytest.fixture(scope="module")
def hf3fs_originals(tmp_path_factory):
    mount = tmp_path_factory.mktemp("3fs")
    emu.emulate_mount(str(mount))
    cfg = StoreConfig(backend="hf3fs", size_gb=0.01,
                      hf3fs=Hf3fsConfig(mount_point=str(mount), iov_size_mb=100, io_threads=2, base_paths=["kv"]))
    values = {i: _value(3000 + 1000 * i, i) for i in range(3)}
    with Hf3fsStore(cfg, io=emu) as s:
        for i, v in values.items():
            assert s.put(_key(i), v)
        assert s.flush(10)
    wdir = next(p for p in mount.rglob("*.w0") if p.is_dir())  # <host>.w0 (store/hf3fs.py)
    files = {p.name: p.read_bytes() for p in wdir.iterdir() if p.name.startswith(("data-", "index.log"))}
    yield cfg, wdir, files, values
    emu.forget_mounts()


def _hf3fs_read(cfg, wdir, files: dict[str, bytes], values: dict[int, bytes]) -> None:
    for name, raw in files.items():
        (wdir / name).write_bytes(raw)
    with Hf3fsStore(cfg, io=emu) as s:  # a restarted writer replays the (damaged) index log
        outs = [np.zeros(len(v) + 4096, dtype=np.uint8) for v in values.values()]
        got = s.get_many([_key(i) for i in values], outs)
    for (i, v), n, out in zip(values.items(), got, outs):
        assert n == 0 or (n == len(v) and out[:n].tobytes() == v), f"hf3fs returned damaged bytes for key {i}"


@fuzz_settings(60)
@given(data=st.data())
def test_hf3fs_data_or_index_log_with_a_byte_flipped(hf3fs_originals, data):
    cfg, wdir, files, values = hf3fs_originals
    name = data.draw(st.sampled_from(sorted(files)), label="file")
    raw = bytearray(files[name])
    used = len(raw.rstrip(b"\0")) or 1  # data files are mostly empty slabs: flip where values are
    i = data.draw(st.integers(0, used - 1), label="byte")
    raw[i] ^= data.draw(st.integers(1, 255), label="mask")
    tried("store-hf3fs")
    _hf3fs_read(cfg, wdir, {**files, name: bytes(raw)}, values)


@fuzz_settings(30)
@given(cut=st.integers(0, 1 << 16), junk=st.binary(max_size=200))
def test_hf3fs_index_log_truncated_or_with_junk_appended(hf3fs_originals, cut, junk):
    cfg, wdir, files, values = hf3fs_originals
    raw = files["index.log"]
    tried("store-hf3fs")
    _hf3fs_read(cfg, wdir, {**files, "index.log": raw[: cut % (len(raw) + 1)] + junk}, values)
