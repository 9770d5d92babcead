"""The coordinator's server (``pd coordinator``): a single-threaded ZMQ ROUTER loop around ``state``.

The loop receives, decodes and hands each message to ``state.State`` (which matches prefill
READY with decode WAIT by pd_id, tracks instances and frees chunks), and sweeps what expired.
Nothing a peer sends can crash it: malformed input is logged, counted and answered with Error.

With ``auth: curve`` the socket is a CurveZMQ server that admits only the clients whose public
keys are in ``<keys_dir>/authorized`` (``pd.coordinator.curve``); a refused key is logged (with the peer's
address) and counted as ``auth_rejected``, a connection that fails the handshake (a client without
keys, or with another server key) as ``handshake_failed``. Listening beyond loopback without
auth is refused at start unless ``allow_insecure``.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from common.config import ConfigError, merge, url_host
from pd.config import CoordinatorConfig, load_yaml
from pd.coordinator.curve import CurveServer, check_bind, effective_auth
from pd.coordinator.identity import Peer, peer_of
from pd.coordinator.protocol import Error, ProtocolError, Query, decode_client, encode
from pd.coordinator.state import State, ThrottledLog

logger = logging.getLogger("pd.coordinator")

SWEEP_INTERVAL_S = 0.05      # expiry resolution; also how fast stop() is noticed
MAX_MESSAGE_BYTES = 64 << 20  # a READY of 100,000 keys is ~10 MB


def _user_id(frame: zmq.Frame) -> str | None:
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None


def _malformed_kind(reason: str) -> str:
    for prefix, kind in (("expected", "frames"), ("unsupported protocol tag", "tag")):
        if reason.startswith(prefix):
            return kind
    return "decode"


class Coordinator:
    """The coordinator server; binds ``cfg.address`` at construction (port 0: any free port).

    ``address``/``port`` are the bound endpoint. Run it with ``serve_forever()`` (blocking) or
    ``start_in_thread()``; ``stop()`` ends the loop and closes the socket. ``state`` holds the
    tables, ``counters`` (the same dict as ``state.counters``) what happened.
    """

    def __init__(self, cfg: CoordinatorConfig):
        check_bind(cfg)  # ConfigError: beyond loopback without auth
        self.cfg = cfg
        self._log = ThrottledLog()
        self.state = State(cfg, self._send, self._log)
        self.counters = self.state.counters
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._serving = False
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting agent keeps its identity
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # a larger frame: the peer is disconnected
        self._curve: CurveServer | None = None
        self._monitor: zmq.Socket | None = None
        try:
            if effective_auth(cfg) == "curve":
                self._curve = CurveServer(self._ctx, cfg.keys_dir)  # ConfigError for missing key files
                self._curve.apply(self._sock)
                self.state.identity.reserved = self._curve.allow.has_instance_key
                self._monitor = self._sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            if ":" in cfg.host:
                self._sock.setsockopt(zmq.IPV6, 1)
            self._sock.bind(f"tcp://{url_host(cfg.host or '*')}:{cfg.port or '*'}")  # EADDRINUSE if taken
        except (zmq.ZMQError, ConfigError):
            self._close()
            raise
        self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.port: int = int(self.address.rsplit(":", 1)[1])

    # ---- loop --------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until ``stop()`` is called (or a signal handler sets it); then close the socket."""
        self._serving = True
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        next_sweep = self._empty_at = time.monotonic()
        try:
            while not self._stop.is_set():
                wait_ms = max(0.0, next_sweep - time.monotonic()) * 1000
                events = dict(poller.poll(wait_ms))
                if self._monitor is not None and self._monitor in events:
                    self._on_monitor()
                if self._sock not in events:
                    self._empty_at = time.monotonic()
                else:
                    for _ in range(1000):  # drain, but bounded so the sweep stays on time
                        try:
                            frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=self._curve is None)
                        except zmq.Again:
                            self._empty_at = time.monotonic()
                            break
                        if self._curve is None:
                            self._dispatch(frames)
                        else:  # each message carries its connection's ZAP user id: the key that sent it
                            self._dispatch([f.bytes for f in frames], peer_of(_user_id(frames[-1])))
                now = time.monotonic()
                if now >= next_sweep:
                    try:
                        self.state.sweep(now)
                    except Exception:
                        self.counters["internal_errors"] += 1
                        self._log("sweep", logging.ERROR, "expiry sweep failed", exc_info=True)
                    next_sweep = now + SWEEP_INTERVAL_S
        finally:
            self._close()

    def start_in_thread(self) -> "Coordinator":
        """Run ``serve_forever`` in a daemon thread (tests, embedding); returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="pd-coordinator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the loop to end; joins the thread started by ``start_in_thread``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        elif not self._serving:
            self._close()

    def _close(self) -> None:
        if not self._sock.closed:
            if self._monitor is not None:
                try:
                    self._sock.disable_monitor()
                except zmq.ZMQError:
                    pass
                self._monitor.close(0)
            self._sock.close(0)
            if self._curve is not None:
                self._curve.stop()
            self._ctx.term()

    def _on_monitor(self) -> None:
        """Count and log connections that failed the CURVE handshake (keys refused: see pd.coordinator.curve)."""
        while self._monitor.poll(0):
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                continue
            self.counters["handshake_failed"] += 1
            code = event["value"]
            why = ("the client does not use CURVE (no keys configured?)"
                   if code == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH else
                   "the client's server key is not this coordinator's public key"
                   if code == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC else f"ZMTP protocol error {code:#x}")
            self._log("handshake", logging.WARNING,
                      f"a connection failed the CURVE handshake: {why} ({int(self.counters['handshake_failed'])} "
                      "so far)")

    # ---- messages ----------------------------------------------------------------------

    def _send(self, ident: bytes, msg) -> None:
        try:
            self._sock.send_multipart([ident, *encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # peer gone or its queue full: the message is dropped
            logger.debug("send %s to %r failed: %s", type(msg).__name__, ident[:32], e)

    def _dispatch(self, frames: list[bytes], peer: Peer | None = None) -> None:
        if len(frames) < 2:  # a ROUTER always prefixes the routing identity
            self.counters["malformed"] += 1
            self._log("empty", logging.WARNING, f"malformed message: {len(frames)} frames")
            return
        ident, body = frames[0], frames[1:]
        msg = None
        try:
            msg = decode_client(body)
            self._handle(ident, msg, time.monotonic(), peer)
        except ProtocolError as e:
            reason = str(e)[:300]
            self.counters["malformed"] += 1
            self._log("malformed-" + _malformed_kind(reason), logging.WARNING,
                      f"malformed message from {bytes(ident[:32])!r}: {reason}")
            self._send(ident, Error(reason))
        except Exception as e:  # a bug must not take the coordinator down
            self.counters["internal_errors"] += 1
            what = type(msg).__name__ if msg is not None else "message"
            self._log("internal", logging.ERROR, f"internal error handling {what}: {e!r}", exc_info=True)
            self._send(ident, Error(f"internal error handling {what}: {e}"[:300]))

    def _handle(self, ident: bytes, msg, now: float, peer: Peer | None) -> None:
        if self._curve is not None:
            if peer is None:  # CURVE without a user id: never seen; refused rather than trusted
                raise ProtocolError("the message carries no authenticated key")
            if isinstance(msg, Query):  # the socket's count, for the answer
                self.counters["auth_rejected"] = self._curve.rejected
        # Every message handled now arrived after the socket was last seen empty (``_empty_at``):
        # within a poll's 50 ms normally, seconds earlier after a stall (``pd.coordinator.first``).
        self.state.handle(ident, msg, now, peer, since=self._empty_at)


# ---- CLI ---------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``pd coordinator`` options to ``p``."""
    p.add_argument("--config", help="deployment YAML; its `coordinator` section is used (flags override it)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 5570)")
    p.add_argument("--entry-ttl-s", type=float, help="drop and free READY entries not consumed in this time")
    p.add_argument("--instance-ttl-s", type=float, help="mark instances down after this long without heartbeat")
    p.add_argument("--auth", choices=("auto", "none", "curve"),
                   help="curve: CurveZMQ, clients in KEYS_DIR/authorized only; auto (default): curve when --keys-dir is given")
    p.add_argument("--keys-dir", help="the directory `pd keys` made (coordinator.keys_dir)")
    p.add_argument("--allow-insecure", action="store_true", default=None,
                   help="listen beyond loopback without auth anyway (coordinator.allow_insecure)")


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    """The config ``args`` describe: defaults, then ``--config``'s coordinator section, then flags."""
    cfg = load_yaml(args.config).coordinator if getattr(args, "config", None) else CoordinatorConfig()
    over = {k: v for k, v in {"host": args.host, "port": args.port, "entry_ttl_s": args.entry_ttl_s,
                              "instance_ttl_s": args.instance_ttl_s, "auth": getattr(args, "auth", None),
                              "keys_dir": getattr(args, "keys_dir", None),
                              "allow_insecure": getattr(args, "allow_insecure", None)}.items() if v is not None}
    return merge(cfg, over, "coordinator.") if over else cfg


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (exit 0); bad config or a busy port: one line on stderr, exit 2."""
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"coordinator: {e}", file=sys.stderr)
        return 2
    try:
        coord = Coordinator(cfg)
    except ConfigError as e:
        print(f"coordinator: {e}", file=sys.stderr)
        return 2
    except zmq.ZMQError as e:
        if e.errno == zmq.EADDRINUSE:
            print(f"coordinator: port {cfg.port} on {cfg.host} is already in use", file=sys.stderr)
        else:
            print(f"coordinator: cannot listen on {cfg.bind_address}: {e}", file=sys.stderr)
        return 2
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: coord._stop.set())
    logger.info("listening on %s (entry ttl %gs, instance ttl %gs, auth %s)", coord.address, cfg.entry_ttl_s,
                cfg.instance_ttl_s, "curve: keys in " + cfg.keys_dir if coord._curve is not None else "none")
    coord.serve_forever()
    logger.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pd.coordinator.server``: the same as ``pd coordinator``."""
    parser = argparse.ArgumentParser(prog="pd coordinator", description="the pdkv ZMQ coordinator")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
