"""`pd stats`: the coordinator's counters, instances and (optionally) one transfer."""
from __future__ import annotations

import argparse

import msgspec

from pd.config import ConfigError, CoordinatorConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pd stats``."""
    p.add_argument("--coordinator", default=CoordinatorConfig().address,
                   help="coordinator address (default %(default)s)")
    p.add_argument("--pd-id", default="", help="also show the record of this transfer (the x-pd-id header)")


def _num(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.3f}"


def run(args: argparse.Namespace) -> int:
    """Print what the coordinator knows; ConfigError (exit 2) if it does not answer."""
    import logging

    from pd.coord_client import CoordinatorClient

    if not getattr(args, "verbose", False):  # no answer is reported once, as the error below
        logging.getLogger("pd.coordinator.client").setLevel(logging.ERROR)
    client = CoordinatorClient(args.coordinator, timeout_s=3)
    try:
        reply = client.query(args.pd_id)
    finally:
        client.close()
    if reply is None:
        raise ConfigError(f"no answer from the coordinator at {args.coordinator}")
    print(f"coordinator {args.coordinator}")
    print("counters:")
    for k, v in sorted(reply.counters.items()):
        print(f"  {k:<22} {_num(v):>16}")
    print("instances:" if reply.instances else "instances: none registered")
    for i in reply.instances:
        print(f"  {i.instance_id:<16} {i.role:<8} {'alive' if i.alive else 'DOWN':<6} pid {i.pid:<8} "
              f"last seen {i.last_seen_s:.1f}s ago  {i.url}")
    if args.pd_id:
        if reply.transfer is None:
            print(f"transfer {args.pd_id}: unknown pd_id")
        else:
            print(f"transfer {args.pd_id}:")
            for k, v in msgspec.structs.asdict(reply.transfer).items():
                if k != "pd_id":
                    print(f"  {k:<10} {v}")
    return 0
