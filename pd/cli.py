"""`pd`: the one command of pdkv, with subcommands."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module with add_arguments/run, help)
COMMANDS = {
    "launch": ("launch.launcher", "start a P/D (or colocated) deployment"),
    "demo": ("launch.demo", "set up the test model, launch 1P1D, send requests, show the KV moved"),
    "proxy": ("pd.proxy", "the OpenAI-compatible proxy that splits requests into prefill and decode"),
    "coordinator": ("pd.coordinator", "the ZMQ coordinator"),
    "make-model": ("launch.model", "write a small random HF model with a locally trained tokenizer"),
    "stats": ("pd.stats", "show the coordinator's counters, instances and transfers"),
}
BENCH = {"transport": ("transport.bench", "put/get throughput and latency of a transport vs memcpy")}


def _add(sub, name: str, module: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(_module=module, _cmd=name)
    try:
        importlib.import_module(module).add_arguments(p)
    except ImportError as e:
        p.set_defaults(_import_error=str(e))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pd", description="pdkv: disaggregated prefill/decode for vLLM")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        _add(sub, name, module, help_text)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in BENCH.items():
        _add(bench, name, module, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pd.config import ConfigError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "_import_error", None):
        print(f"pd {args._cmd}: error: not available: {args._import_error}", file=sys.stderr)
        return 2
    try:
        return importlib.import_module(args._module).run(args) or 0
    except (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"pd {args._cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
