"""Supervision of a deployment's processes: start them, wait until each is ready, watch, stop.

Each child runs in its own process group (session) with stdout+stderr in ``<run_dir>/<name>.log``.
One progress line is printed per process as it becomes ready. Stopping signals whole process
groups (so vLLM's engine processes too) and removes the shared-memory pool. A child that dies
raises ``ChildDied`` naming it, how it ended, the log line that says why and its log's tail.

The control share's proxy is ready only once every instance it routes to answers, remote ones
included; while it waits the names of the ones that do not are reported. ``pd launch``
(``launch.launcher``) drives this; the Python API (integration tests, ``pd demo``)::

    with Deployment(dep) as d:        # start() + wait_ready(); stop() on exit
        requests.post(d.proxy_url + "/v1/completions", ...)
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml

from common.config import to_dict, url_host
from launch.auth import check_keys, own_keys, resolve_auth
from launch.procs import ProcSpec, check_ports, child_env, format_command, pin_here, plan
from launch.topology import reach_host, share
from pd.config import DeploymentConfig
from transport.shm_index import cleanup_pool

log = logging.getLogger("pd.launch")
Progress = Callable[[str], None]
SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPORT_EVERY_S = 15.0  # how often the launcher says what the proxy still waits for


class ChildDied(RuntimeError):
    """A child exited (or never became ready); the message says which, how, and its log's tail."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LEVEL = re.compile(r"(?:^|\s)(?:ERROR|CRITICAL)\b")
_ABOVE = re.compile(r"(?i)(root cause|see) above")
_EXC = re.compile(r"\b(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b(?::.*)?$")


def why(path: Path) -> str:
    """The log line of ``path`` that most likely says why the process ended, with its line number:
    the last exception line (``ValueError: ...``) that does not point elsewhere (vLLM's "See root
    cause above"), else the last ERROR/CRITICAL line; "" if none."""
    try:
        lines = [_ANSI.sub("", s).strip() for s in path.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    for test in (lambda s: _EXC.search(s) and not _ABOVE.search(s), _EXC.search,
                 _LEVEL.search):
        for i in range(len(lines) - 1, -1, -1):
            if lines[i] and test(lines[i]):
                return f"{lines[i][:400]} ({path}:{i + 1})"
    return ""


def exit_text(name: str, pid: int, code: int, log_file: Path) -> str:
    """``name (pid P) exited with code C`` or ``... was killed by SIGKILL``, and the line saying why."""
    how = f"exited with code {code}"
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    reason = why(log_file)
    return f"{name} (pid {pid}) {how}" + (f"; why: {reason}" if reason else "")


def tail(path: Path, n: int = 20) -> str:
    """The last ``n`` lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _readiness(spec: ProcSpec) -> tuple[bool, str]:
    """(ready, what it still waits for)."""
    if spec.health_url and spec.upstreams:
        return _proxy_readiness(spec.health_url)
    if spec.health_url:
        try:
            with urllib.request.urlopen(spec.health_url, timeout=2) as r:
                return r.status == 200, ""
        except Exception:  # noqa: BLE001 - not up yet, in any way
            return False, ""
    if spec.port:
        try:
            with socket.create_connection((spec.host, spec.port), timeout=1):
                return True, ""
        except OSError:
            return False, ""
    return True, ""


def _proxy_readiness(url: str) -> tuple[bool, str]:
    """The proxy is ready when its /health lists every upstream as up (remote instances too)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read()
    except urllib.error.HTTPError as e:  # 503: some role has no healthy instance yet
        body = e.read()
    except Exception:  # noqa: BLE001 - the proxy itself is not up yet
        return False, ""
    try:
        checks = json.loads(body)["upstreams"]
    except (ValueError, KeyError, TypeError):
        return False, ""
    down = [f"{role} {u}" for role, urls in checks.items() for u, ok in urls.items() if not ok]
    return not down, ("instances not answering /health: " + ", ".join(down)) if down else ""


def default_run_dir(label: str = "") -> Path:
    """``runs/<timestamp>[-<label>]`` under the current directory, made unique."""
    base = Path("runs") / (time.strftime("%Y%m%d-%H%M%S") + (f"-{label}" if label else ""))
    path, k = base, 1
    while path.exists():
        path, k = base.with_name(f"{base.name}-{k}"), k + 1
    return path


class Deployment:
    """A deployment's processes (this host's share: ``roles`` or ``host``, default everything);
    also a context manager for tests and scripts."""

    def __init__(self, dep: DeploymentConfig, roles: str | list[str] | None = None, host: str | None = None):
        self.dep = dep
        resolve_auth(dep)
        self.label, self.roles = share(dep, roles, host)
        self.host = host
        self._share = {} if roles is None and host is None else {"roles": roles, "host": host}
        self.specs = plan(dep, **self._share)  # validates cross-key rules
        self.run_dir = Path(dep.run_dir).resolve() if dep.run_dir else default_run_dir(self.label).resolve()
        self.procs: dict[str, tuple[ProcSpec, subprocess.Popen]] = {}
        self._stopping = False
        self._ready = False  # every process was ready once: non-critical ones may go away now
        self._gone: set[str] = set()  # non-critical processes that exited (reported once)
        self._t0 = time.monotonic()

    @property
    def proxy_url(self) -> str:
        return f"http://{url_host(reach_host(self.dep.proxy.host))}:{self.dep.proxy.port}"

    @property
    def runs_instances(self) -> bool:
        return any(r in self.roles for r in ("prefill", "decode"))

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def _spawn(self, spec: ProcSpec, append: bool = False) -> None:
        # No Ctrl-C between Popen and recording the child, so none is left behind untracked; the
        # child must not inherit the blocked mask (it would then ignore our SIGTERM).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            with open(self.log_path(spec.name), "a" if append else "w") as out:
                cpus = pin_here(spec)
                proc = subprocess.Popen(spec.argv, env=child_env(spec), stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=lambda: _unblock_signals(cpus))
            self.procs[spec.name] = (spec, proc)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        log.debug("started %s (pid %d): %s", spec.name, proc.pid, format_command(spec))

    def check(self) -> None:
        """This share's ports are free and its key files exist (making a one-host deployment's keys
        and its instances' own keys, which the instances' commands then name)."""
        check_ports(self.dep, **self._share)
        if own_keys(self.dep, [s.name for s in self.specs if "--kv-transfer-config" in s.argv]):
            self.specs = plan(self.dep, **self._share)
        check_keys(self.dep, self.roles)

    def start(self, progress: Progress = print, wait: bool = True) -> "Deployment":
        """Check the ports, start every process, and (``wait``) wait until all are ready."""
        self.check()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        name = f"config.{self.label}.yaml" if self.label else "config.yaml"  # hosts may share a run_dir
        (self.run_dir / name).write_text(yaml.safe_dump(to_dict(self.dep), sort_keys=False))
        self._t0 = time.monotonic()
        what = f"{self.dep.mode} deployment" + (f" ({self.label}: {', '.join(self.roles)})" if self.label else "")
        progress(f"pdkv: starting {what}: {', '.join(s.name for s in self.specs)} (logs in {self.run_dir})")
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
        waiting: dict[str, str] = {}  # name -> what it waits for (remote instances), as last reported
        next_report = time.monotonic() + REPORT_EVERY_S
        while pending:
            self.check_children()
            for spec in list(pending):
                ok, why = _readiness(spec)
                waiting[spec.name] = why
                if ok:
                    where = f" on port {spec.port}" if spec.port else ""
                    progress(f"  {spec.name:<14} ready{where} ({time.monotonic() - self._t0:.0f}s)")
                    pending.remove(spec)
            now = time.monotonic()
            if pending and now > deadline:
                names = ", ".join(s.name for s in pending)
                last = pending[0].name
                remote = "".join(f"\n{s.name}: {waiting[s.name]}" for s in pending if waiting.get(s.name))
                raise ChildDied(f"not ready after {timeout_s:.0f}s (vllm.startup_timeout_s): {names}{remote}; "
                                f"last lines of {self.log_path(last)}:\n{tail(self.log_path(last))}")
            if pending and now >= next_report:
                next_report = now + REPORT_EVERY_S
                for s in pending:
                    if waiting.get(s.name):
                        progress(f"  {s.name:<14} waiting: {waiting[s.name]} ({now - self._t0:.0f}s)")
            if pending:
                time.sleep(0.5)
        self._ready = True

    def check_children(self) -> None:
        """ChildDied if any child has exited (unless we are stopping)."""
        if self._stopping:
            return
        for name, (spec, proc) in self.procs.items():
            code = proc.poll()
            if code is not None and self._ready and not spec.critical:
                if name not in self._gone:
                    self._gone.add(name)
                    print(f"pdkv: {exit_text(name, proc.pid, code, self.log_path(name))}; the rest goes on without it "
                          f"(transfers fall back to the store, then recompute); last lines of "
                          f"{self.log_path(name)}:\n{tail(self.log_path(name), 5)}", file=sys.stderr, flush=True)
                continue
            if code is not None:
                raise ChildDied(f"{exit_text(name, proc.pid, code, self.log_path(name))}; last lines of "
                                f"{self.log_path(name)}:\n{tail(self.log_path(name))}")

    def respawn(self, name: str, progress: Progress = print, timeout_s: float | None = None) -> None:
        """Start child ``name`` again with the same command (SIGKILL its group first if it still
        runs) and wait until it is ready: fault tests restart what they killed this way."""
        spec, proc = self.procs[name]
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        while _group_alive(proc):
            time.sleep(0.05)
        self._spawn(spec, append=True)
        deadline = time.monotonic() + (self.dep.vllm.startup_timeout_s if timeout_s is None else timeout_s)
        while not _readiness(spec)[0]:
            new = self.procs[name][1]
            if new.poll() is not None:
                raise ChildDied(f"{name} (pid {new.pid}) exited with code {new.returncode} when restarted; last "
                                f"lines of {self.log_path(name)}:\n{tail(self.log_path(name))}")
            if time.monotonic() > deadline:
                raise ChildDied(f"{name} not ready again in time; last lines of {self.log_path(name)}:\n"
                                f"{tail(self.log_path(name))}")
            time.sleep(0.3)
        progress(f"  {name:<14} ready again ({time.monotonic() - self._t0:.0f}s)")

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
        if self.dep.mode != "pd" or self.dep.connector.transport.kind != "shm" or not self.runs_instances:
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


def serve_until_stopped(start: Callable[[], str], watch: Callable[[], None], stop: Callable[[], None]) -> int:
    """Run a launch: ``start()`` (its ready line is printed), ``watch()`` until Ctrl-C/SIGTERM or a
    ``ChildDied``, then ``stop()``; 0 after a clean stop, 1 if a child died (``pd launch``)."""

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    for sig in SIGNALS:
        signal.signal(sig, on_signal)
    code = 0
    try:
        print(start(), flush=True)
        watch()
    except KeyboardInterrupt:
        print("pdkv: stopping", flush=True)
    except ChildDied as e:
        print(f"pdkv: {e}", file=sys.stderr, flush=True)
        print("pdkv: stopping the rest", file=sys.stderr, flush=True)
        code = 1
    finally:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        stop()
    print("pdkv: stopped", flush=True)
    return code


def _unblock_signals(cpus: set[int] | None = None) -> None:
    """In the child before it runs: our blocked signals unblocked; pinned to ``cpus`` if given."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    if cpus:
        os.sched_setaffinity(0, cpus)


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
