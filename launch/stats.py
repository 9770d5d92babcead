"""`pd stats`: the coordinator's counters, instances, the p50/p99 of each span of the transfers it
remembers (where the time goes: docs/design.md, "The timeline") and (optionally) one transfer."""
from __future__ import annotations

import argparse
import logging

import msgspec

from common.config import ConfigError
from launch.topology import layout
from pd.config import CoordinatorConfig, load_yaml
from pd.coordinator.client import PROBE_OK, CoordinatorClient, probe
from pd.coordinator.curve import effective_auth, load_client_keys, local_keys_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pd stats``."""
    p.add_argument("--config", help="deployment YAML: the coordinator's address and keys come from it")
    p.add_argument("--coordinator", default=None,
                   help=f"coordinator address (default: the config's, else {CoordinatorConfig().address})")
    p.add_argument("--keys-dir", help="CurveZMQ keys (coordinator.keys_dir); given: use CURVE")
    p.add_argument("--client-key", default=None, help="this client's keypair in the keys dir (default client)")
    p.add_argument("--pd-id", default="", help="also show the record of this transfer (the x-pd-id header)")


def _target(args: argparse.Namespace):
    """(address, ClientKeys or None) from --config and the flags."""
    dep = load_yaml(args.config) if getattr(args, "config", None) else None
    cfg = dep.coordinator if dep is not None else CoordinatorConfig()
    if args.coordinator:
        address = args.coordinator
    elif dep is not None and dep.hosts:
        address = layout(dep).coordinator_address
    else:
        address = cfg.address
    keys_dir = getattr(args, "keys_dir", None) or (cfg.keys_dir if effective_auth(cfg) == "curve" else "")
    if not keys_dir and cfg.auth == "auto":  # the keys pd launch made for a one-host deployment
        own = local_keys_dir(int(address.rsplit(":", 1)[1]))
        keys_dir = str(own) if (own / "client.key_secret").is_file() else ""
    client = getattr(args, "client_key", None) or cfg.client_key
    return address, (load_client_keys(keys_dir, client) if keys_dir else None)


def _num(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.3f}"


def print_spans(spans: dict) -> None:
    """The p50/p99 of each span (``SpanSummary``s by name) as a table."""
    if not spans:
        print("spans: no finished transfer remembered")
        return
    n = max(s.n for s in spans.values())
    print(f"spans (ms, over the last {n} finished transfers the coordinator remembers):")
    print(f"  {'span':<22} {'n':>6} {'p50':>10} {'p99':>10}")
    for name, s in spans.items():
        print(f"  {name:<22} {s.n:>6} {s.p50:>10.3f} {s.p99:>10.3f}")


def run(args: argparse.Namespace) -> int:
    """Print what the coordinator knows; ConfigError (exit 2) if it does not answer."""
    if not getattr(args, "verbose", False):  # no answer is reported once, as the error below
        logging.getLogger("pd.coordinator.client").setLevel(logging.ERROR)
    address, keys = _target(args)
    client = CoordinatorClient(address, timeout_s=3, keys=keys)
    try:
        reply = client.query(args.pd_id, spans=True)
    finally:
        client.close()
    if reply is None:
        status, why = probe(address, keys, timeout_s=2)
        raise ConfigError(f"no answer from the coordinator at {address}" + ("" if status == PROBE_OK else f": {why}"))
    print(f"coordinator {address}{' (CurveZMQ)' if keys else ''}")
    print("counters:")
    for k, v in sorted(reply.counters.items()):
        print(f"  {k:<22} {_num(v):>16}")
    print("instances:" if reply.instances else "instances: none registered")
    for i in reply.instances:
        print(f"  {i.instance_id:<16} {i.role:<8} {'alive' if i.alive else 'DOWN':<6} pid {i.pid:<8} "
              f"last seen {i.last_seen_s:.1f}s ago  {i.url}")
    print_spans(reply.spans)
    if args.pd_id:
        if reply.transfer is None:
            print(f"transfer {args.pd_id}: unknown pd_id")
        else:
            print_transfer(reply.transfer)
    return 0


def print_transfer(rec) -> None:
    """A ``TransferRecord``: its fields, then its timeline (the coordinator's part) and spans."""
    print(f"transfer {rec.pd_id}:")
    for k, v in msgspec.structs.asdict(rec).items():
        if k not in ("pd_id", "timeline", "spans"):
            print(f"  {k:<14} {v}")
    t0 = min((e.t_ms for e in rec.timeline), default=0.0)
    print("  timeline (ms from its first event; each on its source's clock):")
    for e in sorted(rec.timeline, key=lambda e: e.t_ms):
        extra = {k: v for k, v in msgspec.to_builtins(e).items() if k not in ("name", "t_ms", "source")}
        print(f"    {e.t_ms - t0:>10.3f}  {e.source:<12} {e.name:<12} {extra or ''}")
    print("  spans (ms): " + ", ".join(f"{k} {v:g}" for k, v in rec.spans.items()))
