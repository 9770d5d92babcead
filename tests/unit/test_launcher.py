"""pd launch: validation, dry-run command lines, and the process lifecycle (with stand-in processes, no vLLM)."""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from common.config import ConfigError, load
from launch.cli import main
from launch.procs import ProcSpec, bind_cores, check_ports, check_store, cpu_binds, pin_here, plan
from launch.supervise import ChildDied, Deployment, _unblock_signals, exit_text
from pd.config import DeploymentConfig

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for a vLLM server: /health answers 200; it starts a grandchild in its process group
# (like vLLM's engine core) whose pid it writes to a file.
FAKE_SERVER = textwrap.dedent("""
    import http.server, subprocess, sys, signal
    port, pidfile, ignore_term = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    code = "import signal, time\\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" if ignore_term else "")
    kid = subprocess.Popen([sys.executable, "-c", code + "time.sleep(600)"])
    open(pidfile, "w").write(str(kid.pid))
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    print("fake server up", flush=True)
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def model(tmp_path) -> Path:
    """A directory that passes the launcher's model check (vLLM never runs in these tests)."""
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "tokenizer.json").write_text("{}")
    return d


def free_config(model: Path, tmp_path: Path, **extra) -> dict:
    cfg = {"model": str(model), "run_dir": str(tmp_path / "run"),
           "prefill": {"port_base": free_port()}, "decode": {"port_base": free_port()},
           "proxy": {"port": free_port()}, "coordinator": {"port": free_port()},
           "connector": {"transport": {"shm_dir": str(tmp_path / "shm"), "name": "t"}}}
    for k, v in extra.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def write_yaml(tmp_path: Path, cfg: dict) -> Path:
    f = tmp_path / "pd.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def pd_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def parse_dry_run(out: str) -> dict[str, tuple[dict[str, str], list[str]]]:
    """name -> (env, argv) from ``pd launch --dry-run`` output."""
    procs, name = {}, None
    for line in out.splitlines():
        if line.startswith("# "):
            name = line[2:].strip()
        elif line.strip():
            words = shlex.split(line)
            env = {}
            while words and "=" in words[0] and not words[0].startswith("-"):
                k, v = words.pop(0).split("=", 1)
                env[k] = v
            if words[:2] == ["taskset", "-c"]:  # the instance's cores (shown as env["taskset"] here)
                env["taskset"] = words[2]
                words = words[3:]
            procs[name] = (env, words)
    return procs


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# ---- dry run ---------------------------------------------------------------------------


def test_dry_run_pd(model, tmp_path, capsys):
    cfg = free_config(model, tmp_path, vllm={"block_size": 64, "max_model_len": 4096, "cpu_bind": "0;1;0"},
                      decode={"count": 2, "extra_args": ["--seed", "7"]})
    assert main(["launch", "--config", str(write_yaml(tmp_path, cfg)), "--dry-run"]) == 0
    procs = parse_dry_run(capsys.readouterr().out)
    assert list(procs) == ["coordinator", "prefill-0", "decode-0", "decode-1", "proxy"]
    assert not (tmp_path / "run").exists()  # a dry run starts nothing and writes nothing
    _, coord = procs["coordinator"]
    assert coord[1:4] == ["-m", "launch.cli", "coordinator"] and flag(coord, "--port") == str(cfg["coordinator"]["port"])
    for i, name in enumerate(["prefill-0", "decode-0", "decode-1"]):
        env, argv = procs[name]
        assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        assert flag(argv, "--model") == str(model.resolve()) and flag(argv, "--served-model-name") == "tiny"
        assert flag(argv, "--host") == "127.0.0.1"
        role, idx = name.split("-")
        assert flag(argv, "--port") == str(cfg[role]["port_base"] + int(idx))
        assert flag(argv, "--block-size") == "64" and flag(argv, "--max-model-len") == "4096"
        assert flag(argv, "--dtype") == "float32" and "--enforce-eager" in argv
        kv = json.loads(flag(argv, "--kv-transfer-config"))
        assert kv["kv_connector"] == "PDConnector" and kv["kv_connector_module_path"] == "pd.connector"
        assert kv["kv_role"] == {"prefill": "kv_producer", "decode": "kv_consumer"}[role]
        extra = kv["kv_connector_extra_config"]
        assert extra["instance_id"] == name
        assert extra["coordinator"] == f"tcp://127.0.0.1:{cfg['coordinator']['port']}"
        assert extra["transport"]["shm_dir"] == str(tmp_path / "shm")
        # issue 18: a pool per deployment (named by its proxy port), unless the YAML names one
        assert extra["transport"]["name"] == cfg["connector"]["transport"].get("name", f"default-{cfg['proxy']['port']}")
        assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["PYTHONHASHSEED"] == "0"
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == ["0", "1", "0"][i]
        assert env["taskset"] == ["0", "1", "0"][i]  # the whole instance runs on its cores
        assert (argv[-2:] == ["--seed", "7"]) == (role == "decode")
    _, proxy = procs["proxy"]
    assert flag(proxy, "--port") == str(cfg["proxy"]["port"])
    assert flag(proxy, "--prefill") == f"http://127.0.0.1:{cfg['prefill']['port_base']}"
    d = cfg["decode"]["port_base"]
    assert flag(proxy, "--decode") == f"http://127.0.0.1:{d},http://127.0.0.1:{d + 1}"
    assert flag(proxy, "--coordinator") == f"tcp://127.0.0.1:{cfg['coordinator']['port']}"
    assert "--colocated" not in proxy


def test_dry_run_colocated(model, tmp_path, capsys):
    cfg = free_config(model, tmp_path)
    code = main(["launch", "--config", str(write_yaml(tmp_path, cfg)), "--mode", "colocated", "--prefill", "2",
                 "--decode", "1", "--dry-run"])
    assert code == 0
    procs = parse_dry_run(capsys.readouterr().out)
    assert list(procs) == ["instance-0", "instance-1", "instance-2", "proxy"]  # no coordinator
    p, d = cfg["prefill"]["port_base"], cfg["decode"]["port_base"]
    ports = [flag(procs[f"instance-{i}"][1], "--port") for i in range(3)]
    assert ports == [str(p), str(p + 1), str(d)]
    for i in range(3):
        assert "--kv-transfer-config" not in procs[f"instance-{i}"][1]
        assert "taskset" not in procs[f"instance-{i}"][0]  # only P/D instances are pinned whole
    proxy = procs["proxy"][1]
    assert flag(proxy, "--colocated") == f"http://127.0.0.1:{p},http://127.0.0.1:{p + 1},http://127.0.0.1:{d}"
    assert "--prefill" not in proxy and "--coordinator" not in proxy


def test_flags_override_yaml(model, tmp_path, capsys):
    cfg = free_config(model, tmp_path, prefill={"count": 3}, mode="colocated")
    port = free_port()
    assert main(["launch", "--config", str(write_yaml(tmp_path, cfg)), "--prefill", "1", "--mode", "pd",
                 "--port", str(port), "--dry-run"]) == 0
    procs = parse_dry_run(capsys.readouterr().out)
    assert list(procs) == ["coordinator", "prefill-0", "decode-0", "proxy"]
    assert flag(procs["proxy"][1], "--port") == str(port)


def test_dry_run_cli_subprocess(model):
    r = pd_cli("launch", "--model", str(model), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "--kv-transfer-config" in r.stdout and "VLLM_CPU_KVCACHE_SPACE=1" in r.stdout


# ---- validation: one clear line, exit 2, nothing started --------------------------------


@pytest.mark.parametrize("make, needle", [
    (lambda p: p / "missing", "is not a directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "has no config.json"),
    (lambda p: ((p / "nt").mkdir(), (p / "nt" / "config.json").write_text("{}"))[0] or p / "nt", "has no tokenizer"),
])
def test_not_a_model(tmp_path, make, needle):
    path = make(tmp_path)
    run_dir = tmp_path / "run"
    r = pd_cli("launch", "--model", str(path), "--run-dir", str(run_dir))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pd launch: error: not a model: {path} {needle}"), lines
    assert not run_dir.exists()  # nothing was started


def test_no_model_given(tmp_path):
    r = pd_cli("launch", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "no model given" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("what", ["proxy", "coordinator", "prefill-0", "decode-0"])
def test_port_in_use(model, tmp_path, what):
    cfg = free_config(model, tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        key = {"proxy": ("proxy", "port"), "coordinator": ("coordinator", "port"),
               "prefill-0": ("prefill", "port_base"), "decode-0": ("decode", "port_base")}[what]
        cfg[key[0]][key[1]] = port
        r = pd_cli("launch", "--config", str(write_yaml(tmp_path, cfg)))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"port {port} ({what}) is already in use" in r.stderr
    assert not (tmp_path / "run").exists()


def test_ports_must_be_distinct(model, tmp_path):
    cfg = free_config(model, tmp_path, prefill={"count": 2})
    cfg["decode"]["port_base"] = cfg["prefill"]["port_base"] + 1
    dep = load(DeploymentConfig, cfg)
    with pytest.raises(ConfigError, match=rf"port {cfg['decode']['port_base']} is used twice: by prefill-1 and by decode-0"):
        check_ports(dep)


def test_unknown_yaml_key(model, tmp_path):
    cfg = free_config(model, tmp_path)
    cfg["vllm"] = {"blocksize": 32}
    r = pd_cli("launch", "--config", str(write_yaml(tmp_path, cfg)))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown key vllm.blocksize" in r.stderr and "block_size" in r.stderr


def test_missing_config_file(tmp_path):
    r = pd_cli("launch", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr


@pytest.mark.parametrize("over, needle", [
    ({"vllm": {"block_size": 16}}, "vllm.block_size: 16 is not allowed; vLLM's CPU attention needs a multiple of 32"),
    ({"connector": {"chunk_size": 100}}, "connector.chunk_size: 100 is not a multiple of vllm.block_size (32)"),
    ({"decode": {"count": 0}}, "mode pd needs at least one prefill and one decode instance"),
    ({"mode": "colocated", "prefill": {"count": 0}, "decode": {"count": 0}}, "no instances"),
    ({"vllm": {"cpu_bind": "0;1;2"}}, "vllm.cpu_bind: '0;1;2' gives 3 core lists for 2 instances"),
    ({"vllm": {"cpu_bind": "fast;0"}}, "vllm.cpu_bind: 'fast;0'"),
])
def test_cross_key_checks(model, tmp_path, over, needle):
    cfg = free_config(model, tmp_path)
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    with pytest.raises(ConfigError) as e:
        plan(load(DeploymentConfig, cfg))
    assert needle in str(e.value)


def test_cpu_binds():
    assert cpu_binds("auto", 3) == ["auto"] * 3
    assert cpu_binds("nobind", 2) == ["nobind"] * 2
    assert cpu_binds("0-3;4-7", 2) == ["0-3", "4-7"]
    cores = sorted(os.sched_getaffinity(0))
    split = cpu_binds("split", len(cores) + 1)  # more instances than cores: round-robin, all start
    assert split[0] == split[-1] == str(cores[0])
    assert set().union(*(set(s.split(",")) for s in cpu_binds("split", 1))) == {str(c) for c in cores}


def test_cli_errors_are_one_line():
    r = pd_cli("stats", "--coordinator", f"tcp://127.0.0.1:{free_port()}", timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "pd stats: error: no answer from the coordinator" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # no client warning before it


# ---- lifecycle, with stand-in processes ---------------------------------------------------


def fake_spec(name: str, tmp_path: Path, ignore_term: bool = False) -> tuple[ProcSpec, Path]:
    port, pidfile = free_port(), tmp_path / f"{name}.kid"
    argv = [sys.executable, "-c", FAKE_SERVER, str(port), str(pidfile), "1" if ignore_term else "0"]
    return ProcSpec(name, argv, {"PD_FAKE": name}, f"http://127.0.0.1:{port}/health", port), pidfile


def dying_spec(name: str, code: int = 3) -> ProcSpec:
    return ProcSpec(name, [sys.executable, "-c", f"import time, sys; print('boom {name}', flush=True); "
                                                 f"time.sleep(0.5); sys.exit({code})"], port=free_port())


def test_deployment_start_ready_stop(model, tmp_path):
    dep = load(DeploymentConfig, free_config(model, tmp_path))
    pool = tmp_path / "shm" / "pdkv-t"
    pool.mkdir(parents=True)
    (pool / "chunk").write_bytes(b"x")
    d = Deployment(dep)
    (a, a_kid), (b, b_kid) = fake_spec("a", tmp_path), fake_spec("b", tmp_path, ignore_term=True)
    d.specs = [a, b]
    lines: list[str] = []
    d.start(progress=lines.append)
    assert any("a" in line and "ready" in line for line in lines) and any("b " in line and "ready" in line for line in lines)
    assert (d.run_dir / "a.log").read_text().startswith("fake server up")
    assert (d.run_dir / "config.yaml").is_file()
    kids = [int(a_kid.read_text()), int(b_kid.read_text())]
    procs = [p.pid for _, p in d.procs.values()]
    assert all(alive(pid) for pid in kids + procs)
    for pid in procs:  # children run in their own session with no signal blocked
        assert os.getpgid(pid) == pid
        status = Path(f"/proc/{pid}/status").read_text()
        assert int(status.split("SigBlk:")[1].split()[0], 16) == 0
    d.check_children()  # all alive: no error
    t0 = time.monotonic()
    d.stop(grace_s=1.0)
    assert time.monotonic() - t0 < 10
    assert not any(alive(pid) for pid in kids + procs)  # the group too, even the one ignoring SIGTERM
    assert not pool.exists()  # the shm pool is removed


def test_child_death_during_startup(model, tmp_path):
    d = Deployment(load(DeploymentConfig, free_config(model, tmp_path)))
    (a, a_kid) = fake_spec("a", tmp_path)
    d.specs = [a, dying_spec("bad")]
    with pytest.raises(ChildDied) as e:
        with d:
            pass
    msg = str(e.value)
    assert "bad" in msg and "exited with code 3" in msg and "boom bad" in msg
    assert not any(p.poll() is None for _, p in d.procs.values())
    assert not alive(int(a_kid.read_text()))


VLLM_DEATH = """INFO 11-30 05:40:00 [api_server.py:100] vLLM API server version 0.32.0
(EngineCore_DP0 pid=4242) ERROR 11-30 05:40:10 [core.py:700] EngineCore failed to start.
(EngineCore_DP0 pid=4242) ERROR 11-30 05:40:10 [core.py:700] Traceback (most recent call last):
(EngineCore_DP0 pid=4242) ERROR 11-30 05:40:10 [core.py:700]   File "core.py", line 690, in run
(EngineCore_DP0 pid=4242) ERROR 11-30 05:40:10 [core.py:700] ValueError: max_model_len 8192 exceeds the KV cache (4096 tokens)
Traceback (most recent call last):
  File "api_server.py", line 12, in <module>
RuntimeError: Engine core initialization failed. See root cause above.
INFO 11-30 05:40:11 [loggers.py:1] shutting down
"""


def test_the_line_that_says_why_a_child_died_is_named(tmp_path):
    log = tmp_path / "decode-0.log"
    log.write_text(VLLM_DEATH)
    assert exit_text("decode-0", 7, 1, log) == (
        f"decode-0 (pid 7) exited with code 1; why: (EngineCore_DP0 pid=4242) ERROR 11-30 05:40:10 [core.py:700] "
        f"ValueError: max_model_len 8192 exceeds the KV cache (4096 tokens) ({log}:5)")
    log.write_text("\x1b[1;31mERROR\x1b[0m 05:40 [x.py:1] cannot bind\nbye\n")
    assert "why: ERROR 05:40 [x.py:1] cannot bind" in exit_text("p", 1, 1, log)
    log.write_text("nothing to see\n")
    assert exit_text("p", 1, -9, log) == "p (pid 1) was killed by SIGKILL"
    assert exit_text("p", 1, 2, tmp_path / "missing.log") == "p (pid 1) exited with code 2"


def test_startup_timeout(model, tmp_path):
    cfg = free_config(model, tmp_path, vllm={"startup_timeout_s": 1})
    d = Deployment(load(DeploymentConfig, cfg))
    never = ProcSpec("never", [sys.executable, "-c", "import time; time.sleep(60)"],
                     health_url=f"http://127.0.0.1:{free_port()}/health")
    d.specs = [never]
    with pytest.raises(ChildDied, match=r"not ready after 1s .*never"):
        d.start(progress=lambda _: None)
    d.stop(grace_s=1)
    assert all(p.poll() is not None for _, p in d.procs.values())


LAUNCH_WITH_FAKES = textwrap.dedent("""
    import json, sys
    from launch import supervise
    from launch.procs import ProcSpec
    specs = [ProcSpec(**s) for s in json.loads(sys.argv[1])]
    supervise.plan = lambda dep: specs
    from launch.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def launch_fakes(specs: list[ProcSpec], cfg_file: Path) -> subprocess.Popen:
    data = json.dumps([{"name": s.name, "argv": s.argv, "env": s.env, "health_url": s.health_url,
                        "port": s.port} for s in specs])
    return subprocess.Popen([sys.executable, "-c", LAUNCH_WITH_FAKES, data, "launch", "--config", str(cfg_file)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def read_until(proc: subprocess.Popen, needle: str, timeout: float = 60) -> str:
    out, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out += line
        if needle in line:
            return out
    raise AssertionError(f"{needle!r} not seen; got:\n{out}")


def test_cli_sigterm_stops_everything(model, tmp_path):
    cfg = free_config(model, tmp_path)
    pool = tmp_path / "shm" / "pdkv-t"
    pool.mkdir(parents=True)
    (a, a_kid), (b, b_kid) = fake_spec("prefill-0", tmp_path), fake_spec("proxy", tmp_path)
    proc = launch_fakes([a, b], write_yaml(tmp_path, cfg))
    try:
        out = read_until(proc, "pdkv ready: proxy at")
        assert "prefill-0" in out and "ready" in out
        kids = [int(a_kid.read_text()), int(b_kid.read_text())]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "pdkv: stopped" in out
    assert not any(alive(k) for k in kids)
    assert not pool.exists()
    assert (tmp_path / "run" / "prefill-0.log").is_file()


def test_cli_child_death_exits_1(model, tmp_path):
    cfg = free_config(model, tmp_path)
    (a, a_kid) = fake_spec("decode-0", tmp_path)
    proc = launch_fakes([a, dying_spec("prefill-0", code=7)], write_yaml(tmp_path, cfg))
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1
    assert "Traceback" not in err
    assert "prefill-0" in err and "exited with code 7" in err and "boom prefill-0" in err
    assert not alive(int(a_kid.read_text()))


def test_cli_sigterm_during_startup(model, tmp_path):
    cfg = free_config(model, tmp_path)
    (a, a_kid) = fake_spec("coordinator", tmp_path)
    never = ProcSpec("prefill-0", [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(600)"],
                     health_url=f"http://127.0.0.1:{free_port()}/health")
    proc = launch_fakes([a, never], write_yaml(tmp_path, cfg))
    try:
        read_until(proc, "coordinator")  # the starting line names the processes
        deadline = time.monotonic() + 30
        log = tmp_path / "run" / "prefill-0.log"
        while not (a_kid.exists() and log.exists() and "loading" in log.read_text()):
            assert time.monotonic() < deadline, "the stand-in processes did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "pdkv: stopped" in out and "Traceback" not in err
    assert not alive(int(a_kid.read_text()))


# ---- the CLI as a user runs it: counts from flags, YAML vs flags, errors leave nothing running ----


def leftovers(*needles: str) -> list[str]:
    """Command lines of live launcher children (coordinator, vLLM, proxy) mentioning any of ``needles``."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
            continue
        if ("launch.cli" in cmd or "vllm" in cmd) and any(n in cmd for n in needles):
            found.append(f"{p.pid}: {cmd}")
    return found


def run_launch(tmp_path: Path, cfg: dict, *args: str) -> subprocess.CompletedProcess:
    """``pd launch`` (not a dry run) that must fail before starting anything; never leaves a child."""
    needles = [str(tmp_path)] + [f"--port {cfg[k]['port']}" for k in ("proxy", "coordinator") if k in cfg]
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "launch", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # it started a deployment: stop it (SIGTERM stops its children)
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"pd launch did not refuse the config; it ran:\n{out}\n{err}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        left = leftovers(*needles)
        for line in left:  # children this test started; end them by pid
            try:
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not left, f"processes left running: {left}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("pd launch: error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_dry_run_counts_from_flags(model):
    r = pd_cli("launch", "--model", str(model), "--prefill", "2", "--decode", "3", "--dry-run")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    procs = parse_dry_run(r.stdout)
    names = ["prefill-0", "prefill-1", "decode-0", "decode-1", "decode-2"]
    assert list(procs) == ["coordinator", *names, "proxy"]
    dflt = DeploymentConfig()
    coord = f"tcp://{dflt.coordinator.host}:{dflt.coordinator.port}"
    binds = []
    for name in names:
        env, argv = procs[name]
        group, i = name.split("-")
        assert flag(argv, "--port") == str(getattr(dflt, group).port_base + int(i))
        kv = json.loads(flag(argv, "--kv-transfer-config"))
        assert kv["kv_role"] == ("kv_producer" if group == "prefill" else "kv_consumer")
        assert kv["kv_connector_extra_config"]["instance_id"] == name
        assert kv["kv_connector_extra_config"]["coordinator"] == coord
        assert kv["kv_load_failure_policy"] == "recompute"
        assert flag(argv, "--block-size") == str(dflt.vllm.block_size)
        assert flag(argv, "--max-model-len") == str(dflt.vllm.max_model_len)
        assert flag(argv, "--dtype") == "float32"  # dtype default: float32 on cpu
        assert env["VLLM_CPU_KVCACHE_SPACE"] == str(dflt.vllm.kv_cache_space_gb)
        binds.append(env["VLLM_CPU_OMP_THREADS_BIND"])
    assert binds == cpu_binds("split", 5)
    proxy = procs["proxy"][1]
    assert flag(proxy, "--prefill") == "http://127.0.0.1:8100,http://127.0.0.1:8101"
    assert flag(proxy, "--decode") == ",".join(f"http://127.0.0.1:{8200 + i}" for i in range(3))
    assert flag(proxy, "--coordinator") == coord
    assert flag(procs["coordinator"][1], "--port") == str(dflt.coordinator.port)


def test_yaml_is_honoured_and_flags_override_it(model, tmp_path):
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "tokenizer.json").write_text("{}")
    cfg = {"model": str(other), "served_model_name": "tm",
           "prefill": {"count": 1, "port_base": 9300}, "decode": {"count": 2, "port_base": 9400},
           "vllm": {"block_size": 64, "max_model_len": 1024, "dtype": "bfloat16", "kv_cache_space_gb": 3,
                    "cpu_bind": "0;1;0", "extra_args": ["--seed", "3"], "enforce_eager": False},
           "proxy": {"port": 9500, "policy": "round_robin"}, "coordinator": {"port": 9600}}
    f = write_yaml(tmp_path, cfg)
    r = pd_cli("launch", "--config", str(f), "--dry-run")
    assert r.returncode == 0, r.stderr
    procs = parse_dry_run(r.stdout)
    assert list(procs) == ["coordinator", "prefill-0", "decode-0", "decode-1", "proxy"]
    env, argv = procs["decode-1"]
    assert flag(argv, "--model") == str(other.resolve()) and flag(argv, "--served-model-name") == "tm"
    assert flag(argv, "--port") == "9401" and flag(argv, "--block-size") == "64"
    assert flag(argv, "--max-model-len") == "1024" and flag(argv, "--dtype") == "bfloat16"
    assert "--enforce-eager" not in argv and argv[-2:] == ["--seed", "3"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert json.loads(flag(argv, "--kv-transfer-config"))["kv_connector_extra_config"]["coordinator"] \
        == "tcp://127.0.0.1:9600"
    assert flag(procs["proxy"][1], "--policy") == "round_robin" and flag(procs["proxy"][1], "--port") == "9500"

    # flags win; what they do not name stays as the YAML says
    r = pd_cli("launch", "--config", str(f), "--model", str(model), "--prefill", "2", "--decode", "1",
               "--port", "9555", "--dry-run")
    assert r.returncode == 0, r.stderr
    procs = parse_dry_run(r.stdout)
    assert list(procs) == ["coordinator", "prefill-0", "prefill-1", "decode-0", "proxy"]
    assert [flag(procs[n][1], "--port") for n in ("prefill-0", "prefill-1", "decode-0")] == ["9300", "9301", "9400"]
    env, argv = procs["prefill-1"]
    assert flag(argv, "--model") == str(model.resolve()) and env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert flag(argv, "--dtype") == "bfloat16" and env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert flag(procs["proxy"][1], "--port") == "9555" and flag(procs["proxy"][1], "--policy") == "round_robin"
    # cpu_bind "0;1;0" was for 3 instances: with --decode 1 there are 2, which is refused
    r = pd_cli("launch", "--config", str(f), "--decode", "1", "--dry-run")
    assert "gives 3 core lists for 2 instances" in assert_one_error_line(r)


def test_colocated_dry_run_from_flags(model):
    r = pd_cli("launch", "--model", str(model), "--mode", "colocated", "--prefill", "2", "--decode", "1",
               "--dry-run")
    assert r.returncode == 0, r.stderr
    procs = parse_dry_run(r.stdout)
    assert list(procs) == ["instance-0", "instance-1", "instance-2", "proxy"]
    assert "coordinator" not in r.stdout and "--kv-transfer-config" not in r.stdout
    proxy = procs["proxy"][1]
    assert flag(proxy, "--colocated") == "http://127.0.0.1:8100,http://127.0.0.1:8101,http://127.0.0.1:8200"
    assert "--prefill" not in proxy and "--decode" not in proxy and "--coordinator" not in proxy


def test_model_path_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_text("x")
    r = pd_cli("launch", "--model", str(f), "--dry-run")
    assert_one_error_line(r, "not a model", str(f))


def test_proxy_port_in_use_refused_and_nothing_left(model, tmp_path):
    cfg = free_config(model, tmp_path)
    f = write_yaml(tmp_path, cfg)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg["proxy"]["port"] = port
        r = run_launch(tmp_path, cfg, "--config", str(f), "--port", str(port))
    assert_one_error_line(r, f"port {port}", "proxy", "already in use")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["decode0", "overlap", "bad_value", "unknown_key", "bad_int_flag", "bind_count"])
def test_launch_errors_are_one_line_and_start_nothing(model, tmp_path, case):
    cfg = free_config(model, tmp_path)
    args: list[str] = []
    if case == "decode0":
        args, needles = ["--decode", "0"], ["mode pd needs at least one prefill and one decode", "decode.count=0"]
    elif case == "overlap":
        cfg["prefill"]["count"] = 3
        cfg["decode"]["port_base"] = cfg["prefill"]["port_base"] + 2
        needles = [f"port {cfg['decode']['port_base']} is used twice", "prefill-2", "decode-0"]
    elif case == "bad_value":
        cfg["vllm"] = {"dtype": "float64"}
        needles = ["vllm.dtype: 'float64' is not allowed", "float32"]
    elif case == "unknown_key":
        cfg["proxy"]["prot"] = 1
        needles = ["unknown key proxy.prot", "port", "policy"]
    elif case == "bad_int_flag":
        args, needles = ["--prefill", "65"], ["prefill.count: 65 is out of range; allowed 0..64"]
    else:
        cfg["vllm"] = {"cpu_bind": "0-1;0-1;0-1"}
        needles = ["vllm.cpu_bind", "3 core lists for 2 instances"]
    r = run_launch(tmp_path, cfg, "--config", str(write_yaml(tmp_path, cfg)), *args)
    assert_one_error_line(r, *needles)
    assert not (tmp_path / "run").exists()


def test_argparse_errors_exit_2_without_traceback(model):
    r = pd_cli("launch", "--model", str(model), "--mode", "mixed", "--dry-run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("pd launch: error: argument --mode: invalid choice")


def test_cpu_binds_split_with_known_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert cpu_binds("split", 1) == ["0,1,2,3,4,5,6,7"]
    assert cpu_binds("split", 2) == ["0,1,2,3", "4,5,6,7"]
    three = [set(b.split(",")) for b in cpu_binds("split", 3)]
    assert all(len(s) == 2 for s in three) and not (three[0] & three[1] or three[1] & three[2] or three[0] & three[2])
    assert cpu_binds("split", 8) == [str(c) for c in range(8)]
    assert cpu_binds("split", 10) == [str(c) for c in range(8)] + ["0", "1"]  # round-robin, all start
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 9})  # cores need not start at 0
    assert cpu_binds("split", 2) == ["4", "9"]


def test_bind_cores_and_pinning_a_process_to_them(caplog):
    assert bind_cores("0") == (0,) and bind_cores("0-2,5|7") == (0, 1, 2, 5, 7)
    assert bind_cores("auto") == bind_cores("nobind") == ()
    ours = sorted(os.sched_getaffinity(0))
    spec = ProcSpec("decode-0", [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                    cpus=(ours[-1],))
    assert pin_here(spec) == {ours[-1]} and pin_here(ProcSpec("x", ["true"])) is None
    assert pin_here(ProcSpec("far", ["true"], cpus=(ours[-1] + 1,))) is None  # not this machine's cores
    assert "are not all among this machine's" in caplog.text
    out = subprocess.run(spec.argv, preexec_fn=lambda: _unblock_signals(pin_here(spec)), capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"[{ours[-1]}]"  # and its children inherit it


def test_an_instance_is_pinned_to_the_cores_its_env_binds(model, tmp_path):
    cfg = free_config(model, tmp_path, vllm={"cpu_bind": "0;1"}, decode={"env": ["VLLM_CPU_OMP_THREADS_BIND=nobind"]})
    specs = {s.name: s for s in plan(load(DeploymentConfig, cfg))}
    assert specs["prefill-0"].cpus == (0,) and specs["decode-0"].cpus == ()  # decode's own env unbinds it


def test_cpu_binds_explicit():
    assert cpu_binds(" 0-3 ; 4,5 ;6", 3) == ["0-3", "4,5", "6"]
    assert cpu_binds("0", 1) == ["0"]
    for bad, n in (("0-3;4-7", 3), ("0-3;4-7", 1), ("0-3;", 2), ("a;b", 2), ("0-3;4-", 2)):
        with pytest.raises(ConfigError, match="vllm.cpu_bind"):
            cpu_binds(bad, n)


# -- the store flags -----------------------------------------------------------------------
def _store_extra(out: str) -> dict:
    _, argv = parse_dry_run(out)["prefill-0"]
    return json.loads(flag(argv, "--kv-transfer-config"))["kv_connector_extra_config"]


def test_store_flags_reach_the_instances(model, tmp_path, capsys):
    store = tmp_path / "kv"
    store.mkdir()
    cfg = write_yaml(tmp_path, free_config(model, tmp_path))
    assert main(["launch", "--config", str(cfg), "--store", "local", "--store-path", f"file://{store}",
                 "--store-size-gb", "2", "--transport", "none", "--dry-run"]) == 0
    extra = _store_extra(capsys.readouterr().out)
    assert extra["store"]["backend"] == "local" and extra["store"]["paths"] == [f"file://{store}"]
    assert extra["store"]["size_gb"] == 2 and extra["transport"]["kind"] == "none"


def test_store_path_is_made_and_writers_share_the_budget(model, tmp_path, capsys):
    cfg = free_config(model, tmp_path)
    cfg["prefill"] = {"count": 3}
    path = tmp_path / "new" / "kv"
    assert main(["launch", "--config", str(write_yaml(tmp_path, cfg)), "--store", "local", "--store-path",
                 f"{path},{tmp_path / 'kv2'}", "--dry-run"]) == 0
    assert not path.exists()  # a dry run makes nothing
    assert _store_extra(capsys.readouterr().out)["store"]["writers"] == 3  # 3 prefill ranks 0 on each path
    check_store(load(DeploymentConfig, {**cfg, "connector": {"store": {"backend": "local", "paths": [str(path)]}}})
                .connector.store)
    assert path.is_dir() and path.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("args, words", [
    (["--store", "local"], ["connector.store.paths", "at least one directory"]),
    (["--store", "local", "--store-path", "{tmp}/a-file/kv"], ["a-file/kv", "does not exist and cannot be made"]),
    (["--store", "local", "--store-path", "{tmp}", "--store-size-gb", "0"], ["size_gb", "0.001"]),
])
def test_bad_store_flags_exit_2(model, tmp_path, capsys, args, words):
    cfg = write_yaml(tmp_path, free_config(model, tmp_path))
    (tmp_path / "a-file").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["launch", "--config", str(cfg), *args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_hf3fs_store_is_checked_before_anything_starts(model, tmp_path, capsys, monkeypatch, usrbio_double):
    from tests.doubles import usrbio_emulator as emu

    cfg = write_yaml(tmp_path, free_config(model, tmp_path))
    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["launch", "--config", str(cfg), "--store", "hf3fs", "--store-path", str(plain), "--dry-run"]) == 2
    assert "not on a 3FS mount" in capsys.readouterr().err
    mount = Path(emu.emulate_mount(str(tmp_path / "3fs")))
    assert main(["launch", "--config", str(cfg), "--store", "hf3fs", "--store-path", str(mount / "kv"),
                 "--dry-run"]) == 0
    assert _store_extra(capsys.readouterr().out)["store"]["backend"] == "hf3fs"
    assert [p.name for p in (mount / "kv" / "dev0").iterdir()] == []  # checked read-only: no writer dir
    monkeypatch.setitem(sys.modules, "hf3fs_fuse", None)  # and without the client at all
    monkeypatch.setitem(sys.modules, "hf3fs_fuse.io", None)
    assert main(["launch", "--config", str(cfg), "--store", "hf3fs", "--store-path", str(mount / "kv"),
                 "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "hf3fs_py_usrbio" in err and "backend local" in err


def test_cpu_kv_cache_below_a_gib_goes_as_bytes_not_the_whole_gib_variable(model, tmp_path):
    def vllm_procs(**vllm):
        cfg = free_config(model, tmp_path, vllm=vllm)
        return [s for s in plan(load(DeploymentConfig, cfg)) if "vllm.entrypoints" in " ".join(s.argv)]

    for s in vllm_procs(kv_cache_memory_gb=0.25):
        assert flag(s.argv, "--kv-cache-memory-bytes") == str(1 << 28)
        assert "VLLM_CPU_KVCACHE_SPACE" not in s.env  # vLLM would let it override the flag
    for s in vllm_procs(kv_cache_space_gb=2):
        assert "--kv-cache-memory-bytes" not in s.argv and s.env["VLLM_CPU_KVCACHE_SPACE"] == "2"


# ---- vllm.device cuda (planning only: no GPU needed) ----------------------------------------


def cuda_plan(model, tmp_path, **extra):
    """name -> (env, argv) of the vLLM instances planned for a cuda config."""
    cfg = free_config(model, tmp_path, **extra)
    cfg["vllm"] = {"device": "cuda", **cfg.get("vllm", {})}
    return {s.name: (s.env, s.argv) for s in plan(load(DeploymentConfig, cfg)) if "vllm.entrypoints" in " ".join(s.argv)}


def test_cuda_instances_get_their_gpus_and_no_cpu_settings(model, tmp_path, capsys):
    cfg = free_config(model, tmp_path, prefill={"gpus": "0"}, decode={"gpus": "1"},
                      vllm={"device": "cuda", "load_format": "dummy", "block_size": 16})
    assert main(["launch", "--config", str(write_yaml(tmp_path, cfg)), "--dry-run"]) == 0
    procs = parse_dry_run(capsys.readouterr().out)
    for name, gpu in (("prefill-0", "0"), ("decode-0", "1")):
        env, argv = procs[name]
        assert env["CUDA_VISIBLE_DEVICES"] == gpu and env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
        assert env["PYTHONHASHSEED"] == "0" and not any(k.startswith("VLLM_CPU_") for k in env)
        assert flag(argv, "--dtype") == "bfloat16" and flag(argv, "--load-format") == "dummy"
        assert flag(argv, "--block-size") == "16"  # the CPU-only multiple-of-32 rule does not apply
        # alone on its GPU: vLLM sizes memory itself
        assert "--gpu-memory-utilization" not in argv and "--kv-cache-memory-bytes" not in argv
        assert "--tensor-parallel-size" not in argv
        assert json.loads(flag(argv, "--kv-transfer-config"))["kv_connector"] == "PDConnector"


def test_cuda_shared_gpu_needs_kv_cache_size_and_splits_utilization(model, tmp_path):
    with pytest.raises(ConfigError) as e:
        cuda_plan(model, tmp_path, prefill={"gpus": "0"}, decode={"gpus": "0"})
    msg = str(e.value)
    assert "vllm.kv_cache_memory_gb: 0 is not allowed" in msg and "GPU 0: prefill-0, decode-0" in msg
    procs = cuda_plan(model, tmp_path, prefill={"gpus": "0"}, decode={"gpus": "0"},
                      vllm={"kv_cache_memory_gb": 1.5, "dtype": "float16"})
    for env, argv in procs.values():
        assert env["CUDA_VISIBLE_DEVICES"] == "0"
        assert flag(argv, "--gpu-memory-utilization") == "0.45"
        assert flag(argv, "--kv-cache-memory-bytes") == str(int(1.5 * (1 << 30)))
        assert flag(argv, "--dtype") == "float16"
    procs = cuda_plan(model, tmp_path, prefill={"gpus": "0"}, decode={"gpus": "0"},
                      vllm={"kv_cache_memory_gb": 2, "gpu_memory_utilization": 0.3})
    assert {flag(argv, "--gpu-memory-utilization") for _, argv in procs.values()} == {"0.3"}


def test_cuda_gpu_lists_per_instance_and_tensor_parallel(model, tmp_path):
    procs = cuda_plan(model, tmp_path, prefill={"gpus": "0,1"}, decode={"count": 2, "gpus": "2,3;4,5"},
                      vllm={"tensor_parallel_size": 2})
    assert {n: e["CUDA_VISIBLE_DEVICES"] for n, (e, _) in procs.items()} == {
        "prefill-0": "0,1", "decode-0": "2,3", "decode-1": "4,5"}
    assert all(flag(argv, "--tensor-parallel-size") == "2" for _, argv in procs.values())


def test_cuda_default_gpus_round_robin(model, tmp_path, monkeypatch):
    import launch.gpus

    monkeypatch.setattr(launch.gpus, "gpu_count", lambda: 2)
    procs = cuda_plan(model, tmp_path)
    assert [e["CUDA_VISIBLE_DEVICES"] for e, _ in procs.values()] == ["0", "1"]
    monkeypatch.setattr(launch.gpus, "gpu_count", lambda: 0)
    with pytest.raises(ConfigError, match="vllm.device cuda: no GPU found"):
        cuda_plan(model, tmp_path)


def test_auto_device(model, tmp_path, monkeypatch):
    import launch.gpus

    monkeypatch.setattr(launch.gpus, "gpu_count", lambda: 0)
    specs = plan(load(DeploymentConfig, free_config(model, tmp_path, vllm={"device": "auto"})))
    assert all("VLLM_CPU_KVCACHE_SPACE" in s.env for s in specs if s.name.startswith(("prefill", "decode")))
    monkeypatch.setattr(launch.gpus, "gpu_count", lambda: 1)
    with pytest.raises(ConfigError, match="kv_cache_memory_gb"):  # one GPU for both: must be sized
        plan(load(DeploymentConfig, free_config(model, tmp_path, vllm={"device": "auto"})))


def test_env_keys(model, tmp_path):
    procs = cuda_plan(model, tmp_path, prefill={"gpus": "0", "env": ["UCX_TLS=cuda_ipc,tcp"]}, decode={"gpus": "1"},
                      vllm={"env": ["VLLM_USE_FLASHINFER_SAMPLER=1", "A=x=y"]})
    env_p, _ = procs["prefill-0"]
    env_d, _ = procs["decode-0"]
    assert env_p["VLLM_USE_FLASHINFER_SAMPLER"] == "1" and env_p["A"] == "x=y" and env_p["UCX_TLS"] == "cuda_ipc,tcp"
    assert "UCX_TLS" not in env_d
    specs = plan(load(DeploymentConfig, free_config(model, tmp_path, vllm={"env": ["FOO=1"]})))
    assert all(s.env["FOO"] == "1" for s in specs if s.name.startswith(("prefill", "decode")))


@pytest.mark.parametrize("over, needle", [
    ({"prefill": {"gpus": "zero"}}, "prefill.gpus: 'zero' is not allowed; give GPU indices"),
    ({"decode": {"gpus": "0;1;2"}}, "decode.gpus: '0;1;2' gives 3 GPU lists for 1 instances"),
    ({"prefill": {"gpus": "0"}, "vllm": {"tensor_parallel_size": 2}},
     "prefill.gpus: '0' names 1 distinct GPU(s) but prefill.tp (or vllm.tensor_parallel_size) is 2"),
    ({"prefill": {"gpus": "1,1"}, "vllm": {"tensor_parallel_size": 2}}, "names 1 distinct GPU(s)"),
    ({"vllm": {"env": ["NOVALUE"]}}, "vllm.env[0]: 'NOVALUE' is not allowed; give KEY=VALUE"),
    ({"decode": {"env": ["1X=2"]}}, "decode.env[0]: '1X=2' is not allowed"),
])
def test_cuda_bad_values(model, tmp_path, over, needle):
    over = {"prefill": {"gpus": "0"}, "decode": {"gpus": "1"}, **over}
    with pytest.raises(ConfigError) as e:
        cuda_plan(model, tmp_path, **over)
    assert needle in str(e.value)


@pytest.mark.parametrize("over, needle", [
    ({"vllm": {"device": "tpu"}}, "vllm.device: 'tpu' is not allowed; choose one of cpu, cuda, auto"),
    ({"vllm": {"gpu_memory_utilization": 1.5}}, "vllm.gpu_memory_utilization: 1.5 is out of range; allowed 0.0..1.0"),
    ({"vllm": {"load_format": "gguf"}}, "vllm.load_format: 'gguf' is not allowed"),
    ({"vllm": {"kv_cache_memory_gb": -1}}, "vllm.kv_cache_memory_gb: -1.0 is out of range"),
])
def test_device_key_errors(model, tmp_path, over, needle):
    with pytest.raises(ConfigError) as e:
        plan(load(DeploymentConfig, free_config(model, tmp_path, **over)))
    assert needle in str(e.value)


def test_each_deployment_gets_its_own_shm_pool_by_default(model, tmp_path, capsys):
    """Issue 18: two deployments on one host shared pdkv-default, and stopping one removed the
    other's live pool. The default pool is named by the deployment's proxy port."""
    cfg = free_config(model, tmp_path)
    del cfg["connector"]["transport"]["name"]
    assert main(["launch", "--config", str(write_yaml(tmp_path, cfg)), "--dry-run"]) == 0
    procs = parse_dry_run(capsys.readouterr().out)
    kv = json.loads(flag(procs["prefill-0"][1], "--kv-transfer-config"))
    assert kv["kv_connector_extra_config"]["transport"]["name"] == f"default-{cfg['proxy']['port']}"
