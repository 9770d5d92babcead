"""`pd launch` with tensor-parallel pools: prefill.tp / decode.tp, flags, cores per rank, head groups."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import ConfigError, load
from launch.cli import main
from launch.procs import cpu_binds, plan
from pd.config import DeploymentConfig
from tests.unit.test_launcher import free_port as _port


@pytest.fixture
def model(tmp_path) -> Path:
    """A model directory the launcher accepts, with 2 KV heads (vLLM never runs here)."""
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({"num_key_value_heads": 2}))
    (tmp_path / "tiny" / "tokenizer.json").write_text("{}")
    return tmp_path / "tiny"


def _cfg(model, tmp_path, **groups) -> dict:
    cfg = {"model": str(model), "run_dir": str(tmp_path / "run"),
           "prefill": {"port_base": _port()}, "decode": {"port_base": _port()},
           "proxy": {"port": _port()}, "coordinator": {"port": _port()},
           "connector": {"transport": {"shm_dir": str(tmp_path / "shm"), "name": "t"}}}
    for k, v in groups.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def _instances(cfg: dict) -> dict:
    """name -> (env, argv, kv connector extra config) of the planned vLLM instances."""
    out = {}
    for s in plan(load(DeploymentConfig, cfg)):
        if "vllm.entrypoints" in " ".join(s.argv):
            ktc = json.loads(s.argv[s.argv.index("--kv-transfer-config") + 1])
            out[s.name] = (s.env, s.argv, ktc["kv_connector_extra_config"])
    return out


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_tp_per_pool_on_cpu(model, tmp_path):
    got = _instances(_cfg(model, tmp_path, prefill={"tp": 2}, decode={"tp": 1}, vllm={"cpu_bind": "0|1;1"}))
    env, argv, conn = got["prefill-0"]
    assert _flag(argv, "--tensor-parallel-size") == "2" and _flag(argv, "--distributed-executor-backend") == "mp"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1" and conn["head_groups"] == 2
    env, argv, conn = got["decode-0"]
    assert "--tensor-parallel-size" not in argv and env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert conn["head_groups"] == 2  # lcm(2, 1): both sides cut heads the same way
    # prefill writes a store shard per head group: 2 writers share the one path's budget
    assert conn["store"]["writers"] == 2


def test_vllm_tensor_parallel_size_is_the_default_of_both_pools(model, tmp_path):
    got = _instances(_cfg(model, tmp_path, vllm={"tensor_parallel_size": 2, "cpu_bind": "0|1;0|1"}))
    assert all(_flag(a, "--tensor-parallel-size") == "2" and c["head_groups"] == 2 for _, a, c in got.values())


def test_split_binds_each_rank_to_its_own_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(8)))
    assert cpu_binds("split", 2, [2, 1]) == ["0,1|2,3", "4,5"]
    assert cpu_binds("split", 2, [2, 2]) == ["0,1|2,3", "4,5|6,7"]
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1})
    assert cpu_binds("split", 2, [2, 1]) == ["0|1", "0"]  # more ranks than cores: round-robin


@pytest.mark.parametrize("bind, tps, needle", [
    ("0;1", [2, 1], "'0' gives 1 core lists for an instance with tp 2"),
    ("0|1;1|0", [2, 1], "'1|0' gives 2 core lists for an instance with tp 1"),
    ("0||1;1", [2, 1], "allowed: split, auto, nobind"),
])
def test_explicit_binds_name_one_list_per_rank(bind, tps, needle):
    with pytest.raises(ConfigError, match="vllm.cpu_bind") as e:
        cpu_binds(bind, 2, tps)
    assert needle in str(e.value)


@pytest.mark.parametrize("groups, needle", [
    ({"prefill": {"tp": 4}}, "prefill.tp 4 (prefill.tp 4, decode.tp 1): tensor_parallel_size 4 is more than "
                             "the model's 2 KV heads"),
    ({"prefill": {"tp": 2}, "decode": {"tp": 1}, "connector": {"head_groups": 1}},
     "prefill.tp 2 (prefill.tp 2, decode.tp 1): connector.head_groups: 1 is not a multiple"),
])
def test_tp_sizes_that_cannot_exchange_kv_are_refused_before_start(model, tmp_path, groups, needle):
    with pytest.raises(ConfigError) as e:
        plan(load(DeploymentConfig, _cfg(model, tmp_path, **groups)))
    assert needle in str(e.value)


def test_cuda_pools_get_as_many_gpus_as_their_tp(model, tmp_path):
    from launch.gpus import gpu_slots
    from launch.procs import instance_ports

    dep = load(DeploymentConfig, _cfg(model, tmp_path, prefill={"tp": 2}, decode={"tp": 1}, vllm={"device": "cuda"}))
    assert [s.visible for s in gpu_slots(dep, instance_ports(dep), count=4)] == ["0,1", "2"]
    got = _instances(_cfg(model, tmp_path, prefill={"tp": 2, "gpus": "0,1"}, decode={"tp": 1, "gpus": "1"},
                          vllm={"device": "cuda", "kv_cache_memory_gb": 1}))
    assert _flag(got["prefill-0"][1], "--tensor-parallel-size") == "2"
    assert got["prefill-0"][0]["CUDA_VISIBLE_DEVICES"] == "0,1" and got["decode-0"][0]["CUDA_VISIBLE_DEVICES"] == "1"
    assert "--tensor-parallel-size" not in got["decode-0"][1]
    with pytest.raises(ConfigError, match="decode.gpus: '0,1' names 2 distinct GPU.s. but decode.tp"):
        _instances(_cfg(model, tmp_path, prefill={"tp": 2, "gpus": "0,1"}, decode={"gpus": "0,1"},
                        vllm={"device": "cuda", "kv_cache_memory_gb": 1}))


def test_flags_set_tp_per_pool(model, tmp_path, capsys):
    cfg = tmp_path / "pd.yaml"
    cfg.write_text(json.dumps(_cfg(model, tmp_path)))
    assert main(["launch", "--config", str(cfg), "--prefill-tp", "2", "--decode-tp", "1",
                 "--set", "vllm.cpu_bind=0|1;1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--tensor-parallel-size 2" in out and "VLLM_CPU_OMP_THREADS_BIND='0|1'" in out


def test_shm_between_hosts_at_loopback_addresses_is_one_machine(model, tmp_path):
    """The TP end-to-end test runs two "hosts" at 127.0.0.1 and 127.0.0.2 over one shm pool."""
    cfg = _cfg(model, tmp_path)
    cfg["hosts"] = {"x": {"address": "127.0.0.1", "roles": ["control", "prefill", "decode"]},
                    "y": {"address": "127.0.0.2", "roles": ["prefill", "decode"]}}
    names = [s.name for s in plan(load(DeploymentConfig, cfg), host="y")]
    assert names == ["prefill-1", "decode-1"]
    cfg["hosts"]["y"]["address"] = "10.0.0.2"
    with pytest.raises(ConfigError, match="shm moves KV only within one host, but the instances run on this "
                                          "machine, y"):
        plan(load(DeploymentConfig, cfg), host="x")
