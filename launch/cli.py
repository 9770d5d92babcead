"""`pd`: the one command of pdkv, with subcommands.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``.
Only the module of the subcommand being run is imported, so a broken or missing module affects
that subcommand alone (it answers ``pd <cmd>: error: not available: ...``) and ``pd --help``
stays fast. User errors (bad config, bad paths, ports in use) print one line
``pd <cmd>: error: ...`` on stderr and exit 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from common.config import ConfigError

# subcommand -> (module with add_arguments/run, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "launch": ("launch.launcher", "start a P/D (or colocated) deployment"),
    "demo": ("launch.demo", "make the test model, launch 1P1D, send requests, show the KV that moved"),
    "proxy": ("pd.proxy.server", "the OpenAI-compatible proxy that splits requests into prefill and decode"),
    "coordinator": ("pd.coordinator.server", "the ZMQ coordinator that matches prefill and decode"),
    "make-model": ("launch.model", "write a small random HF model with a locally trained tokenizer"),
    "plan": ("launch.plan", "which prefill:decode split of N GPUs (or colocated) serves the most within the SLOs"),
    "stats": ("launch.stats", "show the coordinator's counters, instances and one transfer"),
    "scale": ("launch.ray_scale", "change the pool sizes of a pd launch --ray deployment while it serves"),
    "keys": ("pd.coordinator.curve", "make CurveZMQ keys for the coordinator (server, clients, allow-list)"),
}
BENCH: dict[str, tuple[str, str]] = {
    "transport": ("launch.bench.transport", "put/get throughput and latency of a transport vs memcpy"),
    "ttft": ("launch.bench.ttft", "cold vs warm time to first token of a long prompt (prefix reuse from the store)"),
    "kv": ("launch.bench.kv", "chunk gather/scatter speed of the paged KV cache vs a plain copy (CPU or GPU)"),
    "store": ("launch.bench.store", "write/read GB/s and per-chunk latency of a KV store vs plain O_DIRECT I/O"),
    "serve": ("launch.bench.serve", "P/D vs colocated serving under one load: TTFT, TPOT, ITL, goodput"),
    "plot": ("launch.bench.plot", "redraw the plots (and report) of a pd bench serve sweep from its results JSON"),
    "soak": ("launch.bench.soak", "mixed traffic for minutes: RSS, fds, pool, store, coordinator, errors; flat?"),
}
EXIT_USAGE = 2
USER_ERRORS = (ConfigError, ValueError, OSError)  # one line on stderr, exit 2, no traceback

log = logging.getLogger("launch.cli")


def _add(sub: argparse._SubParsersAction, name: str, module: str, help_text: str, selected: bool,
         cmd: str) -> None:
    """Add subcommand ``name``; import its module (for its options) only if it is the one run."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(_module=module, _cmd=cmd)
    if not selected:
        return
    try:
        importlib.import_module(module).add_arguments(p)
    except Exception as e:  # noqa: BLE001 - a broken module must not break the other subcommands
        p.set_defaults(_import_error=f"{type(e).__name__}: {e}")
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _selected(argv: Sequence[str]) -> list[str]:
    """The positional words of ``argv`` (the subcommand, and bench's sub-subcommand)."""
    return [a for a in argv if not a.startswith("-")][:2]


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``pd`` parser; the options of the subcommand named in ``argv`` are loaded."""
    words = _selected(argv)
    parser = argparse.ArgumentParser(prog="pd", description="pdkv: disaggregated prefill/decode for vLLM")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        _add(sub, name, module, help_text, selected=words[:1] == [name], cmd=name)
    bench_p = sub.add_parser("bench", help="benchmarks", description="benchmarks")
    bench = bench_p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_text) in BENCH.items():
        _add(bench, name, module, help_text, selected=words == ["bench", name], cmd=f"bench {name}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pd``; returns the exit status (0 ok, 1 failure, 2 user error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "_import_error", None):
        print(f"pd {args._cmd}: error: not available ({args._module}): {args._import_error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except USER_ERRORS as e:
        log.debug("user error", exc_info=True)
        print(f"pd {args._cmd}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
