"""Fixtures that run real deployments: `pd launch` in a subprocess, real vLLM CPU instances."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "tiny-llama"
READY = re.compile(r"pdkv ready: proxy at (http://\S+)")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The default synthetic model (made once, reused across runs)."""
    if not (MODEL_DIR / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "launch.cli", "make-model", str(MODEL_DIR)], check=True, cwd=ROOT)
    return MODEL_DIR


class Launched:
    def __init__(self, proc: subprocess.Popen, url: str, cfg: dict, log: Path, run_dir: Path):
        self.proc, self.url, self.cfg, self.log, self.run_dir = proc, url, cfg, log, run_dir

    def instance_url(self, group: str, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.cfg[group]['port_base'] + i}"

    @property
    def pool_dir(self) -> Path:
        t = self.cfg["connector"]["transport"]
        return Path(t.get("shm_dir", "/dev/shm")) / f"pdkv-{t['name']}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def start(cfg: dict, tmp: Path, name: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """``pd launch`` of ``cfg`` in a new session; ``env`` is added to ours."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg_file = tmp / f"{name}.yaml"
    cfg.setdefault("run_dir", str(tmp / f"run-{name}"))
    cfg_file.write_text(yaml.safe_dump(cfg))
    log = tmp / f"{name}.out"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "launch", "--config", str(cfg_file)], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, text=True,
                                env={**os.environ, **(env or {})})
    return proc, log


def wait_ready(proc: subprocess.Popen, log: Path, cfg: dict, timeout: float = 900) -> Launched:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        m = READY.search(text)
        if m:
            return Launched(proc, m.group(1), cfg, log, Path(cfg["run_dir"]))
        if proc.poll() is not None:
            raise RuntimeError(f"pd launch exited {proc.returncode} before ready:\n{text[-4000:]}")
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError(f"pd launch not ready in {timeout}s:\n{log.read_text()[-4000:]}")


def deployment_set(cfgs: dict, tmp: Path, env: dict | None = None):
    """Start the deployments ``cfgs`` ({name: (cfg, extra)}) together; a generator for fixtures.

    Yields {name: (Launched, extra)} plus ``"restart"``: ``restart(name)`` stops one and starts it
    again (same config). Every deployment must stop with exit code 0.
    """
    procs = {name: start(cfg, tmp, name, env) for name, (cfg, _) in cfgs.items()}
    current: dict = {}
    codes = []

    def restart(name: str) -> Launched:
        codes.append(current.pop(name)[0].stop())
        cfg = cfgs[name][0]
        proc, log = start(cfg, tmp, name + "-again", env)
        try:
            current[name] = (wait_ready(proc, log, cfg), cfgs[name][1])
        except BaseException:
            proc.kill()
            raise
        return current[name][0]

    try:
        for name, (proc, log) in procs.items():
            current[name] = (wait_ready(proc, log, cfgs[name][0]), cfgs[name][1])
        current["restart"] = restart
        yield current
    finally:
        current.pop("restart", None)
        codes += [dep.stop() for dep, _ in current.values()]
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
        assert all(c == 0 for c in codes), codes


def pd_config(model_path: Path, name: str, port_base: int, transport: str, store: dict) -> dict:
    """A 1P1D config on ports ``port_base``.. (prefill, +50 decode, +90 proxy, +91 coordinator)."""
    cfg = {**yaml.safe_load(yaml.safe_dump(BASE)), "model": str(model_path), "mode": "pd",
           "prefill": {"count": 1, "port_base": port_base}, "decode": {"count": 1, "port_base": port_base + 50},
           "proxy": {"port": port_base + 90}, "coordinator": {"port": port_base + 91}}
    cfg["connector"]["transport"] = {"kind": transport, "name": f"{name}{time.time_ns()}"}
    cfg["connector"]["store"] = store
    cfg["vllm"]["cpu_bind"] = "0;1"
    return cfg


STEP_TOKENS = 512  # the shared deployments' prefill token budget per engine step

BASE = {
    # 0.25 GiB of KV (65k tokens of the test model; VLLM_CPU_KVCACHE_SPACE cannot go below 1 GiB):
    # an instance then holds about 1.6 GB, not 2.4, and the store tests' nine at once fit in 24 GiB
    # (with 1 GiB each the kernel killed a VLLM::Worker in CI, 2026-12-06).
    "vllm": {"max_model_len": 2048, "block_size": 32, "kv_cache_memory_gb": 0.25, "max_num_seqs": 16},
    "connector": {"chunk_size": 256, "wait_timeout_s": 120},
}


# Modules that start many vLLM instances of their own (the Ray tests: four, beside Ray's nodes) run
# before any test starts the session's ``deployments`` (three more instances): both at once went
# past this machine's 24 GiB and the kernel killed a deployment's VLLM::Worker (CI, 2026-12-06).
RUN_FIRST = ("test_ray_e2e.py", "test_ray_tp_e2e.py")


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name not in RUN_FIRST)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def deployments(model_path, tmp_path_factory):
    """A 1P1D deployment and a colocated single instance of the same model, started together."""
    tmp = tmp_path_factory.mktemp("deploy")
    tag = f"it{os.getpid()}"
    pd_cfg = {**yaml.safe_load(yaml.safe_dump(BASE)), "model": str(model_path), "mode": "pd",
              "prefill": {"count": 1, "port_base": 18100}, "decode": {"count": 1, "port_base": 18200},
              "proxy": {"port": 18000}, "coordinator": {"port": 18570}}
    pd_cfg["connector"]["transport"] = {"kind": "shm", "name": tag, "pool_size_mb": 256}
    co_cfg = {**yaml.safe_load(yaml.safe_dump(BASE)), "model": str(model_path), "mode": "colocated",
              "prefill": {"count": 1, "port_base": 18300}, "decode": {"count": 0, "port_base": 18400},
              "proxy": {"port": 18001}, "coordinator": {"port": 18571}}
    # Prompts longer than this are prefilled over several steps (chunked prefill), and their
    # chunks stream to decode step by step; the reference computes the same way.
    pd_cfg["vllm"]["extra_args"] = co_cfg["vllm"]["extra_args"] = ["--max-num-batched-tokens", str(STEP_TOKENS)]
    # 2 cores: prefill on core 0, decode on core 1, the colocated reference shares core 0.
    pd_cfg["vllm"]["cpu_bind"] = "0;1"
    co_cfg["vllm"]["cpu_bind"] = "0"
    procs = []
    started = []
    try:
        procs.append(start(pd_cfg, tmp, "pd") + (pd_cfg,))
        procs.append(start(co_cfg, tmp, "colocated") + (co_cfg,))
        for proc, log, cfg in procs:
            started.append(wait_ready(proc, log, cfg))
        yield started[0], started[1]
    finally:
        for proc, log, cfg in procs:
            if all(d.proc is not proc for d in started):
                started.append(Launched(proc, "", cfg, log, Path(cfg["run_dir"])))
        codes = [d.stop() for d in started]
        pool = Path("/dev/shm") / f"pdkv-{tag}"
        leftover = pool.exists() and any(pool.iterdir())
        shutil.rmtree(pool, ignore_errors=True)
        assert all(c == 0 for c in codes), f"pd launch exit codes {codes}"
        assert not leftover, f"{pool} not cleaned after a clean stop"
