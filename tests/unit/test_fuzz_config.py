"""Config files, fuzzed (hypothesis): values of every type and range for every key of the schema
(pd/config.py's dataclasses), unknown keys, YAML text that is not a mapping or not YAML, files
that are not UTF-8, alias bombs; through ``load``, ``load_yaml`` and ``pd launch --dry-run``.
Every bad value gets a ConfigError (``pd``: exit 2 and one line naming it), never a traceback;
what loads has every number finite and in its documented range."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from pathlib import Path

import pytest
import yaml
from fuzzing import fuzz_settings, tried
from hypothesis import example, given
from hypothesis import strategies as st

from common.config import ConfigError, load
from launch.cli import main as cli_main
from pd.config import DeploymentConfig, load_yaml

pytestmark = pytest.mark.timeout(600)

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"

garbage = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _field_values(f: dataclasses.Field, tp, wild: bool) -> st.SearchStrategy:
    """Values for field ``f`` of type ``tp``: near its bounds, its choices, its type, or (``wild``)
    anything; not ``wild``: only values of its type, range and choices (they get past ``load``
    and on to the launcher's own checks)."""
    m, origin = f.metadata, typing.get_origin(tp)
    lo, hi = m.get("min"), m.get("max")
    if dataclasses.is_dataclass(tp):
        good = config_dicts(tp, wild)
    elif origin is dict:
        good = st.dictionaries(st.text(max_size=8), config_dicts(typing.get_args(tp)[1], wild), max_size=2)
    elif origin is list:
        good = st.lists(st.text(max_size=16), max_size=3)
    elif tp is bool:
        good = st.booleans()
    elif tp in (int, float) and not wild:
        lo = -(2**40) if lo is None else lo
        hi = 2**40 if hi is None else hi
        good = st.integers(lo, hi) if tp is int else st.floats(lo, hi)
    elif tp in (int, float):
        edges = [v for b in (lo, hi) if b is not None for v in (b - 1, b, b + 1)]
        nums = st.integers(-(2**64), 2**64) if tp is int else st.floats()
        good = st.sampled_from(edges) | nums if edges else nums
    elif "choices" in m:
        good = st.sampled_from(m["choices"]) | (st.text(max_size=10) if wild else st.nothing())
    else:
        good = st.text(max_size=30)
    return st.one_of(good, good, garbage) if wild else good


def config_dicts(cls, wild: bool = True) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls)
    fields = {f.name: st.deferred(lambda f=f: _field_values(f, hints[f.name], wild)) for f in dataclasses.fields(cls)}
    known = st.fixed_dictionaries({}, optional=fields)
    if not wild:
        return known
    return st.one_of(known, known, st.builds(lambda d, k, v: {**d, k: v}, known, st.text(max_size=10), garbage))


def check_loaded(obj, key: str = "") -> None:
    """Every number of a loaded config is finite and within its field's range."""
    for f in dataclasses.fields(obj):
        v, k = getattr(obj, f.name), f"{key}{f.name}"
        if dataclasses.is_dataclass(v):
            check_loaded(v, k + ".")
        elif isinstance(v, dict):
            for name, item in v.items():
                check_loaded(item, f"{k}.{name}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            assert math.isfinite(v), f"{k} = {v!r} was accepted"
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            assert (lo is None or v >= lo) and (hi is None or v <= hi), f"{k} = {v!r} out of range was accepted"
        if "choices" in f.metadata:
            assert v in f.metadata["choices"], f"{k} = {v!r} was accepted"


def load_or_error(data) -> None:
    tried("config")
    try:
        cfg = load(DeploymentConfig, data)
    except ConfigError as e:
        assert str(e) and len(str(e)) < 2000, f"an unclear or unbounded error: {str(e)[:300]!r}..."
        return
    check_loaded(cfg)


@fuzz_settings(400)
@given(data=config_dicts(DeploymentConfig))
@example(data={"coordinator": {"entry_ttl_s": math.nan}})
@example(data={"proxy": {"upstream_timeout_s": math.nan}})
@example(data={"connector": {"store": {"size_gb": math.inf}}})
def test_values_of_any_type_and_range_load_or_get_a_config_error(data):
    load_or_error(data)


def test_not_a_number_is_refused_naming_the_key():
    """Found by the fuzzer: NaN passed every range check (NaN < min and NaN > max are false)."""
    for section, key in (("coordinator", "entry_ttl_s"), ("proxy", "upstream_timeout_s"), ("vllm", "startup_timeout_s")):
        with pytest.raises(ConfigError, match=f"{section}.{key}: nan is not allowed"):
            load(DeploymentConfig, {section: {key: math.nan}})


@pytest.mark.parametrize("data", [{"prefill": {"count": list(range(100_000))}},
                                  {"vllm": {"extra_args": [["x"] * 100_000]}},
                                  {"proxy": {"port": 10**400}}, {"vllm": {"startup_timeout_s": 10**400}}])
def test_errors_quote_a_bad_value_cut_short(data):
    """An error quoted the whole bad value (a 100,000-item list made a message of 600 KB); a
    number no float can hold raised OverflowError instead of a ConfigError."""
    tried("config")
    with pytest.raises(ConfigError) as e:
        load(DeploymentConfig, data)
    assert len(str(e.value)) < 300, len(str(e.value))


@fuzz_settings(200)
@given(text=st.text(max_size=300) | st.sampled_from(["- a\n- b", "42", "{a: [1, {b: 2}]}", ": :", "!!python/object:os.system x"]))
def test_yaml_text_of_any_kind(tmp_path_factory, text):
    f = tmp_path_factory.mktemp("cfg") / "pd.yaml"
    f.write_text(text)
    tried("config")
    try:
        cfg = load_yaml(f)
    except ConfigError as e:
        assert str(f) in str(e) or "unknown key" in str(e) or ":" in str(e), str(e)
        return
    check_loaded(cfg)


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00bad", b"proxy:\n  port: \x80\n"])
def test_a_file_that_is_not_utf8_is_a_config_error_naming_it(tmp_path, raw):
    """Found by the fuzzer: UnicodeDecodeError escaped load_yaml (pd coordinator printed it without
    the file's name)."""
    f = tmp_path / "pd.yaml"
    f.write_bytes(raw)
    tried("config")
    with pytest.raises(ConfigError, match=str(f)):
        load_yaml(f)


@fuzz_settings(80)
@given(data=config_dicts(DeploymentConfig) | config_dicts(DeploymentConfig, wild=False))
@example(data={"\r": None})  # the error named the key as it was: a line break split the one line
@example(data={"hosts": {"\r": {"": None}}})  # ... and the name of a host too
def test_pd_launch_dry_run_exits_0_or_2_with_one_line(tmp_path_factory, capsys, data):
    """The whole path of a config file through the launcher's checks and plan, without starting."""
    store = (data.get("connector") or {}).get("store") if isinstance(data.get("connector"), dict) else None
    if isinstance(store, dict) and isinstance(store.get("paths"), list):  # the launcher makes missing store
        store["paths"] = [re.sub(r"^(file://)?/*", "", p) if isinstance(p, str) else p  # paths: keep them
                          for p in store["paths"]]                                     # in the test's dir
    here = tmp_path_factory.mktemp("launch")
    f = here / "pd.yaml"
    try:
        f.write_text(yaml.safe_dump(data, allow_unicode=True))
    except (yaml.YAMLError, ValueError):
        return
    tried("config")
    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(here)
    try:
        rc = cli_main(["launch", "--config", str(f), "--dry-run", "--model", str(MODEL)])
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    assert rc in (0, 2), (rc, err[-500:])
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pd launch: error: "), err[-500:]
