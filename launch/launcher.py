"""`pd launch`: start a deployment (coordinator, vLLM instances, proxy), watch it, stop it cleanly.

Everything is validated before anything starts (model directory, ports, cross-key checks). Each
child runs in its own process group (session) with stdout+stderr in ``<run_dir>/<name>.log``.
One progress line is printed per process as it becomes ready, then
``pdkv ready: proxy at URL (run dir: DIR)``. Ctrl-C/SIGTERM stops everything (process groups, so
vLLM's engine processes too), removes the shared-memory pool and exits 0. If a child dies, the
launcher says which one, its exit code and the tail of its log, stops the rest and exits 1.

Multi-host (``launch.topology``): ``--role control|prefill|decode`` (a comma list; default all)
or ``--host NAME`` (a ``hosts:`` entry) starts one host's share. The control share's proxy is
ready only once every instance it routes to answers, remote ones included; while it waits the
launcher names the ones that do not. An instance share first asks the coordinator whether it
answers and accepts this host's keys (refused keys stop the launch; a coordinator not up yet is
only reported, the instances connect when it comes).

Python API (integration tests, ``pd demo``)::

    with Deployment(dep) as d:        # start() + wait_ready(); stop() on exit
        requests.post(d.proxy_url + "/v1/completions", ...)
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from common.config import ConfigError, load, merge, to_dict
from launch.procs import (
    ProcSpec,
    check_model,
    check_ports,
    check_store,
    child_env,
    format_command,
    plan,
    plan_hosts,
)
from launch.topology import layout, share
from pd.config import DeploymentConfig, load_yaml

log = logging.getLogger("pd.launch")
Progress = Callable[[str], None]
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
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


def _ready(spec: ProcSpec) -> bool:
    return _readiness(spec)[0]


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
    import json
    import urllib.error

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
        from common.config import url_host
        from launch.topology import reach_host

        return f"http://{url_host(reach_host(self.dep.proxy.host))}:{self.dep.proxy.port}"

    @property
    def runs_instances(self) -> bool:
        return any(r in self.roles for r in ("prefill", "decode"))

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def _spawn(self, spec: ProcSpec, append: bool = False) -> None:
        # No Ctrl-C between Popen and recording the child, so none is left behind untracked; the
        # child must not inherit the blocked mask (it would then ignore our SIGTERM).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            with open(self.log_path(spec.name), "a" if append else "w") as out:
                proc = subprocess.Popen(spec.argv, env=child_env(spec), stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_unblock_signals)
            self.procs[spec.name] = (spec, proc)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        log.debug("started %s (pid %d): %s", spec.name, proc.pid, format_command(spec))

    def start(self, progress: Progress = print, wait: bool = True) -> "Deployment":
        """Check the ports, start every process, and (``wait``) wait until all are ready."""
        check_ports(self.dep, **self._share)
        own_keys(self.dep)
        check_keys(self.dep, self.roles)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

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


def resolve_auth(dep: DeploymentConfig) -> None:
    """``coordinator.auth: auto`` made ``curve`` or ``none``: curve with ``keys_dir`` when it is set;
    a one-host P/D deployment on loopback gets keys of its own (``pd.coordinator.curve.local_keys_dir``, made
    by ``own_keys`` at start), so no other user's process can publish, consume, abort or free KV
    transfers; otherwise none (which ``check_coordinator_security`` refuses beyond loopback)."""
    from pd.coordinator.curve import is_loopback, local_keys_dir

    c = dep.coordinator
    if c.auth != "auto":
        return
    if c.keys_dir:
        c.auth = "curve"
    elif dep.mode == "pd" and not dep.hosts and is_loopback(c.host) and is_loopback(c.advertise_host or c.host):
        c.auth, c.keys_dir = "curve", str(local_keys_dir(c.advertise_port or c.port))
    else:
        c.auth = "none"


def own_keys(dep: DeploymentConfig) -> None:
    """Make the keys ``resolve_auth`` chose for a one-host deployment (kept across launches)."""
    from pd.coordinator.curve import local_keys_dir, make_keys

    c = dep.coordinator
    if dep.mode == "pd" and c.auth == "curve" and c.keys_dir == str(local_keys_dir(c.advertise_port or c.port)):
        make_keys(c.keys_dir)


def check_keys(dep: DeploymentConfig, roles: list[str]) -> None:
    """The key files this host's share needs exist (ConfigError): the API token, and with
    ``coordinator.auth: curve`` the coordinator's and the clients' keys."""
    from pd.coordinator.curve import (
        effective_auth,
        load_client_keys,
        load_server_keys,
        read_token,
    )

    if dep.vllm.api_key_file:
        read_token(dep.vllm.api_key_file)
    if dep.proxy.api_key_file and "control" in roles:
        read_token(dep.proxy.api_key_file, "proxy.api_key_file")
    if dep.mode != "pd" or effective_auth(dep.coordinator) != "curve":
        return

    c = dep.coordinator
    if "control" in roles:
        load_server_keys(c.keys_dir)
    load_client_keys(c.keys_dir, c.client_key)  # the proxy, the instances' connectors


def exposure_warnings(dep: DeploymentConfig, specs: list[ProcSpec]) -> list[str]:
    """Instances (and the proxy) that listen beyond loopback without an API token."""
    from pd.coordinator.curve import is_loopback

    out = [] if dep.vllm.api_key_file else [
        f"{s.name} listens on {s.bind} without vllm.api_key_file: anyone who reaches {s.bind}:{s.port} can "
        "send it requests (pd keys DIR writes DIR/api.key)"
        for s in specs if "vllm.entrypoints" in " ".join(s.argv) and not is_loopback(s.bind or s.host)]
    out += [f"the proxy listens on {s.bind} without proxy.api_key_file: anyone who reaches {s.bind}:{s.port} "
            "can send it requests" for s in specs
            if s.name == "proxy" and not dep.proxy.api_key_file and not is_loopback(s.bind or s.host)]
    return out


def preflight(dep: DeploymentConfig, roles: list[str], progress: Progress = print, timeout_s: float = 3.0) -> None:
    """An instance share without the control role: does the coordinator answer, and take our keys?

    Refused keys or a failed handshake: ConfigError (nothing starts). Not answering yet: reported
    only (the control host may start later; the instances connect when it is up).
    """
    if dep.mode != "pd" or "control" in roles or not any(r in roles for r in ("prefill", "decode")):
        return
    from pd.coordinator.client import PROBE_HANDSHAKE, PROBE_OK, PROBE_REFUSED, probe
    from pd.coordinator.curve import client_keys_for

    address = layout(dep).coordinator_address
    status, why = probe(address, client_keys_for(dep.coordinator), timeout_s)
    if status in (PROBE_REFUSED, PROBE_HANDSHAKE):
        raise ConfigError(why)
    progress(f"pdkv: {why}" + ("" if status == PROBE_OK else "; starting the instances anyway (they connect when "
                                                              "it is up)"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pd launch``; each has a YAML key (in parentheses)."""
    p.add_argument("--config", help="deployment YAML (see examples/pd.yaml); flags override it")
    p.add_argument("--model", help="HF model directory (model)")
    p.add_argument("--prefill", type=int, metavar="N",
                   help="number of prefill instances (prefill.count); colocated: instances on the prefill ports")
    p.add_argument("--decode", type=int, metavar="M", help="number of decode instances (decode.count)")
    p.add_argument("--prefill-tp", type=int, metavar="T",
                   help="tensor-parallel size of each prefill instance (prefill.tp)")
    p.add_argument("--decode-tp", type=int, metavar="T", help="tensor-parallel size of each decode instance (decode.tp)")
    p.add_argument("--mode", choices=("pd", "colocated"), help="P/D or plain instances behind the proxy (mode)")
    p.add_argument("--port", type=int, help="proxy port (proxy.port)")
    p.add_argument("--run-dir", help="directory for the logs (run_dir); default runs/<time>")
    p.add_argument("--transport", choices=("shm", "mooncake", "infinistore", "none"),
                   help="connector.transport.kind; none = P/D through the store alone")
    p.add_argument("--transport-url", metavar="URL",
                   help="infinistore: the server, infinistore://host:port/?device=mlx5_0 "
                        "(connector.transport.infinistore.url)")
    p.add_argument("--store", choices=("none", "local", "hf3fs"), help="connector.store.backend")
    p.add_argument("--store-path", metavar="DIR[,DIR...]", help="connector.store.paths")
    p.add_argument("--store-size-gb", type=float, metavar="N", help="connector.store.size_gb")
    p.add_argument("--role", metavar="ROLES",
                   help="this host's share: all (default), or a comma list of control (coordinator, transport "
                        "servers, proxy), prefill, decode")
    p.add_argument("--host", metavar="NAME", help="this host's share is hosts.NAME's roles (a hosts: section)")
    p.add_argument("--keys-dir", metavar="DIR", help="coordinator.keys_dir (CurveZMQ keys; see pd keys)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key (VALUE is YAML), e.g. --set coordinator.advertise_host=10.0.0.1 "
                        "--set decode.urls=[http://10.0.0.2:8200]; repeatable, after the other flags")
    p.add_argument("--dry-run", action="store_true", help="print the commands with their environment and exit "
                   "(with a hosts: section and no --host, every host's; with --role all, each role's)")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON object per line")


def parse_set(items: list[str]) -> dict:
    """``["a.b=1", ...]`` as a nested override dict (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not k for k in key.strip().split(".")):
            raise ConfigError(f"--set: {item!r} is not KEY=VALUE (e.g. coordinator.advertise_host=10.0.0.1)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: {raw!r} is not a YAML value: {e}") from None
        if _key_type(key.strip()) is str and not isinstance(value, str) and not isinstance(value, (list, dict)):
            value = raw.strip()  # vllm.cpu_bind=0 means "0"
        d = out
        parts = key.strip().split(".")
        for k in parts[:-1]:
            d = d.setdefault(k, {})
            if not isinstance(d, dict):
                raise ConfigError(f"--set: {key} conflicts with an earlier --set")
        d[parts[-1]] = value
    return out


def _key_type(key: str):
    """The type of the config field at dotted ``key`` (None if there is none)."""
    import dataclasses
    import typing

    tp = DeploymentConfig
    for part in key.split("."):
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return None
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    return tp


def config_from_args(args: argparse.Namespace) -> DeploymentConfig:
    """The YAML config (or the defaults) with the flags applied; ConfigError on any bad value."""
    dep = load_yaml(args.config) if args.config else load(DeploymentConfig, {})
    over: dict = {}
    for key, value in (("model", args.model), ("mode", args.mode), ("run_dir", args.run_dir)):
        if value is not None:
            over[key] = value
    for group in ("prefill", "decode"):
        g = {k: v for k, v in (("count", getattr(args, group, None)), ("tp", getattr(args, f"{group}_tp", None)))
             if v is not None}
        if g:
            over[group] = g
    if args.port is not None:
        over["proxy"] = {"port": args.port}
    if getattr(args, "keys_dir", None):
        over["coordinator"] = {"keys_dir": args.keys_dir}
    conn: dict = {}
    if getattr(args, "transport", None) is not None:
        conn["transport"] = {"kind": args.transport}
    if getattr(args, "transport_url", None):
        if (args.transport or dep.connector.transport.kind) != "infinistore":
            raise ConfigError("--transport-url: only for --transport infinistore (the InfiniStore server's "
                              "infinistore://host:port/?device=... URL)")
        conn.setdefault("transport", {})["infinistore"] = {"url": args.transport_url}
    store = {k: v for k, v in (("backend", getattr(args, "store", None)),
                               ("size_gb", getattr(args, "store_size_gb", None))) if v is not None}
    if getattr(args, "store_path", None):
        store["paths"] = [p for p in args.store_path.split(",") if p]
    if store:
        conn["store"] = store
    if conn:
        over["connector"] = conn
    dep = merge(dep, over)
    if getattr(args, "set", None):
        dep = merge(dep, parse_set(args.set))
    dep.model = str(check_model(dep.model))
    resolve_auth(dep)
    # the instances and the proxy may run elsewhere than this cwd
    for section, key in ((dep.proxy, "api_key_file"), (dep.coordinator, "keys_dir"), (dep.vllm, "api_key_file")):
        if getattr(section, key):
            setattr(section, key, str(Path(getattr(section, key)).expanduser().resolve()))
    if dep.mode == "pd":
        check_store(dep.connector.store, make=not getattr(args, "dry_run", False))
    return dep


def _print_specs(specs: list[ProcSpec], as_json: bool, share_: str = "", roles: list[str] = ()) -> None:
    import json

    for spec in specs:
        if as_json:
            print(json.dumps({"host": share_, "roles": list(roles), "name": spec.name, "argv": spec.argv,
                              "env": spec.env, "health_url": spec.health_url, "port": spec.port,
                              "bind": spec.bind or spec.host}))
        else:
            print(format_command(spec))


def dry_run(dep: DeploymentConfig, roles: str | None, host: str | None, as_json: bool = False) -> None:
    """Print the commands: this share's, or (a hosts: section without --host) every host's."""
    if dep.hosts and host is None and roles is None:
        for name, host_roles, specs in plan_hosts(dep):
            h = dep.hosts[name]
            if not as_json:
                print(f"### host {name} ({h.address}): {', '.join(host_roles)}; run there: "
                      f"pd launch --config FILE --host {name}")
            _print_specs(specs, as_json, name, host_roles)
        return
    label, parsed = share(dep, roles, host)
    specs = plan(dep, roles, host) if (roles is not None or host is not None) else plan(dep)
    _print_specs(specs, as_json, label, parsed)


def run(args: argparse.Namespace) -> int:
    """``pd launch``: 0 after a clean stop (Ctrl-C/SIGTERM), 1 if a child died, 2 on bad config."""
    dep = config_from_args(args)
    roles, host = getattr(args, "role", None), getattr(args, "host", None)
    if args.dry_run:
        dry_run(dep, roles, host, getattr(args, "json", False))
        return 0
    deployment = Deployment(dep, roles, host) if (roles is not None or host is not None) else Deployment(dep)
    check_ports(dep, **deployment._share)
    own_keys(dep)
    check_keys(dep, deployment.roles)
    for line in exposure_warnings(dep, deployment.specs):
        print(f"pdkv: warning: {line}", file=sys.stderr, flush=True)
    preflight(dep, deployment.roles, progress=lambda line: print(line, flush=True))

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    for sig in _SIGNALS:
        signal.signal(sig, on_signal)
    code = 0
    try:
        deployment.start(progress=lambda line: print(line, flush=True))
        if "control" in deployment.roles:
            print(f"pdkv ready: proxy at {deployment.proxy_url} (run dir: {deployment.run_dir})", flush=True)
        else:
            print(f"pdkv ready: {', '.join(s.name for s in deployment.specs)} (run dir: {deployment.run_dir})",
                  flush=True)
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
