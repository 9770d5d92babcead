"""`pd stats`: the coordinator's counters, instances and (optionally) one transfer."""
from __future__ import annotations

import argparse

import msgspec

from pd.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default="tcp://127.0.0.1:5570")
    p.add_argument("--pd-id", default="", help="also show the record of this transfer")


def run(args) -> int:
    from pd.coord_client import CoordinatorClient

    client = CoordinatorClient(args.coordinator, timeout_s=3)
    reply = client.query(args.pd_id)
    client.close()
    if reply is None:
        raise ConfigError(f"no answer from the coordinator at {args.coordinator}")
    print("counters:")
    for k, v in sorted(reply.counters.items()):
        print(f"  {k:<22} {v:g}")
    print("instances:")
    for i in reply.instances:
        print(f"  {i.instance_id:<16} {i.role:<8} {'alive' if i.alive else 'DOWN':<6} pid {i.pid} "
              f"last seen {i.last_seen_s:.1f}s ago")
    if args.pd_id:
        print("transfer:", msgspec.json.encode(reply.transfer).decode() if reply.transfer else "unknown pd_id")
    return 0
