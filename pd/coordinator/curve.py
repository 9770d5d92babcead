"""CurveZMQ authentication of the coordinator: key files, the server's allow-list, client sockets.

``pd keys DIR [--client NAME ...]`` writes (all files 0600, directories 0700)::

    DIR/server.key, server.key_secret      the coordinator's keypair (server.key is public)
    DIR/client.key, client.key_secret      the control host's own client (proxy, pd stats)
    DIR/authorized/<name>.key              the allow-list: public keys of the clients let in
    DIR/api.key                            a bearer token for the vLLM instances' HTTP (vllm.api_key_file)
    DIR/clients/<name>/                    one bundle per extra client, to copy to its host:
        server.key, client.key, client.key_secret, api.key
    DIR/instances/<name>.key_secret        an instance's own key (``--instance NAME``; pd launch makes one per
                                           instance it starts), authorized as authorized/instance.<name>.key

Directories and files another user owns or can write, secrets others can read, and symlinks are
refused (``pd.coordinator.keyfiles``), when writing and when reading. Each message the coordinator
receives carries its key (the ZAP user id ``<z85 key>:<name>``), which ``pd.coordinator.identity``
binds instances and transfers to.

The coordinator (``coordinator.auth: curve``) reads ``server.key_secret`` and admits a client only
if its public key is a file in ``authorized/`` (re-read at each handshake, so adding or removing
a file takes effect at the next connection, without a restart). A client reads ``server.key`` and its own
``<client_key>.key_secret`` (default ``client``) from its keys directory, so ``DIR`` serves the
control host and a copied ``clients/<name>/`` bundle serves another host, under one config key.
A client the coordinator refuses gets no answer: its calls time out as if the coordinator were
down (the connector then degrades to the store / recompute); the coordinator logs and counts it.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from common.config import ConfigError
from pd.coordinator.identity import CONTROL_NAME, INSTANCE_PREFIX
from pd.coordinator.keyfiles import (
    check_dir,
    load_certificate,
    make_dir,
    new_keypair,
    owner_name,
    public_file,
    read_checked,
    write_new,
)

logger = logging.getLogger("pd.coordinator.auth")

SERVER = "server"
DEFAULT_CLIENT = CONTROL_NAME  # the control host's key (proxy, pd stats): the one that may abort any transfer
AUTHORIZED = "authorized"
INSTANCES = "instances"
CLIENTS = "clients"
API_KEY = "api.key"
ZAP_DOMAIN = "pdkv"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LOG_EVERY_S = 60.0
LOG_BURST = 10  # rejection lines per minute in all (a fresh key per handshake bypasses the per-key limit)


@dataclass(frozen=True)
class ClientKeys:
    """What a client socket needs: its own keypair and the server's public key (z85 bytes)."""

    public: bytes
    secret: bytes
    server_public: bytes
    source: str = ""  # where they came from, for messages

    def apply(self, sock) -> None:
        """Make ``sock`` (before connect) a CURVE client of the coordinator."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server_public


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _load(path: Path, what: str, fix: str) -> tuple[bytes, bytes | None]:
    """A key file, checked (``keyfiles.read_checked``: ours, not a symlink, a secret 0600)."""
    try:
        public, secret = load_certificate(path, what, secret=path.suffix == ".key_secret")
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path} does not exist; {fix}") from None
    except ValueError as e:
        raise ConfigError(f"{what}: {path} is not a CurveZMQ key file ({e}); {fix}") from None
    if not public:
        raise ConfigError(f"{what}: {path} has no public-key; {fix}")
    return public, secret


def _secret_path(keys_dir: Path, client_key: str) -> Path:
    """``client_key`` as a file: a name in ``keys_dir`` or a path to a .key_secret file."""
    if "/" in client_key or client_key.endswith(".key_secret"):
        return Path(client_key).expanduser()
    return keys_dir / f"{client_key}.key_secret"


def load_client_keys(keys_dir: str, client_key: str = DEFAULT_CLIENT, what: str = "coordinator.keys_dir") -> ClientKeys:
    """The client keys in ``keys_dir`` (``server.key`` + ``<client_key>.key_secret``); ConfigError
    naming the missing file and how to make it."""
    if not keys_dir:
        raise ConfigError(f"{what}: empty; coordinator.auth curve needs the directory `pd keys DIR` wrote "
                          "(or a copy of its clients/<name>/ bundle on other hosts)")
    d = Path(keys_dir).expanduser()
    fix = (f"run `pd keys {keys_dir}` on the control host (with --instance NAME for an instance's own key), or "
           f"copy DIR/clients/<name>/ from there to {keys_dir} on this host")
    if d.exists():
        check_dir(d, what)
    server_file = d / f"{SERVER}.key"
    if not server_file.is_file() and (d / f"{SERVER}.key_secret").is_file():
        server_file = d / f"{SERVER}.key_secret"  # the public key is in the secret file too
    server_public, _ = _load(server_file, what + " (the coordinator's public key)", fix)
    sfile = _secret_path(d, client_key)
    public, secret = _load(sfile, f"{what} (this client's key {client_key!r})", fix)
    if not secret:
        raise ConfigError(f"{what}: {sfile} has no secret-key (a .key_secret file is needed); {fix}")
    return ClientKeys(public, secret, server_public, str(sfile))


def load_server_keys(keys_dir: str, what: str = "coordinator.keys_dir") -> tuple[bytes, bytes, Path]:
    """(public, secret, authorized dir) of the coordinator; ConfigError if a file is missing."""
    if not keys_dir:
        raise ConfigError(f"{what}: empty; coordinator.auth curve needs a keys directory: run `pd keys DIR` "
                          "and set coordinator.keys_dir: DIR")
    d = Path(keys_dir).expanduser()
    fix = f"run `pd keys {keys_dir}` on this (the control) host"
    if d.exists():
        check_dir(d, what)
    public, secret = _load(d / f"{SERVER}.key_secret", what + " (the coordinator's secret key)", fix)
    if not secret:
        raise ConfigError(f"{what}: {d / (SERVER + '.key_secret')} has no secret-key; {fix}")
    auth = d / AUTHORIZED
    if auth.exists():
        check_dir(auth, what + " (its authorized/ directory)")
    if not auth.is_dir() or not any(auth.glob("*.key")):
        raise ConfigError(f"{what}: {auth} has no client public keys (*.key), so no client could connect; {fix}")
    return public, secret, auth


def client_keys_for(cfg) -> ClientKeys | None:
    """The client keys a ``CoordinatorConfig`` (auth curve) or ``ConnectorConfig``
    (``coordinator_keys_dir`` set) asks for; None for no authentication."""
    if hasattr(cfg, "coordinator_keys_dir"):  # ConnectorConfig
        if not cfg.coordinator_keys_dir:
            return None
        return load_client_keys(cfg.coordinator_keys_dir, cfg.coordinator_client_key,
                                "kv_connector_extra_config.coordinator_keys_dir")
    if effective_auth(cfg) != "curve":
        return None
    return load_client_keys(cfg.keys_dir, cfg.client_key)


def effective_auth(cfg) -> str:
    """``curve`` or ``none``: what a ``CoordinatorConfig`` means (``auto``: curve when it has keys)."""
    return "curve" if cfg.auth == "curve" or (cfg.auth == "auto" and cfg.keys_dir) else "none"


def local_keys_dir(port: int) -> Path:
    """Where ``pd launch`` keeps the keys it makes for a one-host deployment's coordinator on
    ``port`` (``auth: auto`` without ``keys_dir``); ``pd stats`` looks there too."""
    base = os.environ.get("PDKV_KEYS_HOME") or os.path.join(os.environ.get("XDG_CONFIG_HOME") or "~/.config", "pdkv")
    return Path(base).expanduser() / f"coordinator-{port}"


def check_bind(cfg) -> None:
    """Refuse a coordinator config that would listen beyond loopback without authentication."""
    if effective_auth(cfg) == "none" and not is_loopback(cfg.host) and not cfg.allow_insecure:
        raise ConfigError(
            f"coordinator.host: {cfg.host!r} is not a loopback address and coordinator.auth is none: anyone who "
            "can reach the port could publish, consume and free KV transfers. Make keys with `pd keys DIR`, "
            "then set coordinator.auth: curve and coordinator.keys_dir: DIR (or, on a network you trust, "
            "coordinator.allow_insecure: true)")


def read_token(path: str, key: str = "vllm.api_key_file") -> str:
    """The bearer token in ``path`` (one line); ConfigError if it is missing or empty."""
    try:
        token = read_checked(Path(path).expanduser(), key, secret=True).decode("utf-8", "replace").strip()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}; `pd keys DIR` writes DIR/api.key") from None
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"{key}: {path} must hold one token (no spaces); `pd keys DIR` writes DIR/api.key")
    return token


# ---- the server side ---------------------------------------------------------------------


class _AllowList:
    """The ZAP credentials callback: public keys from a directory, re-read at each handshake."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.rejected = 0
        self.accepted = 0
        self.peer = ""  # address of the connection being authenticated (set by the authenticator)
        self._keys: dict[bytes, str] = {}
        self._skipped: dict[Path, str] = {}
        self._lock = threading.Lock()
        self._last_log: dict[bytes, float] = {}
        self._window, self._lines, self._unlogged = -LOG_EVERY_S, 0, 0  # the minute's rejection lines
        self._reload()

    def _reload(self) -> None:
        """Read the directory again (at every handshake: they are rare, connections long-lived), so
        adding or deleting a key file takes effect at the next connection."""
        keys, skipped = {}, {}
        for f in sorted(self.directory.glob("*.key")):
            try:
                public, _ = load_certificate(f, "an authorized key", secret=False)
            except FileNotFoundError:
                continue
            except (ConfigError, ValueError) as e:  # another user's file, writable by others, garbage
                skipped[f] = str(e)
                continue
            keys[public] = f.stem
        for f in skipped.keys() - self._skipped.keys():  # once per file, not at every handshake
            logger.warning("ignoring %s: %s", f, skipped[f])
        with self._lock:
            changed, self._keys, self._skipped = keys != self._keys, keys, skipped
        if changed:
            logger.info("%d client key(s) authorized from %s: %s", len(keys), self.directory,
                        ", ".join(sorted(keys.values())) or "none")

    def name_of(self, key: bytes) -> str:
        """The allow-list name (file stem) of an authorized public key (z85); "" if none."""
        with self._lock:
            return self._keys.get(key, "")

    def has_instance_key(self, instance: str) -> bool:
        """Whether ``instance`` has a key of its own (``authorized/instance.<id>.key``)."""
        name = INSTANCE_PREFIX + instance
        with self._lock:
            return name in self._keys.values()

    def callback(self, domain: str, key: bytes) -> bool:
        self._reload()
        with self._lock:
            name = self._keys.get(key)
        if name is not None:
            self.accepted += 1
            logger.debug("client %s (%s) authenticated from %s", name, key.decode(), self.peer)
            return True
        self.rejected += 1
        now = time.monotonic()
        if now - self._last_log.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:  # once a minute per key
            self._last_log[key] = now
            if len(self._last_log) > 1000:
                self._last_log.clear()
            self._log_rejection(now, key)
        return False

    def _log_rejection(self, now: float, key: bytes) -> None:
        """At most ``LOG_BURST`` lines a minute in all; the rest are counted in the next one."""
        if now - self._window >= LOG_EVERY_S:
            if self._unlogged:
                logger.warning("%d more client(s) with unknown keys were rejected in the last minute, not logged "
                               "one by one", self._unlogged)
            self._window, self._lines, self._unlogged = now, 0, 0
        if self._lines >= LOG_BURST:
            self._unlogged += 1
            return
        self._lines += 1
        logger.warning("rejected a client from %s: its public key %s is not in %s (%d rejection(s) so far; "
                       "add the key there to let it in)", self.peer or "?", key.decode(), self.directory,
                       self.rejected)


class CurveServer:
    """The coordinator's CURVE setup: a ZAP authenticator thread with the allow-list of ``keys_dir``.

    Use: ``srv = CurveServer(ctx, keys_dir); srv.apply(sock)`` before ``sock.bind``; ``srv.stop()``
    before the context is terminated. A socket set up this way refuses every connection if the
    authenticator is gone (the ZAP domain is enforced), never admits one unauthenticated.
    """

    def __init__(self, ctx, keys_dir: str):
        self.public, self._secret, authorized = load_server_keys(keys_dir)
        self.allow = _AllowList(authorized)
        allow = self.allow

        class _Authenticator(ThreadAuthenticator):
            async def handle_zap_message(self, msg):  # remember the peer's address for the log line
                if len(msg) > 3:
                    allow.peer = msg[3].decode("utf-8", "replace")
                await super().handle_zap_message(msg)

            def curve_user_id(self, client_public_key: bytes) -> str:
                """The ZAP user id every message of the connection carries ("User-Id"): the key
                (z85) and its allow-list name (``pd.coordinator.identity.Peer``)."""
                z85 = super().curve_user_id(client_public_key)
                return f"{z85}:{allow.name_of(z85.encode())}"

        self._auth = _Authenticator(ctx, log=logging.getLogger("pd.coordinator.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self.allow)

    def apply(self, sock) -> None:
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    @property
    def rejected(self) -> int:
        return self.allow.rejected

    def stop(self) -> None:
        self._auth.stop()


# ---- pd keys ------------------------------------------------------------------------------


def _check_names(names: list[str], flag: str) -> None:
    for name in names:
        if not _NAME.fullmatch(name) or name in (SERVER, DEFAULT_CLIENT):
            raise ConfigError(f"{flag}: {name!r} is not allowed; use letters, digits, '_', '.', '-' (at most 64, not "
                              f"{SERVER!r} or {DEFAULT_CLIENT!r})")
        if flag == "--client" and name.startswith(INSTANCE_PREFIX):  # authorized/instance.<id>.key: an instance's
            raise ConfigError(f"{flag}: {name!r} is not allowed: names beginning {INSTANCE_PREFIX!r} are the instances' "
                              f"own keys (pd keys DIR --instance NAME makes those)")
    if len(set(names)) != len(names):
        raise ConfigError(f"{flag}: a name is given twice")


def _check_authorized(auth: Path) -> None:
    """Every file in the allow-list is ours and writable by no one else (``pd keys`` as root into a
    directory another user made must not keep that user's keys)."""
    for f in sorted(auth.iterdir()):
        st = os.lstat(f)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() \
                or st.st_mode & 0o022:
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a file"
            raise ConfigError(f"pd keys: {f} in the allow-list is {kind} owned by {owner_name(st.st_uid)} with mode "
                              f"{stat.S_IMODE(st.st_mode):04o}; only our own files (not writable by others) may "
                              f"authorize a client: remove it (or start over in a new directory)")


def _keep_or_make(d: Path, name: str, what: str) -> tuple[bytes, bool]:
    """(public key, made) of ``d/name.key_secret``: an existing one is checked and kept."""
    secret = d / f"{name}.key_secret"
    if secret.exists() or secret.is_symlink():
        return _load(secret, what, f"remove {secret} to make a new one")[0], False
    return new_keypair(d, name)[0], True


def make_instance_keys(keys_dir: str | Path, names: list[str]) -> list[str]:
    """One keypair per instance (``DIR/instances/<name>.key_secret``, its public key authorized as
    ``authorized/instance.<name>.key``), kept across launches; the coordinator lets such a key
    speak only for its own instance (``pd.coordinator.identity``)."""
    d = Path(keys_dir).expanduser()
    _check_names(list(names), "instance")
    if not names:
        return []
    done = []
    old = os.umask(0o077)
    try:
        check_dir(d, "pd keys")  # also when make_keys did not run first (pd launch with a keys_dir of its own)
        check_dir(d / AUTHORIZED, "pd keys (authorized/)")
        make_dir(d / INSTANCES, "pd keys (instances/)")
        for name in names:
            public, made = _keep_or_make(d / INSTANCES, name, f"instance {name!r} key")
            auth = d / AUTHORIZED / f"{INSTANCE_PREFIX}{name}.key"
            if made or not auth.exists() or _load(auth, "an authorized key", "remove it")[0] != public:
                write_new(auth, public_file(public))
            if made:
                done.append(f"instance {name!r:<7} {d / INSTANCES / name}.key_secret (its own coordinator key)")
    finally:
        os.umask(old)
    return done


def make_keys(keys_dir: str | Path, clients: list[str] = (), instances: list[str] = ()) -> list[str]:
    """Write the server keypair and the default client (unless present), one bundle per name in
    ``clients`` (refused if it exists) and one key per name in ``instances``. A directory another
    user owns or can write, or a file of theirs in it, is refused. Returns what was written."""
    d = Path(keys_dir).expanduser()
    _check_names(list(clients), "--client")
    for name in clients:
        if (d / CLIENTS / name).exists() or (d / AUTHORIZED / f"{name}.key").exists():
            raise ConfigError(f"client {name!r} exists in {d}; remove {d / CLIENTS / name} and "
                              f"{d / AUTHORIZED / (name + '.key')} to make it again, or choose another name")
    done = []
    old = os.umask(0o077)
    try:
        make_dir(d, "pd keys")
        make_dir(d / AUTHORIZED, "pd keys (authorized/)")
        _check_authorized(d / AUTHORIZED)
        if not _keep_or_make(d, SERVER, "the server keypair")[1]:
            done.append(f"kept the server keypair {d / SERVER}.key_secret")
        else:
            done.append(f"server keypair   {d / SERVER}.key (public), {d / SERVER}.key_secret (keep it on the "
                        "control host)")
        if (d / API_KEY).exists() or (d / API_KEY).is_symlink():
            read_token(str(d / API_KEY), "pd keys (the api token)")  # ours, 0600
        else:
            write_new(d / API_KEY, (secrets.token_urlsafe(32) + "\n").encode())
            done.append(f"api token        {d / API_KEY} (vllm.api_key_file: the instances' HTTP)")
        public, made = _keep_or_make(d, DEFAULT_CLIENT, "the control host's client key")
        if made:
            write_new(d / AUTHORIZED / f"{DEFAULT_CLIENT}.key", public_file(public))
            done.append(f"client 'client'  {d / DEFAULT_CLIENT}.key_secret (this host's proxy, pd stats)")
        for name in clients:
            done.append(_make_bundle(d, name))
        done += make_instance_keys(d, list(instances))
    finally:
        os.umask(old)
    return done


def _make_bundle(d: Path, name: str) -> str:
    bundle = d / CLIENTS / name
    make_dir(d / CLIENTS, "pd keys (clients/)")
    make_dir(bundle, f"pd keys (clients/{name}/)")
    public, _ = new_keypair(bundle, DEFAULT_CLIENT)
    for f in (f"{SERVER}.key", API_KEY):
        write_new(bundle / f, read_checked(d / f, "pd keys", secret=f == API_KEY))
    write_new(d / AUTHORIZED / f"{name}.key", public_file(public))
    return f"client {name!r:<9} {bundle}/ (copy it to that host; point coordinator.keys_dir there)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pd keys``."""
    p.add_argument("dir", metavar="DIR", help="keys directory (made if missing; an existing server keypair is kept)")
    p.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="also make a client keypair bundle DIR/clients/NAME/ for another host (repeatable)")
    p.add_argument("--instance", action="append", default=[], metavar="NAME",
                   help="also make instance NAME's own key, DIR/instances/NAME.key_secret (pd launch makes those of "
                        "the instances it starts here; repeatable)")


def run(args: argparse.Namespace) -> int:
    """``pd keys DIR [--client NAME ...] [--instance NAME ...]``."""
    for line in make_keys(args.dir, args.client, args.instance):
        print(line)
    print(f"authorized clients: {', '.join(sorted(p.stem for p in (Path(args.dir) / AUTHORIZED).glob('*.key')))} "
          f"(public keys in {Path(args.dir) / AUTHORIZED}; delete one to revoke it)")
    return 0
