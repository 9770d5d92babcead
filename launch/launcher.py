"""`pd launch`: start a deployment (coordinator, vLLM instances, proxy), watch it, stop it cleanly.

Everything is validated before anything starts (model directory, ports, cross-key checks). Each
child runs in its own process group (session) with stdout+stderr in ``<run_dir>/<name>.log``.
One progress line is printed per process as it becomes ready, then
``pdkv ready: proxy at URL (run dir: DIR)``. Ctrl-C/SIGTERM stops everything (process groups, so
vLLM's engine processes too), removes the shared-memory pool and exits 0. If a child dies, the
launcher says which one, its exit code and the tail of its log, stops the rest and exits 1.

Python API (integration tests, ``pd demo``)::

    with Deployment(dep) as d:        # start() + wait_ready(); stop() on exit
        requests.post(d.proxy_url + "/v1/completions", ...)
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from launch.procs import ProcSpec, check_model, check_ports, check_store, child_env, format_command, plan
from pd.config import DeploymentConfig, load, load_yaml, merge, to_dict

log = logging.getLogger("pd.launch")
Progress = Callable[[str], None]
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ChildDied(RuntimeError):
    """A child exited (or never became ready); the message says which, how, and its log's tail."""


def tail(path: Path, n: int = 20) -> str:
    """The last ``n`` lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _ready(spec: ProcSpec) -> bool:
    if spec.health_url:
        try:
            with urllib.request.urlopen(spec.health_url, timeout=2) as r:
                return r.status == 200
        except Exception:  # noqa: BLE001 - not up yet, in any way
            return False
    if spec.port:
        try:
            with socket.create_connection((spec.host, spec.port), timeout=1):
                return True
        except OSError:
            return False
    return True


def default_run_dir() -> Path:
    """``runs/<timestamp>`` under the current directory, made unique."""
    base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    path, k = base, 1
    while path.exists():
        path, k = base.with_name(f"{base.name}-{k}"), k + 1
    return path


class Deployment:
    """A deployment's processes; also a context manager for tests and scripts."""

    def __init__(self, dep: DeploymentConfig):
        self.dep = dep
        self.specs = plan(dep)  # validates cross-key rules
        self.run_dir = Path(dep.run_dir).resolve() if dep.run_dir else default_run_dir().resolve()
        self.procs: dict[str, tuple[ProcSpec, subprocess.Popen]] = {}
        self._stopping = False
        self._t0 = time.monotonic()

    @property
    def proxy_url(self) -> str:
        return f"http://{self.dep.proxy.host}:{self.dep.proxy.port}"

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def _spawn(self, spec: ProcSpec) -> None:
        # No Ctrl-C between Popen and recording the child, so none is left behind untracked; the
        # child must not inherit the blocked mask (it would then ignore our SIGTERM).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            with open(self.log_path(spec.name), "w") as out:
                proc = subprocess.Popen(spec.argv, env=child_env(spec), stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_unblock_signals)
            self.procs[spec.name] = (spec, proc)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        log.debug("started %s (pid %d): %s", spec.name, proc.pid, format_command(spec))

    def start(self, progress: Progress = print, wait: bool = True) -> "Deployment":
        """Check the ports, start every process, and (``wait``) wait until all are ready."""
        check_ports(self.dep)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.dep), sort_keys=False))
        self._t0 = time.monotonic()
        progress(f"pdkv: starting {self.dep.mode} deployment: {', '.join(s.name for s in self.specs)} "
                 f"(logs in {self.run_dir})")
        for spec in self.specs:  # the proxy's /health answers 200 only once its upstreams do
            self._spawn(spec)
        if wait:
            self.wait_ready(progress)
        return self

    def wait_ready(self, progress: Progress = print, timeout_s: float | None = None) -> None:
        """Wait until every process is ready; ChildDied if one exits or the startup timeout passes."""
        timeout_s = self.dep.vllm.startup_timeout_s if timeout_s is None else timeout_s
        pending = [spec for spec, _ in self.procs.values()]
        deadline = time.monotonic() + timeout_s
        while pending:
            self.check_children()
            for spec in list(pending):
                if _ready(spec):
                    where = f" on port {spec.port}" if spec.port else ""
                    progress(f"  {spec.name:<14} ready{where} ({time.monotonic() - self._t0:.0f}s)")
                    pending.remove(spec)
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                last = pending[0].name
                raise ChildDied(f"not ready after {timeout_s:.0f}s (vllm.startup_timeout_s): {names}; "
                                f"last lines of {self.log_path(last)}:\n{tail(self.log_path(last))}")
            if pending:
                time.sleep(0.5)

    def check_children(self) -> None:
        """ChildDied if any child has exited (unless we are stopping)."""
        if self._stopping:
            return
        for name, (_, proc) in self.procs.items():
            code = proc.poll()
            if code is not None:
                raise ChildDied(f"{name} (pid {proc.pid}) exited with code {code}; last lines of "
                                f"{self.log_path(name)}:\n{tail(self.log_path(name))}")

    def watch(self, interval_s: float = 0.5) -> None:
        """Block until a child dies (ChildDied) or we are interrupted."""
        while True:
            self.check_children()
            time.sleep(interval_s)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every process group (proxy first), SIGKILL what is left after ``grace_s``; remove the pool."""
        self._stopping = True
        procs = list(self.procs.values())[::-1]
        for spec, proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for spec, proc in procs:
            while _group_alive(proc) and time.monotonic() < deadline:
                proc.poll()  # reap the leader so the group can empty
                time.sleep(0.1)
            if _group_alive(proc):
                log.warning("%s did not stop within %.0fs; killing it", spec.name, grace_s)
                _signal_group(proc, signal.SIGKILL)
            kill_deadline = time.monotonic() + 5
            while _group_alive(proc) and time.monotonic() < kill_deadline:
                proc.poll()
                time.sleep(0.05)
            if _group_alive(proc):
                log.error("%s (pid %d) or a process of its group survived SIGKILL", spec.name, proc.pid)
        self._cleanup_pool()

    def _cleanup_pool(self) -> None:
        if self.dep.mode != "pd" or self.dep.connector.transport.kind != "shm":
            return
        try:
            from transport.shm import cleanup_pool
        except ImportError as e:
            log.warning("cannot remove the shm pool: %s", e)
            return
        cleanup_pool(self.dep.connector.transport)

    def __enter__(self) -> "Deployment":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(proc: subprocess.Popen) -> bool:
    """Whether the child or anything left in its process group still runs (zombies do not count)."""
    if proc.poll() is None:
        return True
    try:
        os.killpg(proc.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return True  # no /proc: trust killpg
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == proc.pid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


# ---- CLI ---------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pd launch``; each has a YAML key (in parentheses)."""
    p.add_argument("--config", help="deployment YAML (see examples/pd.yaml); flags override it")
    p.add_argument("--model", help="HF model directory (model)")
    p.add_argument("--prefill", type=int, metavar="N",
                   help="number of prefill instances (prefill.count); colocated: instances on the prefill ports")
    p.add_argument("--decode", type=int, metavar="M", help="number of decode instances (decode.count)")
    p.add_argument("--mode", choices=("pd", "colocated"), help="P/D or plain instances behind the proxy (mode)")
    p.add_argument("--port", type=int, help="proxy port (proxy.port)")
    p.add_argument("--run-dir", help="directory for the logs (run_dir); default runs/<time>")
    p.add_argument("--transport", choices=("shm", "none"),
                   help="connector.transport.kind; none = P/D through the store alone")
    p.add_argument("--store", choices=("none", "local", "hf3fs"), help="connector.store.backend")
    p.add_argument("--store-path", metavar="DIR[,DIR...]", help="connector.store.paths")
    p.add_argument("--store-size-gb", type=float, metavar="N", help="connector.store.size_gb")
    p.add_argument("--dry-run", action="store_true", help="print the commands with their environment and exit")


def config_from_args(args: argparse.Namespace) -> DeploymentConfig:
    """The YAML config (or the defaults) with the flags applied; ConfigError on any bad value."""
    dep = load_yaml(args.config) if args.config else load(DeploymentConfig, {})
    over: dict = {}
    for key, value in (("model", args.model), ("mode", args.mode), ("run_dir", args.run_dir)):
        if value is not None:
            over[key] = value
    if args.prefill is not None:
        over["prefill"] = {"count": args.prefill}
    if args.decode is not None:
        over["decode"] = {"count": args.decode}
    if args.port is not None:
        over["proxy"] = {"port": args.port}
    conn: dict = {}
    if getattr(args, "transport", None) is not None:
        conn["transport"] = {"kind": args.transport}
    store = {k: v for k, v in (("backend", getattr(args, "store", None)),
                               ("size_gb", getattr(args, "store_size_gb", None))) if v is not None}
    if getattr(args, "store_path", None):
        store["paths"] = [p for p in args.store_path.split(",") if p]
    if store:
        conn["store"] = store
    if conn:
        over["connector"] = conn
    dep = merge(dep, over)
    dep.model = str(check_model(dep.model))
    if dep.mode == "pd":
        check_store(dep.connector.store)
    return dep


def run(args: argparse.Namespace) -> int:
    """``pd launch``: 0 after a clean stop (Ctrl-C/SIGTERM), 1 if a child died, 2 on bad config."""
    dep = config_from_args(args)
    deployment = Deployment(dep)
    if args.dry_run:
        for spec in deployment.specs:
            print(format_command(spec))
        return 0
    check_ports(dep)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    for sig in _SIGNALS:
        signal.signal(sig, on_signal)
    code = 0
    try:
        deployment.start(progress=lambda line: print(line, flush=True))
        print(f"pdkv ready: proxy at {deployment.proxy_url} (run dir: {deployment.run_dir})", flush=True)
        deployment.watch()
    except KeyboardInterrupt:
        print("pdkv: stopping", flush=True)
    except ChildDied as e:
        print(f"pdkv: {e}", file=sys.stderr, flush=True)
        print("pdkv: stopping the rest", file=sys.stderr, flush=True)
        code = 1
    finally:
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        deployment.stop()
    print("pdkv: stopped", flush=True)
    return code
