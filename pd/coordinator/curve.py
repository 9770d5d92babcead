"""CurveZMQ authentication of the coordinator: key files, the server's allow-list, client sockets.

``pd keys DIR [--client NAME ...]`` writes (all files 0600, directories 0700)::

    DIR/server.key, server.key_secret      the coordinator's keypair (server.key is public)
    DIR/client.key, client.key_secret      the control host's own client (proxy, pd stats)
    DIR/authorized/<name>.key              the allow-list: public keys of the clients let in
    DIR/api.key                            a bearer token for the vLLM instances' HTTP (vllm.api_key_file)
    DIR/clients/<name>/                    one bundle per extra client, to copy to its host:
        server.key, client.key, client.key_secret, api.key

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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from common.config import ConfigError

logger = logging.getLogger("pd.coordinator.auth")

SERVER = "server"
DEFAULT_CLIENT = "client"
AUTHORIZED = "authorized"
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
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist; {fix}")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
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
    fix = (f"run `pd keys {keys_dir}` on the control host, or copy DIR/clients/<name>/ from there to "
           f"{keys_dir} on this host")
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
    public, secret = _load(d / f"{SERVER}.key_secret", what + " (the coordinator's secret key)", fix)
    if not secret:
        raise ConfigError(f"{what}: {d / (SERVER + '.key_secret')} has no secret-key; {fix}")
    auth = d / AUTHORIZED
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
        token = Path(path).expanduser().read_text().strip()
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
        self._lock = threading.Lock()
        self._last_log: dict[bytes, float] = {}
        self._window, self._lines, self._unlogged = -LOG_EVERY_S, 0, 0  # the minute's rejection lines
        self._reload()

    def _reload(self) -> None:
        """Read the directory again (at every handshake: they are rare, connections long-lived), so
        adding or deleting a key file takes effect at the next connection."""
        keys = {}
        for f in sorted(self.directory.glob("*.key")):
            try:
                public, _ = zmq.auth.load_certificate(str(f))
            except (OSError, ValueError) as e:
                logger.warning("ignoring %s: not a CurveZMQ key file (%s)", f, e)
                continue
            if public:
                keys[public] = f.stem
        with self._lock:
            changed, self._keys = keys != self._keys, keys
        if changed:
            logger.info("%d client key(s) authorized from %s: %s", len(keys), self.directory,
                        ", ".join(sorted(keys.values())) or "none")

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


def _private_file(path: Path) -> None:
    os.chmod(path, 0o600)


def _new_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """``name.key`` and ``name.key_secret`` in ``directory`` (0600), made atomically."""
    public_file, secret_file = zmq.auth.create_certificates(str(directory), name)
    for f in (public_file, secret_file):
        _private_file(Path(f))
    return Path(public_file), Path(secret_file)


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def make_keys(keys_dir: str | Path, clients: list[str] = ()) -> list[str]:
    """Write the server keypair and the default client (unless present) and one bundle per name in
    ``clients`` (refused if it exists). Returns what was written, one line each."""
    d = Path(keys_dir).expanduser()
    for name in clients:
        if not _NAME.fullmatch(name) or name in (SERVER, DEFAULT_CLIENT):
            raise ConfigError(f"--client: {name!r} is not allowed; use letters, digits, '_', '.', '-' (not "
                              f"{SERVER!r} or {DEFAULT_CLIENT!r})")
    if len(set(clients)) != len(clients):
        raise ConfigError("--client: a name is given twice")
    for name in clients:
        if (d / CLIENTS / name).exists() or (d / AUTHORIZED / f"{name}.key").exists():
            raise ConfigError(f"client {name!r} exists in {d}; remove {d / CLIENTS / name} and "
                              f"{d / AUTHORIZED / (name + '.key')} to make it again, or choose another name")
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{d} exists and is not a directory")
    done = []
    old = os.umask(0o077)
    try:
        _mkdir(d)
        _mkdir(d / AUTHORIZED)
        server_secret = d / f"{SERVER}.key_secret"
        if server_secret.exists():
            done.append(f"kept the server keypair {server_secret}")
        else:
            _new_keypair(d, SERVER)
            done.append(f"server keypair   {d / SERVER}.key (public), {server_secret} (keep it on the control host)")
        if not (d / API_KEY).exists():
            (d / API_KEY).write_text(secrets.token_urlsafe(32) + "\n")
            _private_file(d / API_KEY)
            done.append(f"api token        {d / API_KEY} (vllm.api_key_file: the instances' HTTP)")
        if not (d / f"{DEFAULT_CLIENT}.key_secret").exists():
            public, _ = _new_keypair(d, DEFAULT_CLIENT)
            (d / AUTHORIZED / f"{DEFAULT_CLIENT}.key").write_bytes(public.read_bytes())
            _private_file(d / AUTHORIZED / f"{DEFAULT_CLIENT}.key")
            done.append(f"client 'client'  {d / DEFAULT_CLIENT}.key_secret (this host's proxy, pd stats, instances)")
        for name in clients:
            bundle = d / CLIENTS / name
            _mkdir(d / CLIENTS)
            _mkdir(bundle)
            public, _ = _new_keypair(bundle, DEFAULT_CLIENT)
            for f in (f"{SERVER}.key", API_KEY):
                (bundle / f).write_bytes((d / f).read_bytes())
                _private_file(bundle / f)
            (d / AUTHORIZED / f"{name}.key").write_bytes(public.read_bytes())
            _private_file(d / AUTHORIZED / f"{name}.key")
            done.append(f"client {name!r:<9} {bundle}/ (copy it to that host; point coordinator.keys_dir there)")
    finally:
        os.umask(old)
    return done


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pd keys``."""
    p.add_argument("dir", metavar="DIR", help="keys directory (made if missing; an existing server keypair is kept)")
    p.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="also make a client keypair bundle DIR/clients/NAME/ for another host (repeatable)")


def run(args: argparse.Namespace) -> int:
    """``pd keys DIR [--client NAME ...]``."""
    for line in make_keys(args.dir, args.client):
        print(line)
    print(f"authorized clients: {', '.join(sorted(p.stem for p in (Path(args.dir) / AUTHORIZED).glob('*.key')))} "
          f"(public keys in {Path(args.dir) / AUTHORIZED}; delete one to revoke it)")
    return 0
