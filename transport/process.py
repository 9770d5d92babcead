"""Starting a transport's server process (tests, benchmarks) and waiting until it listens."""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

from transport.base import TransportError


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_spec(spec: dict, host: str, port: int, log_file=None, timeout_s: float = 20.0):
    """Start a ``server_specs`` entry in this process's environment plus its own (tests and
    benchmarks; it is terminated if this process dies) and wait until ``host:port`` accepts;
    returns the ``subprocess.Popen``. TransportError if it exits or does not listen in time."""
    p = subprocess.Popen(spec["argv"], env={**os.environ, **spec["env"]}, stdin=subprocess.DEVNULL,
                         stdout=log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise TransportError(f"{spec['name']} exited with {p.returncode} at start: {' '.join(spec['argv'])}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return p
        except OSError:
            time.sleep(0.05)
    p.kill()
    raise TransportError(f"{spec['name']} did not listen on {host}:{port} within {timeout_s} s")
