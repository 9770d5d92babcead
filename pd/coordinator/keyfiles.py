"""Key files and key directories read and written without trusting what is already there.

``pd keys`` may run as root into a directory another user made, and the coordinator, the proxy
and the instances read keys and API tokens from paths a config names. So every directory is
checked (ours, not writable by group or others, not a symlink) before anything is written into
it, every file is opened with ``O_NOFOLLOW`` and checked through its descriptor (a regular file,
ours or root's; a secret readable or writable by group or others is refused, as ssh refuses such
a private key), and new files are written under a fresh name with ``O_EXCL`` and renamed into
place, so a planted symlink is never followed. Every refusal is a ``ConfigError`` naming the path,
its owner and mode, and the fix. See docs/design.md ("Security").
"""
from __future__ import annotations

import os
import pwd
import secrets
import stat
from pathlib import Path

import zmq

from common.config import ConfigError

SECRET_BITS = 0o077  # a secret (a .key_secret file, an API token) must have none of these
PUBLIC_BITS = 0o022  # a public key must not be writable by group or others


def owner_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _describe(st: os.stat_result) -> str:
    return f"owned by {owner_name(st.st_uid)} with mode {stat.S_IMODE(st.st_mode):04o}"


def _trusted_owner(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def check_dir(path: Path, what: str) -> None:
    """``path`` is a directory of ours (not a symlink) that group and others cannot write."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{what}: {path} is a symlink; pdkv keeps keys only in a real directory of its own: "
                          "remove the link or choose another directory")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what}: {path} exists and is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & PUBLIC_BITS:
        raise ConfigError(f"{what}: {path} is {_describe(st)}; a keys directory must be ours and writable by no "
                          f"one else (another user could plant or replace keys there): remove it or choose another "
                          f"directory (pd keys makes it 0700)")


def make_dir(path: Path, what: str) -> None:
    """Make ``path`` (0700) if missing, then check it as ``check_dir`` does and make it 0700."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_dir(path, what)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def read_checked(path: Path, what: str, secret: bool) -> bytes:
    """The bytes of ``path``, opened without following a symlink and checked through the
    descriptor: a regular file, owned by us or root; a ``secret`` with no group/other bits, a
    public file not writable by group or others. ConfigError naming path, owner, mode and the fix."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        why = "it is a symlink (never followed)" if os.path.islink(path) else e.strerror or str(e)
        raise ConfigError(f"{what}: cannot read {path}: {why}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what}: {path} is not a regular file")
        if not _trusted_owner(st.st_uid):
            raise ConfigError(f"{what}: {path} is {_describe(st)}; key files must be ours (or root's): another "
                              f"user could have replaced it; make a fresh one with pd keys")
        bits = SECRET_BITS if secret else PUBLIC_BITS
        if st.st_mode & bits:
            fix = f"chmod 600 {path}" if secret else f"chmod 644 {path} (or 600)"
            who = "read or write" if secret else "write"
            raise ConfigError(f"{what}: {path} is {_describe(st)}: group or others can {who} it; run `{fix}` "
                              f"(and make a new one if others may have seen it)")
        chunks = []
        while block := os.read(fd, 1 << 16):
            chunks.append(block)
            if sum(map(len, chunks)) > 1 << 20:
                raise ConfigError(f"{what}: {path} is over 1 MiB; not a key file")
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_certificate(data: bytes, path: Path) -> tuple[bytes, bytes | None]:
    """(public, secret or None) of a ZeroMQ certificate's text (``zmq.auth``'s format)."""
    public = secret = None
    for line in data.splitlines():
        line = line.strip()
        if line.startswith(b"public-key"):
            public = line.split(b"=", 1)[-1].strip(b" \t'\"")
        elif line.startswith(b"secret-key"):
            secret = line.split(b"=", 1)[-1].strip(b" \t'\"")
    for key in (public, secret):
        if key is not None and len(key) != 40:
            raise ValueError(f"a key in {path} is not 40 z85 characters")
    if not public:
        raise ValueError(f"no public-key in {path}")
    return public, secret


def load_certificate(path: Path, what: str, secret: bool) -> tuple[bytes, bytes | None]:
    """``parse_certificate`` of ``read_checked(path)``; ValueError if it is not a certificate."""
    return parse_certificate(read_checked(path, what, secret), path)


def write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (0600) through a fresh name made with O_EXCL|O_NOFOLLOW, then
    rename it into place: whatever was planted at ``path`` (a symlink too) is replaced, not followed."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    os.replace(tmp, path)


_CERT = ("#   ****  Generated by pdkv (pd keys)  ****\n#   ZeroMQ CURVE {kind} Certificate\n#   {note}\n\n"
         "metadata\ncurve\n    public-key = \"{public}\"\n")


def public_file(public: bytes) -> bytes:
    """The text of a public-key certificate holding ``public``."""
    return _CERT.format(kind="**Public**", note="Exchange securely, or use a secure mechanism to verify the contents",
                        public=public.decode()).encode()


def new_keypair(directory: Path, name: str) -> tuple[bytes, Path]:
    """Write ``name.key`` (public) and ``name.key_secret`` in ``directory`` (0600, ``write_new``);
    (public key, secret file)."""
    public, secret = zmq.curve_keypair()
    write_new(directory / f"{name}.key", public_file(public))
    text = _CERT.format(kind="**Secret**", note="DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its "
                        "permissions.", public=public.decode()) + f"    secret-key = \"{secret.decode()}\"\n"
    write_new(directory / f"{name}.key_secret", text.encode())
    return public, directory / f"{name}.key_secret"
