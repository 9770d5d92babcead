"""Keys and chunk format."""
import struct
import subprocess
import sys

import numpy as np
import pytest

from common.config import ConfigError
from pd.connector import chunk as C
from pd.connector.keys import (
    chunk_hashes,
    chunk_keys,
    key_digest,
    layout_fingerprint,
    make_namespace,
    transfer_key,
)


def test_equal_prefixes_give_equal_keys_and_divergence_changes_the_rest():
    a = list(range(1000))
    b = a[:600] + [7] * 400
    ka, kb = chunk_keys("ns", 0, a, 256), chunk_keys("ns", 0, b, 256)
    assert len(ka) == 4  # 3 full chunks + a partial one
    assert ka[:2] == kb[:2]  # chunks 0..1 cover tokens 0..511, equal in both
    assert ka[2] != kb[2] and ka[3] != kb[3]  # chunk 2 holds the divergence, the chain carries it


def test_chain_hash_depends_on_earlier_chunks():
    a = [1] * 256 + [2] * 256
    b = [3] * 256 + [2] * 256
    assert chunk_hashes(a, 256)[1] != chunk_hashes(b, 256)[1]


def test_partial_chunk_differs_from_full_chunk_with_same_start():
    assert chunk_keys("ns", 0, [5] * 100, 256)[0] != chunk_keys("ns", 0, [5] * 256, 256)[0]


def test_keys_do_not_depend_on_python_hash_seed():
    code = "from pd.connector.keys import chunk_keys; print(chunk_keys('ns', 1, list(range(300)), 256))"
    outs = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": s, "PATH": ""},
                           capture_output=True, text=True, check=True).stdout for s in ("1", "2")}
    assert len(outs) == 1


def test_rank_and_namespace_are_part_of_the_key():
    toks = list(range(300))
    assert chunk_keys("ns", 0, toks, 256) != chunk_keys("ns", 1, toks, 256)
    fp1 = layout_fingerprint(dtype="bf16", layers=4)
    fp2 = layout_fingerprint(dtype="fp16", layers=4)
    assert make_namespace("/m/tiny", fp1) != make_namespace("/m/tiny", fp2)
    assert "/" not in make_namespace("/models/tiny/", fp1)


def test_key_digest_and_transfer_key():
    k = chunk_keys("ns", 0, [1, 2, 3], 256)[0]
    assert key_digest(k) == chunk_hashes([1, 2, 3], 256)[0]
    assert transfer_key("id/1", k).startswith("xfer/id_1/ns/0/")
    with pytest.raises(ValueError, match="malformed chunk key"):
        key_digest("no-hash-here")


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError):
        chunk_hashes([1], 0)


def _chunk(payload: bytes, fp=b"F" * 16, kh=b"K" * 16, secret=None):
    buf = np.zeros(C.HEADER_SIZE + len(payload), dtype=np.uint8)
    buf[C.HEADER_SIZE:] = np.frombuffer(payload, dtype=np.uint8)
    C.write_header(memoryview(buf), fp, kh, n_tokens=33, n_blocks=3, payload_len=len(payload), secret=secret)
    return buf


def test_chunk_round_trip():
    buf = _chunk(bytes(range(256)) * 4)
    n_tokens, n_blocks, payload = C.verify(memoryview(buf), b"F" * 16, b"K" * 16, 1024)
    assert (n_tokens, n_blocks) == (33, 3)
    assert bytes(payload) == bytes(range(256)) * 4


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.__setitem__(C.HEADER_SIZE + 5, b[C.HEADER_SIZE + 5] ^ 1), "checksum"),
    (lambda b: b.__setitem__(0, ord("X")), "magic"),
])
def test_corrupt_chunk_is_refused(mutate, message):
    buf = _chunk(b"x" * 512)
    mutate(buf)
    with pytest.raises(C.ChunkError, match=message):
        C.verify(memoryview(buf), b"F" * 16, b"K" * 16)


def test_wrong_layout_key_or_length_is_refused():
    buf = _chunk(b"x" * 512)
    with pytest.raises(C.ChunkError, match="fingerprint"):
        C.verify(memoryview(buf), b"G" * 16, b"K" * 16)
    with pytest.raises(C.ChunkError, match="key hash"):
        C.verify(memoryview(buf), b"F" * 16, b"L" * 16)
    with pytest.raises(C.ChunkError, match="payload length"):
        C.verify(memoryview(buf), b"F" * 16, b"K" * 16, 256)
    with pytest.raises(C.ChunkError, match="truncated"):
        C.verify(memoryview(buf)[: C.HEADER_SIZE + 100], b"F" * 16, b"K" * 16)
    with pytest.raises(C.ChunkError, match="truncated"):
        C.verify(memoryview(buf)[:10], b"F" * 16, b"K" * 16)


def test_chunk_without_checksum_still_checks_layout_key_and_length():
    buf = np.zeros(C.HEADER_SIZE + 512, dtype=np.uint8)
    buf[C.HEADER_SIZE:] = 7
    C.write_header(memoryview(buf), b"F" * 16, b"K" * 16, 33, 3, 512, with_checksum=False)
    assert C.read_header(memoryview(buf))[3] == 0 and C.read_header(memoryview(buf))[9] == 0
    buf[C.HEADER_SIZE + 5] ^= 1  # not detected: such chunks rely on the medium (shm seqlock, store checksum)
    assert C.verify(memoryview(buf), b"F" * 16, b"K" * 16, 512)[:2] == (33, 3)
    with pytest.raises(C.ChunkError, match="fingerprint"):
        C.verify(memoryview(buf), b"G" * 16, b"K" * 16)
    with pytest.raises(C.ChunkError, match="key hash"):
        C.verify(memoryview(buf), b"F" * 16, b"L" * 16)


def test_unknown_header_flags_are_refused():
    buf = _chunk(b"x" * 64)
    struct.pack_into("<I", buf, 12, 0x80 | C.FLAG_CHECKSUM)
    with pytest.raises(C.ChunkError, match="unsupported"):
        C.verify(memoryview(buf), b"F" * 16, b"K" * 16)


def test_request_seed_covers_what_vllm_block_hashes_cover():
    from types import SimpleNamespace as NS

    from pd.connector.keys import request_seed

    def req(**kw):
        return NS(**{"prompt_embeds": None, "lora_request": None, "cache_salt": None, "mm_features": [], **kw})

    image = lambda ident, offset: NS(identifier=ident, mm_position=NS(offset=offset, length=16))  # noqa: E731
    plain = request_seed(req())
    assert plain == b""  # plain requests keep the keys they always had
    seeds = [request_seed(req(cache_salt="tenant-a")), request_seed(req(cache_salt="tenant-b")),
             request_seed(req(lora_request=NS(lora_name="sql", lora_path="/l/sql"))),
             request_seed(req(lora_request=NS(lora_name="chat", lora_path="/l/chat"))),
             request_seed(req(mm_features=[image("img-1", 5)])), request_seed(req(mm_features=[image("img-2", 5)])),
             request_seed(req(mm_features=[image("img-1", 9)]))]
    assert len(set(seeds)) == len(seeds) and plain not in seeds
    assert request_seed(req(cache_salt="tenant-a")) == seeds[0]  # stable across calls and processes
    assert request_seed(req(prompt_embeds=object())) is None  # cannot be keyed by tokens: no store
    assert request_seed(req(mm_features=[NS(identifier=None, mm_position=None)])) is None
    toks = list(range(600))
    assert chunk_keys("ns", 0, toks, 256, seeds[0]) != chunk_keys("ns", 0, toks, 256, seeds[1])
    assert chunk_keys("ns", 0, toks, 256, b"") == chunk_keys("ns", 0, toks, 256)


def test_a_chunk_keyed_with_another_secret_or_none_is_refused():
    """connector.chunk_secret_file: whoever can write a shared store but lacks the deployment's
    secret cannot make a chunk its readers accept; readers with and without one never mix."""
    ours, theirs = C.secret_key(b"o" * 32), C.secret_key(b"t" * 32)
    buf = _chunk(b"x" * 512, secret=ours)
    assert C.read_header(memoryview(buf))[3] == C.FLAG_CHECKSUM | C.FLAG_KEYED
    assert C.verify(memoryview(buf), b"F" * 16, b"K" * 16, 512, secret=ours)[:2] == (33, 3)
    with pytest.raises(C.ChunkError, match="another secret"):
        C.verify(memoryview(buf), b"F" * 16, b"K" * 16, 512, secret=theirs)
    with pytest.raises(C.ChunkError, match="secret this reader lacks"):
        C.verify(memoryview(buf), b"F" * 16, b"K" * 16, 512)
    with pytest.raises(C.ChunkError, match="not keyed with this deployment's secret"):
        C.verify(memoryview(_chunk(b"x" * 512)), b"F" * 16, b"K" * 16, 512, secret=ours)
    # the header is covered too: the same payload relabelled (another token count) is refused
    struct.pack_into("<I", buf, 48, 34)  # n_tokens
    assert C.read_header(memoryview(buf))[6] == 34
    with pytest.raises(C.ChunkError, match="checksum mismatch"):
        C.verify(memoryview(buf), b"F" * 16, b"K" * 16, 512, secret=ours)


def test_chunk_secret_files_must_be_private_and_long_enough(tmp_path):
    f = tmp_path / "chunk.secret"
    f.write_bytes(b"s" * 32 + b"\n")
    f.chmod(0o644)
    with pytest.raises(ConfigError, match=r"mode 0644: group or others can read or write it; run `chmod 600"):
        C.read_secret(str(f))
    f.chmod(0o600)
    assert C.read_secret(str(f)) == C.secret_key(b"s" * 32)
    f.write_bytes(b"short\n")
    with pytest.raises(ConfigError, match="has 5 bytes; it needs at least 16"):
        C.read_secret(str(f))
    with pytest.raises(ConfigError, match="cannot read"):
        C.read_secret(str(tmp_path / "missing"))
    f.write_bytes(b"s" * 32 + b"\n")
    link = tmp_path / "link.secret"
    link.symlink_to(f)  # never followed, as no key file is (someone could point it elsewhere)
    with pytest.raises(ConfigError, match="is a symlink"):
        C.read_secret(str(link))
