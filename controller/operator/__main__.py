"""``python -m expertplane.controller.operator --controller HOST:PORT [--namespace NS] [--kubeconfig F]``"""

from __future__ import annotations

import argparse
import logging
import sys

from expertplane.controller.operator.config import add_operator_arguments, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m expertplane.controller.operator",
        description="ExpertPlane Kubernetes operator: reconciles ExpertPlacement and PipelinePlan "
                    "objects against the controller's gRPC API.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    add_operator_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        config = config_from_args(args)
        from expertplane.controller.operator.runner import run_operator_blocking

        return run_operator_blocking(config)
    except (ValueError, OSError) as exc:
        print(f"expertplane operator: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
