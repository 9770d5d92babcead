"""The config schema every part builds on: dataclasses loaded from YAML/dicts with strict checks.

A field may carry ``metadata`` made by ``rng(lo, hi)`` (numbers) or ``choices(...)`` (strings);
``load(cls, data)`` refuses unknown keys and bad values with a ``ConfigError`` that names the key,
the value and what is allowed. transport/, store/ and pd/ define their config classes with it;
the address helpers here are shared by them. See docs/design.md ("Conventions").
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


_SHOW = reprlib.Repr()
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxlevel = 80, 80, 6, 6, 3


def show(value: Any) -> str:
    """``repr(value)``, cut short: an error quotes a bad value, never megabytes of it."""
    return _SHOW.repr(value)


def _name(name: Any) -> str:
    """A key's name as an error shows it: as it is, or quoted when empty, not a plain string or
    holding spaces or line breaks (which would hide it or split the one-line error)."""
    if isinstance(name, str) and name and name.isprintable() and name.strip() == name and len(name) <= 80:
        return name
    return show(name)


def rng(lo=None, hi=None, **kw) -> dict:
    m = dict(kw)
    if lo is not None:
        m["min"] = lo
    if hi is not None:
        m["max"] = hi
    return m


def choices(*values: str) -> dict:
    return {"choices": values}


WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "*", "")


def url_host(host: str) -> str:
    """``host`` as it goes into a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def advertised(bind: str, advertise: str, key: str, bind_key: str) -> str:
    """The address others connect to: ``advertise``, else ``bind``; ConfigError for a wildcard."""
    host = advertise or bind
    if host.strip() in WILDCARD_HOSTS:
        raise ConfigError(f"{key}: {host!r} is not an address other processes can connect to; give this "
                          f"host's IP or name ({bind_key} {bind!r} is only where it listens)")
    if "/" in host or " " in host or (":" in host and not host.strip("[]").count(":") > 1):
        raise ConfigError(f"{key}: {host!r} is not a host name or IP address (no scheme, port or path)")
    return host


def host_port(text: str, key: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port), or ConfigError naming ``key``."""
    t = text.strip()
    host, sep, port = t.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    bad = (not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or "/" in t
           or " " in t or (":" in host and not t.startswith("[")))
    if bad:
        raise ConfigError(f"{key}: {text!r} is not an address; expected host:port (e.g. 10.0.0.1:50051, "
                          "[fd00::1]:50051) with a port in 1..65535")
    return host, int(port)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, typing.List):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {show(value)}")
        return load(tp, value, prefix=key + ".")
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of names, got {show(value)}")
        kt, vt = typing.get_args(tp)
        return {_coerce(kt, k, f"{key} name {show(k)}"): _coerce(vt, v, f"{key}.{_name(k)}")
                for k, v in value.items()}
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {show(value)}")
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float
                raise ConfigError(f"{key}: {show(value)} is out of range; give a finite number") from None
        raise ConfigError(f"{key}: expected a number, got {show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {show(value)}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _check(f: dataclasses.Field, value: Any, key: str) -> None:
    m = f.metadata
    if "choices" in m and value not in m["choices"]:
        raise ConfigError(f"{key}: {show(value)} is not allowed; choose one of {', '.join(m['choices'])}")
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
        raise ConfigError(f"{key}: {value!r} is not allowed; give a finite number")
    lo, hi = m.get("min"), m.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}" if lo is not None and hi is not None else (
            f"at least {lo}" if lo is not None else f"at most {hi}")
        raise ConfigError(f"{key}: {show(value)} is out of range; allowed {allowed}")


def load(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, refusing unknown keys and bad values."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{_name(unknown[0])}; allowed keys{' under ' + prefix.rstrip('.') if prefix else ''}: "
            + ", ".join(sorted(fields))
        )
    obj = cls()
    for name, value in data.items():
        key = prefix + name
        default = getattr(obj, name)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A section given in part keeps the field's own defaults (e.g. decode's port_base 8200),
            # not those of the section's class.
            coerced = merge(default, value, prefix=key + ".")
        else:
            coerced = _coerce(hints[name], value, key)
        _check(fields[name], coerced, key)
        setattr(obj, name, coerced)
    return obj


def merge(base: Any, overrides: dict, prefix: str = "") -> Any:
    """Return a copy of dataclass ``base`` with ``overrides`` (a nested dict) applied."""
    merged = dataclasses.asdict(base)

    def deep(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                deep(dst[k], v)
            else:
                dst[k] = v

    deep(merged, overrides)
    return load(type(base), merged, prefix)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
