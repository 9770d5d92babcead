"""launch.scratch_store: the store of one `pd demo --store` / `pd bench ttft` run."""
from __future__ import annotations

import sys

import pytest

from common.config import load
from launch.scratch_store import ScratchStore
from pd.config import DeploymentConfig
from store import make_store


def _no_usrbio(monkeypatch):
    monkeypatch.setitem(sys.modules, "hf3fs_fuse", None)  # import fails, as without the client
    monkeypatch.setitem(sys.modules, "hf3fs_fuse.io", None)


def test_local_temp_dir_is_made_and_removed():
    s = ScratchStore("local")
    assert s.path.is_dir() and s.config() == {"backend": "local", "paths": [str(s.path)]}
    load(DeploymentConfig, {"connector": {"store": s.config()}})  # a valid config
    s.cleanup()
    assert not s.path.exists()


def test_given_path_is_kept(tmp_path):
    s = ScratchStore("local", str(tmp_path))
    s.cleanup()
    assert tmp_path.is_dir()


@pytest.mark.parametrize("backend, path, words", [
    ("nfs", None, ["unknown store backend", "local or hf3fs"]),
    ("local", "/nonexistent/pdkv", ["/nonexistent/pdkv", "not an existing directory"]),
])
def test_bad_input(backend, path, words):
    with pytest.raises(ValueError) as e:
        ScratchStore(backend, path)
    assert all(w in str(e.value) for w in words)


def test_hf3fs_without_the_client_says_how(monkeypatch, tmp_path):
    _no_usrbio(monkeypatch)
    with pytest.raises(ValueError) as e:
        ScratchStore("hf3fs", str(tmp_path))
    assert "hf3fs_py_usrbio" in str(e.value) and "PYTHONPATH=tests/doubles" in str(e.value)


def test_hf3fs_on_the_emulator_makes_a_mount_and_says_so(usrbio_double, tmp_path):
    s = ScratchStore("hf3fs", str(tmp_path))
    assert "not 3FS" in s.note
    dep = load(DeploymentConfig, {"connector": {"store": s.config()}})
    store = make_store(dep.connector.store)  # the instances' own construction works on it
    try:
        assert store.put("ns/0/ab", b"x" * 5000) and store.flush(10)
        assert store.contains(["ns/0/ab"]) == 1
    finally:
        store.close()
