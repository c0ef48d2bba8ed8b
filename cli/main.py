"""Entry point of the ``expertplane`` command: one subcommand per module in this package.

Each subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (``args -> exit code``). Heavy imports happen inside ``func`` so ``--help`` stays fast.
Errors meant for users (``ValueError``, ``OSError``, ``KeyError`` from input handling) print one
readable line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = ("plan", "pipeline", "controller", "agent", "worker", "demo", "bench",
               "get", "describe", "apply", "delete", "rebalance", "watch", "operator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expertplane",
        description="Control plane for Mixture-of-Experts clusters: expert placement (EPLB), "
        "pipeline partitioning, live expert hot-swap.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"expertplane.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as exc:
        print(f"expertplane {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
