"""The shm transport's index: one symlink per key in the pool directory.

``<pool>/key_to_name(key)`` -> ``"<arena file name>:<offset>:<length>:<seq>"``. A link appears
only once its value is complete, atomically (a new key: ``symlink``; an existing one: a
temporary link ``rename``d over it, last write wins). Names that start with ``.`` are never a
key's (``key_to_name`` escapes a leading dot): temporary links (``.tmp-``) and arenas
(``.arena-<pid>-<uuid8>``) live beside the links without clashing.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from typing import Any, Sequence

from common.private import make_private_dir as private_dir
from common.process import pid_alive
from transport.base import TransportError

log = logging.getLogger(__name__)

_PLAIN = re.compile(r"[A-Za-z0-9_.-]")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_./-]*")  # keys key_to_name only maps "/" in
_MAX_NAME = 200  # well under NAME_MAX (255 bytes)
TMP_PREFIX = ".tmp-"
ARENA_PREFIX = ".arena-"
_ARENA_RE = re.compile(r"\.arena-\d+-[0-9a-f]{8}")


def key_to_name(key: str) -> str:
    """Flat, injective file name for a key.

    ``[A-Za-z0-9_.-]`` stay as they are, ``/`` becomes ``+``, every other byte (of the UTF-8
    form) becomes ``%XX``; a leading ``.`` is escaped too, so no name is ``.``/``..`` or
    collides with a temporary link or an arena. Names longer than ``_MAX_NAME`` keep a readable
    prefix and end in ``#`` + a 128-bit digest of the key (``#`` never occurs in an escaped name).
    """
    if len(key) <= _MAX_NAME and _PLAIN_KEY.fullmatch(key):  # the usual case, fast
        return key.replace("/", "+")
    out = []
    for i, ch in enumerate(key):
        if ch == "/":
            out.append("+")
        elif _PLAIN.match(ch) and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode())
    name = "".join(out)
    if len(name) > _MAX_NAME:
        digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        name = name[: _MAX_NAME - 33] + "#" + digest
    return name


def name_to_key(name: str) -> str | None:
    """Inverse of ``key_to_name`` (None for hashed long names, temporary links and arenas)."""
    if "#" in name or name.startswith("."):
        return None
    raw = bytearray()
    i = 0
    while i < len(name):
        ch = name[i]
        if ch == "%":
            raw.append(int(name[i + 1 : i + 3], 16))
            i += 3
            continue
        raw += b"/" if ch == "+" else ch.encode()
        i += 1
    return raw.decode()


def pool_dir(cfg: Any) -> str:
    """The pool directory of a ``TransportConfig``: ``<shm_dir>/pdkv-<name>``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.name) or "default"
    return os.path.join(cfg.shm_dir, f"pdkv-{safe}")


def make_private_dir(path: str) -> None:
    """Make the pool directory (0700) or check the one there: ours, 0700, a directory and not a
    symlink. TransportError otherwise: another user could read our KV or plant chunks there, and
    a symlink planted at the pool's path would send the arenas where that user chose."""
    try:
        why = private_dir(path)
    except OSError as e:
        raise TransportError(f"cannot create shm pool {path}: {e}") from e
    if why:
        raise TransportError(
            f"shm pool {path} is {why}; it must be ours (uid {os.geteuid()}), a directory with mode 0700 and "
            "not a symlink, or other users could read or plant KV chunks. Remove it, or set "
            "connector.transport.name to another pool")


def cleanup_pool(cfg: Any) -> None:
    """Remove the whole pool directory (every producer's arena and links); the launcher's clean stop."""
    path = pool_dir(cfg)
    shutil.rmtree(path, ignore_errors=True)
    log.info("removed shm pool %s", path)


def make_target(arena: str, off: int, length: int, seq: int) -> str:
    return f"{arena}:{off}:{length}:{seq}"


def parse_target(target: str) -> tuple[str, int, int, int]:
    """``(arena name, offset, length, seq)`` of a link target; ValueError if it is not one."""
    name, off, length, seq = target.rsplit(":", 3)
    if not _ARENA_RE.fullmatch(name):
        raise ValueError(f"not an arena: {name!r}")
    return name, int(off), int(length), int(seq)


def all_linked(path: str, keys: Sequence[str]) -> bool:
    """Whether every key has an index link in pool ``path`` now (each was committed, and not
    evicted or consumed since): one readlink per key, nothing mapped."""
    for key in keys:
        try:
            parse_target(os.readlink(os.path.join(path, key_to_name(key))))
        except (OSError, ValueError):
            return False
    return True


def read_link(link: str) -> str:
    """The link's target, "" if there is none (or it is not a link)."""
    try:
        return os.readlink(link)
    except OSError:
        return ""


def publish(link: str, target: str, tmp: str) -> str:
    """Point ``link`` at ``target`` atomically; returns the target it replaced ("" if none).
    ``tmp`` is a temporary name, unique to the caller. OSError if the pool cannot take it."""
    try:
        os.symlink(target, link)  # a new key: one atomic call
        return ""
    except FileExistsError:
        pass
    old = read_link(link)
    os.symlink(target, tmp)
    try:
        os.rename(tmp, link)  # atomic replace: last write wins
    except BaseException:
        os.unlink(tmp)
        raise
    return old


def unlink_if(link: str, target: str) -> bool:
    """Unlink ``link`` if it still points at ``target``; whether it did."""
    try:
        if os.readlink(link) != target:
            return False
        os.unlink(link)
        return True
    except FileNotFoundError:
        return False
    except OSError as err:
        log.warning("shm pool: cannot unlink %s: %s", link, err)
        return False


def producer_alive(name: str) -> bool:
    """Whether the producer of arena ``name`` (``.arena-<pid>-<uuid8>``) still runs."""
    return bool(_ARENA_RE.fullmatch(name)) and pid_alive(int(name.split("-")[1]))


def reap_dead(path: str) -> tuple[int, int]:
    """Remove the arenas of producers that are gone (their pid no longer runs: a SIGKILLed
    instance) and the links into them; (arenas, links) removed. A reader that mapped such an arena
    keeps its mapping; one that resolves a removed link sees a miss (store, then recompute)."""
    try:
        names = os.listdir(path)
    except OSError:
        return 0, 0
    dead = {n for n in names if _ARENA_RE.fullmatch(n) and not producer_alive(n)}
    if not dead:
        return 0, 0
    links = 0
    for n in names:
        if n.startswith("."):
            continue
        target = read_link(os.path.join(path, n))
        if target and target.rsplit(":", 3)[0] in dead and unlink_if(os.path.join(path, n), target):
            links += 1
    for n in dead:
        try:
            os.unlink(os.path.join(path, n))
        except FileNotFoundError:
            pass
    log.warning("shm pool %s: removed %d arena(s) of producers that are gone and %d link(s) into them",
                path, len(dead), links)
    return len(dead), links
