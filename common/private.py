"""Directories only this user may use: the shm transport's pools and the store's DRAM tier keep
KV there, which another user must neither read nor plant (docs/design.md)."""
from __future__ import annotations

import os
import stat


def make_private_dir(path: str) -> str:
    """Make ``path`` (mode 0700, its parents as needed) or find it there; why it is not a directory
    of ours with mode 0700 ("a symlink", "not a directory", "owned by uid U with mode M"), or ""
    if it is. OSError where it cannot be made or looked at."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    return dir_problem(os.lstat(path), 0o077)


def dir_problem(st: os.stat_result, forbidden: int) -> str:
    """Why the ``lstat`` result ``st`` is not a directory of ours without the mode bits
    ``forbidden`` ("a symlink", "not a directory", "owned by uid U with mode M"; "" if it is)."""
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.geteuid() or st.st_mode & forbidden:
        return f"owned by uid {st.st_uid} with mode {st.st_mode & 0o7777:04o}"
    return ""
