"""``expertplane operator``: run the Kubernetes operator (ExpertPlacement and PipelinePlan
custom resources reconciled against the controller's gRPC API; see docs/operator.md)."""

from __future__ import annotations


def register(sub) -> None:
    from expertplane.controller.operator.config import add_operator_arguments

    parser = sub.add_parser(
        "operator", help="run the Kubernetes operator (ExpertPlacement, PipelinePlan)",
        description=__doc__)
    add_operator_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from expertplane.controller.operator.config import config_from_args
    from expertplane.controller.operator.runner import run_operator_blocking

    return run_operator_blocking(config_from_args(args))
