"""pd.config: strict loading (unknown keys, types, ranges, choices), YAML files, merge, kv_transfer_config."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from common.config import ConfigError, load, merge, to_dict
from launch.kv_config import kv_transfer_config
from pd.config import ConnectorConfig, DeploymentConfig, load_yaml


def _err(data: dict, cls: type = DeploymentConfig) -> str:
    with pytest.raises(ConfigError) as e:
        load(cls, data)
    return str(e.value)


def test_defaults_load_from_nothing():
    dep = load(DeploymentConfig, {})
    assert dep == DeploymentConfig() == load(DeploymentConfig, None)
    assert dep.mode == "pd" and dep.prefill.port_base != dep.decode.port_base
    assert dep.coordinator.address == "tcp://127.0.0.1:5570"


def test_unknown_top_level_key_names_it_and_lists_allowed():
    msg = _err({"modle": "x"})
    assert "unknown key modle" in msg
    for allowed in ("model", "mode", "prefill", "decode", "vllm", "proxy", "coordinator", "connector"):
        assert allowed in msg


@pytest.mark.parametrize("data, key, allowed", [
    ({"vllm": {"blocksize": 32}}, "vllm.blocksize", ["block_size", "max_model_len"]),
    ({"prefill": {"n": 2}}, "prefill.n", ["count", "port_base", "extra_args"]),
    ({"connector": {"transport": {"size": 1}}}, "connector.transport.size", ["kind", "pool_size_mb"]),
])
def test_unknown_nested_key(data, key, allowed):
    msg = _err(data)
    assert f"unknown key {key}" in msg
    assert "under " + key.rsplit(".", 1)[0] in msg
    for a in allowed:
        assert a in msg


@pytest.mark.parametrize("data, needle", [
    ({"vllm": {"block_size": "32"}}, "vllm.block_size: expected an integer, got '32'"),
    ({"vllm": {"block_size": 32.0}}, "vllm.block_size: expected an integer"),
    ({"vllm": {"max_num_seqs": True}}, "vllm.max_num_seqs: expected an integer, got True"),
    ({"vllm": {"enforce_eager": "yes"}}, "vllm.enforce_eager: expected true or false"),
    ({"proxy": {"upstream_timeout_s": "1"}}, "proxy.upstream_timeout_s: expected a number"),
    ({"model": 3}, "model: expected a string, got 3"),
    ({"vllm": 5}, "vllm: expected a mapping, got 5"),
    ({"vllm": {"extra_args": "--foo"}}, "vllm.extra_args: expected a list of a string"),
    ({"decode": {"extra_args": ["--x", 1]}}, "decode.extra_args[1]: expected a string, got 1"),
])
def test_wrong_types_name_key_and_value(data, needle):
    assert needle in _err(data)


def test_int_is_accepted_for_a_float():
    dep = load(DeploymentConfig, {"proxy": {"upstream_timeout_s": 5}})
    assert dep.proxy.upstream_timeout_s == 5.0 and isinstance(dep.proxy.upstream_timeout_s, float)


@pytest.mark.parametrize("data, needle", [
    ({"proxy": {"port": 70000}}, "proxy.port: 70000 is out of range; allowed 1..65535"),
    ({"proxy": {"port": 0}}, "proxy.port: 0 is out of range; allowed 1..65535"),
    ({"prefill": {"count": -1}}, "prefill.count: -1 is out of range; allowed 0..64"),
    ({"connector": {"wait_timeout_s": 0}}, "connector.wait_timeout_s: 0.0 is out of range; allowed 0.01..3600"),
    ({"vllm": {"kv_cache_space_gb": 0}}, "vllm.kv_cache_space_gb: 0 is out of range"),
])
def test_out_of_range_shows_range(data, needle):
    assert needle in _err(data)


@pytest.mark.parametrize("data, needle", [
    ({"mode": "split"}, "mode: 'split' is not allowed; choose one of pd, colocated"),
    ({"vllm": {"dtype": "fp8"}}, "choose one of auto, bfloat16, float16, float32"),
    ({"connector": {"transport": {"kind": "rdma"}}}, "connector.transport.kind: 'rdma' is not allowed"),
    ({"proxy": {"policy": "random"}}, "choose one of prefix, least_outstanding, round_robin"),
])
def test_bad_choice_lists_choices(data, needle):
    assert needle in _err(data)


VllmDefaults = DeploymentConfig().vllm
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pd.yaml"


def test_yaml_file(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("model: /m\nmode: colocated\nprefill: {count: 3, port_base: 9000}\nvllm:\n  block_size: 64\n")
    dep = load_yaml(f)
    assert (dep.model, dep.mode, dep.prefill.count, dep.prefill.port_base) == ("/m", "colocated", 3, 9000)
    assert dep.vllm.block_size == 64 and dep.vllm.max_model_len == VllmDefaults.max_model_len
    assert dep.decode == DeploymentConfig().decode  # untouched sections keep their defaults


def test_example_shows_every_key_with_its_default():
    import yaml

    assert load_yaml(EXAMPLE) == DeploymentConfig()

    def keys(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
        return out

    assert keys(yaml.safe_load(EXAMPLE.read_text())) == keys(to_dict(DeploymentConfig()))


def test_empty_yaml_is_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing\n")
    assert load_yaml(f) == DeploymentConfig()


def test_yaml_missing(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")


def test_yaml_invalid(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: [unclosed\n  mode: pd\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(f)


def test_yaml_not_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- model\n- mode\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(f)


def test_yaml_unknown_key(tmp_path):
    f = tmp_path / "u.yaml"
    f.write_text("vllm:\n  max_len: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key vllm\.max_len"):
        load_yaml(f)


def test_merge_overrides_nested_and_keeps_the_rest():
    base = load(DeploymentConfig, {"model": "/a", "prefill": {"count": 2, "port_base": 9100},
                                   "vllm": {"block_size": 64}})
    out = merge(base, {"prefill": {"count": 4}, "proxy": {"port": 9000}, "mode": "colocated"})
    assert (out.prefill.count, out.prefill.port_base) == (4, 9100)
    assert out.proxy.port == 9000 and out.mode == "colocated" and out.vllm.block_size == 64 and out.model == "/a"
    assert base.prefill.count == 2 and base.proxy.port == 8000  # the base is not modified


def test_merge_validates_overrides():
    with pytest.raises(ConfigError, match="proxy.port: 0 is out of range"):
        merge(DeploymentConfig(), {"proxy": {"port": 0}})
    with pytest.raises(ConfigError, match="unknown key bogus"):
        merge(DeploymentConfig(), {"bogus": 1})


def test_to_dict_round_trips():
    dep = load(DeploymentConfig, {"model": "/m", "decode": {"count": 2, "extra_args": ["--a"]}})
    assert load(DeploymentConfig, to_dict(dep)) == dep


@pytest.mark.parametrize("role, kv_role", [("prefill", "kv_producer"), ("decode", "kv_consumer"), ("both", "kv_both")])
def test_kv_transfer_config(role, kv_role):
    dep = load(DeploymentConfig, {"coordinator": {"host": "10.0.0.1", "port": 6000, "heartbeat_interval_s": 0.5},
                                  "connector": {"chunk_size": 512, "transport": {"name": "t1"}}})
    kv = kv_transfer_config(dep, role, f"{role}-3")
    assert json.loads(json.dumps(kv)) == kv  # it goes on a command line as JSON
    assert kv["kv_connector"] == "PDConnector" and kv["kv_connector_module_path"] == "pd.connector"
    assert kv["kv_role"] == kv_role
    extra = kv["kv_connector_extra_config"]
    assert extra["coordinator"] == "tcp://10.0.0.1:6000"
    assert extra["instance_id"] == f"{role}-3"
    assert extra["heartbeat_interval_s"] == 0.5
    assert extra["chunk_size"] == 512 and extra["transport"]["name"] == "t1"
    # the connector reads it back with the same strict loader
    conn = load(ConnectorConfig, extra, prefix="kv_connector_extra_config.")
    assert conn.chunk_size == 512 and conn.instance_id == f"{role}-3"
    assert set(extra) == {f.name for f in dataclasses.fields(ConnectorConfig)}


def test_kv_transfer_config_bad_role():
    with pytest.raises(ConfigError, match="role 'router' is not allowed; choose one of prefill, decode, both"):
        kv_transfer_config(DeploymentConfig(), "router", "x")


# ---- exact messages, non-mapping input, full round trip ----------

def test_unknown_nested_key_exact_message():
    assert _err({"proxy": {"prot": 8000}}) == (
        "unknown key proxy.prot; allowed keys under proxy: api_key_file, body_timeout_s, chat_first_token, "
        "early_decode, first_token, header_timeout_s, host, kv_usage_poll_s, policy, port, prefix_block_tokens, prefix_load_slack, "
        "upstream_timeout_s")


def test_unknown_keys_that_are_not_strings():
    assert "unknown key 1" in _err({1: 2, "foo": 3})  # a YAML `1: 2` must not crash the sort


@pytest.mark.parametrize("data", [[], 0, False, "", ["model"], "pd"])
def test_load_refuses_a_non_mapping(data):
    assert "config: expected a mapping" in _err(data)


@pytest.mark.parametrize("text", ["[]\n", "42\n", "just words\n", "false\n", "- model: /m\n"])
def test_yaml_file_that_is_not_a_mapping_names_the_file(tmp_path, text):
    f = tmp_path / "odd.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_yaml(f)
    assert str(f) in str(e.value) and "expected a mapping" in str(e.value)


def test_yaml_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path)


def test_merge_three_levels_deep_keeps_siblings():
    base = load(DeploymentConfig, {"connector": {"chunk_size": 512, "transport": {"pool_size_mb": 64}}})
    out = merge(base, {"connector": {"transport": {"name": "x"}}})
    t = out.connector.transport
    assert (t.name, t.pool_size_mb, t.kind, t.shm_dir) == ("x", 64, "shm", "/dev/shm")
    assert out.connector.chunk_size == 512 and out.connector.wait_timeout_s == 60.0
    with pytest.raises(ConfigError, match="unknown key connector.transport.nmae"):
        merge(base, {"connector": {"transport": {"nmae": "x"}}})
    with pytest.raises(ConfigError, match="connector.transport: expected a mapping"):
        merge(base, {"connector": {"transport": "shm"}})


def test_kv_transfer_config_fields_and_full_round_trip():
    dep = load(DeploymentConfig, {"coordinator": {"host": "127.0.0.2", "port": 6123, "heartbeat_interval_s": 1.5},
                                  "connector": {"io_threads": 3, "wait_timeout_s": 7,
                                                "transport": {"pool_size_mb": 32, "name": "rt"}}})
    for role, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        kv = json.loads(json.dumps(kv_transfer_config(dep, role, f"{role}-1")))  # as vLLM gets it
        assert kv["kv_connector"] == "PDConnector"
        assert kv["kv_connector_module_path"] == "pd.connector"
        assert kv["kv_role"] == kv_role
        assert kv["kv_load_failure_policy"] == "recompute"
        assert kv["kv_buffer_device"] == "cpu"
        back = load(ConnectorConfig, kv["kv_connector_extra_config"])
        assert back == dataclasses.replace(dep.connector, coordinator="tcp://127.0.0.2:6123",
                                           instance_id=f"{role}-1", heartbeat_interval_s=1.5,
                                           head_groups=1)  # lcm(prefill TP, decode TP): pd.connector.heads
        assert back.transport.pool_size_mb == 32 and back.io_threads == 3 and back.wait_timeout_s == 7.0
    assert dep.connector.instance_id == "" and dep.connector.coordinator == "tcp://127.0.0.1:5570"  # not modified


def test_the_libraries_refuse_bad_config_with_the_one_config_error(tmp_path):
    """transport/ and store/ raise common.config.ConfigError for settings they refuse, the error
    the CLI turns into one line (launch/cli.py's USER_ERRORS)."""
    from types import SimpleNamespace

    from launch.cli import USER_ERRORS
    from store import make_store
    from store.config import StoreConfig
    from transport import make_transport
    from transport.config import MooncakeConfig, TransportConfig

    assert ConfigError in USER_ERRORS
    with pytest.raises(ConfigError, match="unknown store backend 'tape'"):
        make_store(SimpleNamespace(backend="tape"))
    with pytest.raises(ConfigError, match="size_gb"):  # under a MiB per writer
        make_store(StoreConfig(backend="local", paths=[str(tmp_path)], size_gb=0.001, writers=2))
    with pytest.raises(ConfigError, match="is not a directory"):
        (tmp_path / "f").write_text("")
        make_store(StoreConfig(backend="local", paths=[str(tmp_path / "f")]))
    with pytest.raises(ConfigError, match="unknown transport kind 'pigeon'"):
        make_transport(SimpleNamespace(kind="pigeon"))
    with pytest.raises(ConfigError, match="device_name"):
        TransportConfig(kind="mooncake", mooncake=MooncakeConfig(device_name="mlx5_0")).mooncake.check()


# ---- issue 18, item 5: config as a careless user writes it ------------------------------------

def test_a_section_given_in_part_keeps_that_fields_defaults(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("model: /m\ndecode: {count: 1, tp: 1}\n")
    dep = load_yaml(f)
    assert (dep.prefill.port_base, dep.decode.port_base) == (8100, 8200)  # not the class default 8100


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("model: /m\nproxy:\n  api_key_file: /k\nproxy:\n  port: 9000\n")
    with pytest.raises(ConfigError, match=r"key 'proxy' is given twice in one mapping \(lines 2 and 4\)"):
        load_yaml(f)


def test_exponent_numbers_are_numbers(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("model: /m\nconnector:\n  store: {size_gb: 1e3}\n")
    assert load_yaml(f).connector.store.size_gb == 1000.0


def test_instance_ports_past_65535_are_refused():
    from launch.procs import check_config

    dep = DeploymentConfig(model="/m")
    dep.decode.port_base, dep.decode.count = 65535, 2
    with pytest.raises(ConfigError, match=r"decode.port_base: 65535 with 2 instances needs ports up to 65536"):
        check_config(dep)
