"""store/hf3fs's directories and files against other users (issue 18, item 4), on the strict
USRBIO emulator (tests/doubles/usrbio_emulator.py, a test double of 3FS's ``hf3fs_fuse.io``):
a base path others can write, symlinks planted for ``dev<k>`` and writer directories, data and
index files of another uid. 3FS is shared by every host, whose pdkv runs as one uid: what is that
uid's and writable by it only is used, the rest refused or never read."""
from __future__ import annotations

import os
import numpy as np
import pytest

from common.config import ConfigError
from tests.unit.test_store_hf3fs import W0, _data, _key, _open, mount  # noqa: F401 (mount: a fixture)

OTHER_UID = 12345


def test_a_base_path_others_can_write_is_refused(mount):  # noqa: F811
    base = mount / "kv"
    base.mkdir()
    os.chmod(base, 0o777)  # anyone could swap dev0 or a writer directory for their own
    with pytest.raises(ConfigError, match=rf"store base path {base} is owned by uid {os.geteuid()} with mode "
                                          r"0777.*writable by us only.*same uid"):
        _open(mount)
    os.chmod(base, 0o700)
    _open(mount).close()


def test_planted_symlinks_are_refused_or_never_read(mount):  # noqa: F811
    elsewhere = mount / "theirs"  # another directory on the same 3FS
    elsewhere.mkdir(mode=0o700)
    dev0 = mount / "kv" / "dev0"
    dev0.parent.mkdir(mode=0o700)
    dev0.symlink_to(elsewhere)
    with pytest.raises(ConfigError, match=rf"{dev0} is a symlink"):
        _open(mount)
    dev0.unlink()
    dev0.mkdir(mode=0o700)
    (dev0 / W0).symlink_to(elsewhere)  # the writer directory this process would take
    with pytest.raises(ConfigError, match=rf"hf3fs writer directory {dev0 / W0} is a symlink; .*remove it"):
        _open(mount)
    assert os.listdir(elsewhere) == []  # nothing written through it
    (dev0 / W0).unlink()
    # a peer directory that is a symlink (to a real writer's files) is not read
    s = _open(mount)
    data = _data(1)
    assert s.put(_key(1), data) and s.flush()
    s.close()
    os.rename(dev0 / W0, elsewhere / "moved")
    (dev0 / "otherhost.w0").symlink_to(elsewhere / "moved")
    r = _open(mount, writer=False)
    try:
        assert r.get(_key(1), np.zeros(len(data), np.uint8)) == 0
        assert r.usage()["peers"] == 0 and r._peers.skipped == {str(dev0 / "otherhost.w0")}
    finally:
        r.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root")
def test_files_of_another_uid_are_not_served(mount, caplog):  # noqa: F811
    s = _open(mount)
    data = _data(2)
    assert s.put(_key(2), data) and s.flush()
    s.close()
    w0 = mount / "kv" / "dev0" / W0
    out = np.zeros(len(data), np.uint8)
    with _open(mount, writer=False) as r:  # a reader: the writer's directory is a peer's
        assert r.get(_key(2), out) == len(data) and np.array_equal(out, data)
    data_file = next(w0.glob("data-*.bin"))
    os.chown(data_file, OTHER_UID, OTHER_UID)  # e.g. planted under the same name
    with _open(mount, writer=False) as r:
        assert r.get(_key(2), out) == 0 and r.get(_key(2), out) == 0
        assert r.usage()["peer_hits"] == 0
    with pytest.raises(PermissionError, match=rf"{data_file} is owned by uid {OTHER_UID}"):
        _open(mount)  # nor does a writer take the directory back with it
    os.chown(data_file, os.geteuid(), os.getegid())
    os.chown(w0 / "index.log", OTHER_UID, OTHER_UID)
    with _open(mount, writer=False) as r:
        assert r.get(_key(2), out) == 0
        assert r._peers.skipped == {str(w0)}
    assert f"{w0}/index.log is owned by uid {OTHER_UID}" in caplog.text

