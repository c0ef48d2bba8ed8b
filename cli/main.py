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

from expertplane.cli import helpfmt

SUBCOMMANDS = ("plan", "pipeline", "controller", "agent", "worker", "demo", "bench",
               "get", "describe", "apply", "delete", "rebalance", "watch", "operator", "warm")

# commands that may run the planner's numba kernels (and compile them when no cache has them)
COMPILES_PLANNER = ("plan", "pipeline", "controller", "demo", "bench")


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
    helpfmt.apply(parser)
    return parser


def _numba_cache(command: str) -> None:
    """Seed numba's cache from the image's warmed copy; say so when the planner must compile."""
    from expertplane.numba_cache import announce_compiles, seed_cache

    seed_cache()
    if command in COMPILES_PLANNER:
        announce_compiles(lambda text: print(f"expertplane {command}: {text}", file=sys.stderr,
                                             flush=True))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    _numba_cache(args.command)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as exc:
        print(f"expertplane {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2


def _message(exc: Exception) -> str:
    """One line for a user error; an OSError names the file and says why, without ``[Errno]``."""
    import errno
    from pathlib import Path

    if not isinstance(exc, OSError) or not exc.filename or not exc.strerror:
        return str(exc)
    text = f"{exc.filename}: {exc.strerror.lower()}"
    parent = Path(exc.filename).parent
    if exc.errno == errno.ENOENT and not parent.exists():
        text += f" (the folder {parent} does not exist)"
    return text


if __name__ == "__main__":
    raise SystemExit(main())
