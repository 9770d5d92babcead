"""Modes ``lmcache_mp_disk`` and ``lmcache_mp_cpu`` of ``pd bench ttft --device cuda`` (issue 19):
LMCache 0.5.3 in its multi-process (MP) mode, the one LMCache maintains for current vLLM.

LMCache's in-process connector (``LMCacheConnectorV1``, modes ``lmcache_disk``/``lmcache_cpu``)
restores KV to the wrong places on vLLM 0.26's packed KV layout (LMCache issue 4463); the MP
path is not affected (the issue's passing control). In MP mode the vLLM instance runs LMCache's
``LMCacheMPConnector`` (``CONNECTOR_MODULE``, named by ``kv_connector_module_path`` so that a
failed import stops the start instead of falling back to vLLM's older built-in class), which
talks over ZMQ to a separate LMCache server process (``python3 -m SERVER_MODULE``, same host: it
maps vLLM's KV through CUDA IPC handles and runs the copies itself). The server holds the tiers:

* ``lmcache_mp_cpu``: L1 (pinned DRAM) of ``--lmcache-cpu-gb``, LRU eviction, no L2;
* ``lmcache_mp_disk``: an L2 local-disk adapter (``--lmcache-l2``: fs_native, LMCache's C++ file
  workers, or fs, its aiofiles one) in a fresh directory, L1 only a write buffer
  (``--l2-store-policy skip_l1``: a chunk leaves L1 once L2 has it; eviction ``noop``), so a warm
  hit is read from the disk tier's files (through the page cache: fs_native reads without
  O_DIRECT by default, as pdkv's store does); fs_native's capacity is ``--lmcache-disk-gb``. The
  disk writes are asynchronous: before a warm send ``wait_stored`` polls the server's ``GET
  /status`` until nothing is left in L1 and no store is pending or in flight (a timeout is
  reported and fails the run; the warm send then goes anyway).

The server starts before the vLLM instance and must answer ``GET /healthcheck`` with 200 (only
after its engine and ZMQ socket are up), and stops after it (SIGINT: uvicorn's shutdown closes
the engine; SIGKILL after a grace period). It runs with ``--disable-metrics`` (no OpenTelemetry
SDK or exporter needed; opentelemetry-api is, scripts/gpu/prepare_lmcache.sh carries it), its log
in the mode's run directory (``SERVER_LOG``), where its "Retrieved N tokens in S seconds" lines
are the warm loads (``RETRIEVED``; the vLLM side logs none at INFO). Nothing here imports LMCache.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from launch.bench.common import free_ports
from launch.supervise import exit_text, tail

MP_MODES = ("lmcache_mp_disk", "lmcache_mp_cpu")
DISK_MODE = "lmcache_mp_disk"
SERVER_MODULE = "lmcache.v1.multiprocess.http_server"
CONNECTOR_MODULE = "lmcache.integration.vllm.lmcache_mp_connector"
L2_ADAPTERS = ("fs_native", "fs")  # LMCache 0.5.3's local-disk L2 adapters
HOST = "127.0.0.1"
SERVER_LOG = "lmcache-server.log"
MAX_WORKERS = 4  # the server's thread pools (STORE/RETRIEVE, LOOKUP), as issue 4463's passing MP control
START_TIMEOUT_S = 180.0  # imports, CUDA, the pinned L1 (16 GB pinned at the start)
STOP_GRACE_S = 20.0
RETRIEVED = re.compile(r"Retrieved (\d+) tokens in [\d.]+ seconds")


def server_argv(mode: str, args: argparse.Namespace, zmq_port: int, http_port: int, l2_path: str | Path) -> list[str]:
    """The server's command line for ``mode`` (flags of LMCache 0.5.3's http_server; others keep
    LMCache's defaults, e.g. the blake3 token hash)."""
    if mode not in MP_MODES:
        raise ValueError(f"{mode!r} is not an LMCache MP mode; allowed {', '.join(MP_MODES)}")
    argv = [sys.executable, "-m", SERVER_MODULE, "--host", HOST, "--port", str(zmq_port), "--http-host", HOST,
            "--http-port", str(http_port), "--chunk-size", str(args.lmcache_chunk_size),
            "--max-workers", str(MAX_WORKERS), "--l1-size-gb", f"{args.lmcache_cpu_gb:g}", "--disable-metrics"]
    if mode == DISK_MODE:
        if args.lmcache_l2 not in L2_ADAPTERS:
            raise ValueError(f"--lmcache-l2: {args.lmcache_l2!r} is not allowed; allowed {', '.join(L2_ADAPTERS)}")
        adapter = {"type": args.lmcache_l2, "base_path": str(Path(l2_path).resolve())}
        if args.lmcache_l2 == "fs_native":  # its capacity (LMCache's default 0: unbounded); fs has none
            adapter["max_capacity_gb"] = args.lmcache_disk_gb
        return argv + ["--eviction-policy", "noop", "--l2-store-policy", "skip_l1", "--l2-adapter", json.dumps(adapter)]
    return argv + ["--eviction-policy", "LRU"]


def kv_transfer_config(port: int) -> dict:
    """vLLM's ``--kv-transfer-config`` for the MP connector reaching the server's ZMQ ``port``."""
    return {"kv_connector": "LMCacheMPConnector", "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"lmcache.mp.host": f"tcp://{HOST}", "lmcache.mp.port": port}}


def instance_env() -> list[str]:
    """The vLLM instance's extra environment: no usage telemetry (the GPU machine has no network)."""
    return ["LMCACHE_TRACK_USAGE=false"]


def stored_left(status: dict) -> str:
    """What the server's ``GET /status`` says is still on its way to L2 ("" = nothing): objects in
    L1 (with skip_l1 a chunk leaves L1 once L2 has it), keys pending a store, stores in flight."""
    sm = status["storage_manager"]
    left = {"L1 objects": sm["l1_manager"]["total_object_count"],
            "stores pending": sm["store_controller"]["pending_keys_count"],
            "stores in flight": sm["store_controller"]["in_flight_task_count"]}
    return ", ".join(f"{k} {v}" for k, v in left.items() if v)


class MPServer:
    """One LMCache MP server process (its own process group, output in ``log_path``)."""

    def __init__(self, argv: list[str], zmq_port: int, http_port: int, log_path: str | Path):
        self.argv, self.zmq_port, self.http_port, self.log_path = argv, zmq_port, http_port, Path(log_path)
        self.url = f"http://{HOST}:{http_port}"
        self.env = {**os.environ, "LMCACHE_TRACK_USAGE": "false", "PYTHONUNBUFFERED": "1"}
        self.proc: subprocess.Popen | None = None
        self.started_s = 0.0

    def start(self, timeout_s: float = START_TIMEOUT_S) -> MPServer:
        """Start it and wait until it is healthy; stopped again if it is not."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_default_sigint)
        try:
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.started_s = time.perf_counter() - t0
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthcheck", timeout=2) as r:
                return r.status == 200
        except (OSError, http.client.HTTPException):  # not up yet (503 while its engine starts)
            return False

    def wait_healthy(self, timeout_s: float, poll_s: float = 0.5) -> None:
        """Until ``GET /healthcheck`` answers 200; RuntimeError (with the log's tail) if the server
        exits first or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the LMCache MP server did not start: {self.exited()}; the tail of "
                                   f"{self.log_path}:\n{tail(self.log_path, 30)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the LMCache MP server did not answer GET {self.url}/healthcheck with 200 within "
                                   f"{timeout_s:g} s; the tail of {self.log_path}:\n{tail(self.log_path, 30)}")
            time.sleep(poll_s)

    def status(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/status", timeout=5) as r:
            return json.loads(r.read())

    def wait_stored(self, timeout_s: float) -> dict:
        """Until the server's disk writes are done (``stored_left``): ``{"store_wait_ms": waited}``,
        or ``{"store_wait_error": why}`` after ``timeout_s`` (never waits longer). The poll slows
        from 50 ms to 0.5 s: each GET is a line of the server's access log."""
        t0, pause = time.monotonic(), 0.05
        while True:
            try:
                left = stored_left(self.status())
            except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as e:
                left = f"GET {self.url}/status failed: {type(e).__name__}: {e}"
            waited = time.monotonic() - t0
            if not left:
                return {"store_wait_ms": waited * 1e3}
            if waited >= timeout_s:
                return {"store_wait_error": f"LMCache's disk writes not done after {timeout_s:g} s ({left}); "
                                            "the warm send went anyway"}
            time.sleep(min(pause, timeout_s - waited))
            pause = min(pause * 1.5, 0.5)

    def exited(self) -> str:
        """'' while it runs, else how it ended and the log line that says why."""
        if self.proc is None or self.proc.poll() is None:
            return ""
        return exit_text("lmcache-server", self.proc.pid, self.proc.returncode, self.log_path)

    def stop(self, grace_s: float = STOP_GRACE_S) -> str:
        """SIGINT to its process group (uvicorn stops, its lifespan closes LMCache's engine), SIGKILL
        after ``grace_s``; what is left of the group is killed. How it ended."""
        if self.proc is None:
            return "not started"
        how = ""
        if self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc, signal.SIGKILL)
                how = f"killed: still running {grace_s:g} s after SIGINT"
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    return f"{how}; pid {self.proc.pid} survived SIGKILL"
        _signal_group(self.proc, signal.SIGKILL)  # a child it left behind
        return how or f"exit code {self.proc.returncode}"


def _default_sigint() -> None:
    """In the server's process before its exec: SIGINT back to its default. A shell without job
    control starts background commands with SIGINT ignored, children inherit that, and Python
    then never turns SIGINT into KeyboardInterrupt: the stop's SIGINT would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the server's pid
    except (ProcessLookupError, PermissionError):
        pass


def mp_server(mode: str, args: argparse.Namespace, run_dir: str | Path, l2_path: str | Path) -> MPServer:
    """The (unstarted) server of ``mode`` on free ports, its log in ``run_dir``, its L2 (disk mode)
    in ``l2_path``."""
    zmq_port, http_port = free_ports(HOST, 2)
    return MPServer(server_argv(mode, args, zmq_port, http_port, l2_path), zmq_port, http_port,
                    Path(run_dir) / SERVER_LOG)


def retrieved(log_path: str | Path) -> list[int]:
    """The tokens of every retrieve the server's log reports (one line per warm load)."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return []
    return [int(m.group(1)) for m in RETRIEVED.finditer(text) if int(m.group(1)) > 0]
