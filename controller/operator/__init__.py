"""Kubernetes operator for ExpertPlane (kopf): reconciles ExpertPlacement and PipelinePlan objects.

It registers placements with the controller over gRPC (PlanService.ApplyPlacement), publishes the
plan in force in a ConfigMap (``physical_to_logical_map``; in SGLang's ``--init-expert-location``
form with ``spec.engine: sglang``), writes a summary and conditions
into each object's status, keeps them fresh with a timer, cleans up through a finalizer, and
runs under a coordination.k8s.io Lease so that several replicas can be deployed.

Run it with ``python -m expertplane.controller.operator --controller HOST:PORT``; inside another
process (the controller's CLI) with ``OperatorThread(OperatorConfig(...)).start()`` / ``.stop()``.
"""

from expertplane.controller.operator.config import (
    OperatorConfig,
    add_operator_arguments,
    config_from_args,
)
from expertplane.controller.operator.runner import (
    OperatorThread,
    run_operator,
    run_operator_blocking,
)

__all__ = ["OperatorConfig", "OperatorThread", "add_operator_arguments", "config_from_args",
           "run_operator", "run_operator_blocking"]
