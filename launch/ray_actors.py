"""The Ray actors of ``pd launch --ray`` (made remote by launch/ray_launch.py, so this module
imports without Ray).

``ProcHost`` runs and supervises processes on its node, as ``launch.supervise`` does on one
host: each in its own session with its log in ``<run_dir>/<name>.log``, ready when its health
URL or port answers, stopped by process group. The control actor runs the coordinator, the
transport servers and the proxy (and changes the proxy's pools); each instance actor runs one
vLLM instance. ``Controls`` is the named mailbox through which ``pd scale`` asks the launcher
for other pool sizes and reads how it went. See docs/design.md ("A deployment on Ray").
"""
from __future__ import annotations

import ctypes
import json
import os
import queue
import signal
import stat
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import Future
from pathlib import Path

from launch.procs import ProcSpec, child_env, cpu_binds, pin_here
from launch.supervise import _group_alive, _readiness, _signal_group, exit_text, tail
from pd.proxy.pools import ADMIN_HEADER, POOLS_PATH


class SecretsDirError(RuntimeError):
    """A node's secrets directory is not ours alone."""


def install_secrets(directory: str, files: dict[str, bytes], exact: tuple[str, ...] = ()) -> None:
    """Write ``files`` (relative path -> bytes) under ``directory``, every directory 0700 and every
    file 0600, each replaced whole (written aside, renamed); refuse a directory that is a symlink,
    not ours or open to others. The directories ``exact`` (relative) then hold only the files given
    for them: the allow-list, where a key revoked on the launcher's host must not stay authorized
    from an earlier launch."""
    root = Path(directory)
    dirs = {root} | {root / Path(rel).parent for rel in files}
    for d in sorted(dirs, key=lambda p: len(p.parts)):
        try:
            d.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
        st = os.lstat(d)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise SecretsDirError(f"{d} is a symlink, not a directory or not owned by uid {os.getuid()}; "
                                  "remove it or set ray.secrets_dir elsewhere")
        if st.st_mode & 0o077:
            os.chmod(d, 0o700)
    for rel, data in files.items():
        path = root / rel
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    for rel in exact:
        d, keep = root / rel, {Path(f).name for f in files if Path(f).parent == Path(rel)}
        for entry in os.scandir(d) if d.is_dir() else ():
            if entry.name not in keep and not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)


PR_SET_PDEATHSIG = 1
# Looked up here, not in the child: between fork and exec of a threaded process (a Ray actor) a
# dlopen may wait for a loader lock another thread held at the fork, for ever.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(cpus: set[int] | None = None) -> None:
    """In the child: SIGTERM when the thread that started it ends (``Spawner``'s lives as long as
    its actor), so an actor killed or lost leaves no process behind; pinned to ``cpus`` if given."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
    if cpus:
        os.sched_setaffinity(0, cpus)


class Spawner:
    """Starts processes from one thread that lives as long as this process (a threaded actor's
    calls run on threads that may end, and would take their children's death signal with them)."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="pdkv-spawner", daemon=True).start()

    def _run(self) -> None:
        while True:
            argv, kw, done = self.jobs.get()
            cpus = kw.pop("cpus", None)
            try:
                done.set_result(subprocess.Popen(argv, preexec_fn=lambda: _die_with_parent(cpus), **kw))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                done.set_exception(e)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        done: Future = Future()
        self.jobs.put((argv, kw, done))
        return done.result()


class ProcHost:
    """Processes on one node (a threaded actor: ``poll`` answers while ``start`` waits); they
    get SIGTERM if the actor's process ends (killed, or its node's raylet gone)."""

    def __init__(self, run_dir: str):
        self.run_dir = Path(run_dir)
        self.procs: dict[str, tuple[ProcSpec, subprocess.Popen]] = {}
        self.lock = threading.Lock()
        self.stopping = False
        self.spawner = Spawner()

    def info(self, tp: int = 1) -> dict:
        """This node: its address, Ray node id, and the ``split`` core lists of a ``tp`` instance."""
        import ray

        ctx = ray.get_runtime_context()
        gpus = [str(g) for g in ray.get_gpu_ids()]
        return {"ip": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(),
                "split": cpu_binds("split", 1, [tp])[0], "gpus": ",".join(gpus), "pid": os.getpid()}

    def install(self, directory: str, files: dict[str, bytes], exact: tuple[str, ...] = ()) -> None:
        install_secrets(directory, files, exact)

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def start(self, spec: ProcSpec, append: bool = False) -> int:
        """Start ``spec``; its pid."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.lock:
            if self.stopping:
                raise RuntimeError(f"not starting {spec.name}: the deployment is stopping")
            with open(self.log_path(spec.name), "a" if append else "w") as out:
                proc = self.spawner.popen(spec.argv, env=child_env(spec), stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True, cpus=pin_here(spec))
            self.procs[spec.name] = (spec, proc)
        return proc.pid

    def wait_ready(self, name: str, timeout_s: float) -> float:
        """Seconds until ``name`` was ready; RuntimeError (its exit and log tail) if it exits or
        the timeout passes."""
        t0 = time.monotonic()
        spec, proc = self.procs[name]
        while not _readiness(spec)[0]:
            if proc.poll() is not None:
                raise RuntimeError(self._exit(name, proc))
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"{name} not ready after {timeout_s:.0f}s (vllm.startup_timeout_s); last lines "
                                   f"of {self.log_path(name)}:\n{tail(self.log_path(name))}")
            time.sleep(0.5)
        return time.monotonic() - t0

    def _exit(self, name: str, proc: subprocess.Popen) -> str:
        return f"{exit_text(name, proc.pid, proc.returncode, self.log_path(name))}; last lines of " \
               f"{self.log_path(name)}:\n{tail(self.log_path(name), 5)}"

    def poll(self) -> dict[str, str]:
        """The processes that exited: name -> how (exit code or signal, the log line saying why)."""
        with self.lock:
            return {n: self._exit(n, p) for n, (_, p) in self.procs.items() if p.poll() is not None}

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, (_, p) in self.procs.items()}

    def restart(self, name: str, timeout_s: float) -> float:
        """Start ``name`` again with the same command (its group killed first); seconds until ready."""
        spec, proc = self.procs[name]
        self._kill(proc, grace_s=0)
        self.start(spec, append=True)
        return self.wait_ready(name, timeout_s)

    def stop(self, name: str, grace_s: float = 15.0) -> None:
        """SIGTERM ``name``'s process group, SIGKILL after ``grace_s``."""
        with self.lock:
            item = self.procs.pop(name, None)
        if item is not None:
            self._kill(item[1], grace_s)

    def stop_all(self, grace_s: float = 15.0) -> None:
        """Stop every process, the last started first; start nothing after this."""
        with self.lock:
            self.stopping = True
            names = list(self.procs)[::-1]
        for name in names:
            self.stop(name, grace_s)

    @staticmethod
    def _kill(proc: subprocess.Popen, grace_s: float) -> None:
        _signal_group(proc, signal.SIGTERM if grace_s else signal.SIGKILL)
        deadline = time.monotonic() + grace_s
        while _group_alive(proc) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.1)
        if _group_alive(proc):
            _signal_group(proc, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _group_alive(proc) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.05)

    def pools(self, body: dict | None, admin_token_file: str, api_key_file: str = "") -> dict:
        """The proxy's ``/pd/pools`` (``pd.proxy.pools``): GET, or PUT ``body``; from this node."""
        spec = self.procs["proxy"][0]
        url = f"http://{spec.host if ':' not in spec.host else '[' + spec.host + ']'}:{spec.port}{POOLS_PATH}"
        headers = {ADMIN_HEADER: Path(admin_token_file).read_text().strip(), "Content-Type": "application/json"}
        if api_key_file:
            headers["Authorization"] = f"Bearer {Path(api_key_file).read_text().strip()}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "PUT")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())


class Controls:
    """The launcher's mailbox (a named actor): ``pd scale`` sets targets, the launcher reports."""

    def __init__(self, prefill: int, decode: int):
        self.targets = {"prefill": prefill, "decode": decode}
        self.serial = 0  # bumped by every request
        self.done = 0  # the last request the launcher finished
        self.lines: list[str] = []  # what the launcher said, in order

    def request(self, targets: dict[str, int]) -> int:
        self.targets.update(targets)
        self.serial += 1
        return self.serial

    def wanted(self) -> tuple[int, dict[str, int]]:
        return self.serial, dict(self.targets)

    def say(self, line: str) -> None:
        self.lines.append(line)

    def finished(self, serial: int) -> None:
        self.done = max(self.done, serial)

    def progress(self, since: int = 0) -> tuple[int, list[str]]:
        """(the last finished request, the launcher's lines from index ``since``)."""
        return self.done, self.lines[since:]
