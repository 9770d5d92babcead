"""`pd launch`: start a deployment (coordinator, vLLM instances, proxy), watch it, stop it cleanly.

Each child runs in its own process group with its log in the run directory. Progress is printed
as instances come up; ``pdkv ready: proxy at URL`` when all are. Ctrl-C/SIGTERM stops everything
(children included) and removes the shared-memory pool. If a child dies, the launcher says which
one, its exit code and the tail of its log, stops the rest and exits 1.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pd.config import ConfigError, DeploymentConfig, load, load_yaml, merge, to_dict
from launch.procs import ProcSpec, check_model, check_ports, child_env, format_command, plan


class ChildDied(RuntimeError):
    pass


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


class Deployment:
    """A running deployment; also a context manager for tests and scripts."""

    def __init__(self, dep: DeploymentConfig):
        self.dep = dep
        self.specs = plan(dep)
        self.run_dir = Path(dep.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
        self.procs: dict[str, tuple[ProcSpec, subprocess.Popen]] = {}
        self._stopping = False

    @property
    def proxy_url(self) -> str:
        return f"http://{self.dep.proxy.host}:{self.dep.proxy.port}"

    def _spawn(self, spec: ProcSpec) -> None:
        log = open(self.run_dir / f"{spec.name}.log", "w")
        proc = subprocess.Popen(spec.argv, env=child_env(spec), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[spec.name] = (spec, proc)

    def check_children(self) -> None:
        for name, (spec, proc) in self.procs.items():
            code = proc.poll()
            if code is not None and not self._stopping:
                raise ChildDied(f"{name} exited with code {code}; last lines of {self.run_dir / (name + '.log')}:\n"
                                + _tail(self.run_dir / f"{name}.log"))

    def _wait_healthy(self, specs: list[ProcSpec], t0: float, progress) -> None:
        pending = {s.name: s for s in specs if s.health_url}
        deadline = t0 + self.dep.vllm.startup_timeout_s
        while pending:
            self.check_children()
            for name, spec in list(pending.items()):
                if _healthy(spec.health_url):
                    progress(f"  {name:<12} ready on port {spec.port} ({time.monotonic() - t0:.0f}s)")
                    del pending[name]
            if time.monotonic() > deadline:
                raise ChildDied(f"not ready after {self.dep.vllm.startup_timeout_s:.0f}s: {', '.join(pending)}")
            time.sleep(0.5)

    def start(self, progress=print) -> "Deployment":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(_yaml(to_dict(self.dep)))
        t0 = time.monotonic()
        *backends, proxy = self.specs
        progress(f"pdkv: starting {self.dep.mode} deployment ({len(backends)} processes + proxy), logs in {self.run_dir}")
        for spec in backends:
            self._spawn(spec)
        self._wait_healthy(backends, t0, progress)
        self._spawn(proxy)
        self._wait_healthy([proxy], t0, progress)
        return self

    def stop(self, grace_s: float = 15.0) -> None:
        self._stopping = True
        for _, proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for _, proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _, proc in self.procs.values():
            try:  # the group too: vLLM's engine and worker processes
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        if self.dep.mode == "pd" and self.dep.connector.transport.kind == "shm":
            from transport.shm import cleanup_pool

            cleanup_pool(self.dep.connector.transport)

    def __enter__(self) -> "Deployment":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


# ---- CLI ---------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="deployment YAML (see examples/pd.yaml); flags override it")
    p.add_argument("--model", help="HF model directory")
    p.add_argument("--prefill", type=int, help="number of prefill instances (colocated: instances)")
    p.add_argument("--decode", type=int, help="number of decode instances")
    p.add_argument("--mode", choices=("pd", "colocated"))
    p.add_argument("--port", type=int, help="proxy port")
    p.add_argument("--run-dir", help="directory for logs (default runs/<time>)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")


def config_from_args(args) -> DeploymentConfig:
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
    return merge(dep, over)


def run(args) -> int:
    dep = config_from_args(args)
    dep.model = str(check_model(dep.model))
    deployment = Deployment(dep)
    if args.dry_run:
        for spec in deployment.specs:
            print(format_command(spec))
        return 0
    check_ports(dep)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        deployment.start()
        print(f"pdkv ready: proxy at {deployment.proxy_url} (run dir: {deployment.run_dir})", flush=True)
        while True:
            deployment.check_children()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("pdkv: stopping", flush=True)
    except ChildDied as e:
        print(f"pdkv: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        deployment.stop()
    print("pdkv: stopped", flush=True)
    return code
