"""Typed configuration of the operator and its command-line options."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field

from expertplane.rpc.security import SecurityConfig, add_security_arguments, security_from_args

LEASE_NAME = "expertplane-operator"


@dataclass(frozen=True)
class OperatorConfig:
    """Everything ``run_operator`` needs.

    controller: gRPC address of the controller (``HOST:PORT``). security: TLS/token for it.
    kubeconfig: path, or None for in-cluster config (falling back to ``~/.kube/config``).
    namespaces: watch only these namespaces (empty = cluster-wide). refresh_seconds: how often
    each object's status is refreshed from the controller (auto rebalancing changes plan
    versions). rpc_timeout_seconds: deadline of every controller call. lease_*: leader election
    (a coordination.k8s.io Lease ``lease_name`` in ``lease_namespace``; durations in seconds).
    liveness: kopf's health endpoint URL (e.g. ``http://0.0.0.0:8080/healthz``) or None.
    cleanup_timeout_seconds: how long a deleted ExpertPlacement waits for an unreachable
    controller before it is released anyway (with a Warning event). proposal_interval_seconds:
    with approval Manual, how often a placement without a proposal asks for one.
    """

    controller: str
    security: SecurityConfig = field(default_factory=SecurityConfig)
    kubeconfig: str | None = None
    namespaces: tuple[str, ...] = ()
    refresh_seconds: float = 10.0
    rpc_timeout_seconds: float = 30.0
    lease_namespace: str = "expertplane-system"
    lease_name: str = LEASE_NAME
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    lease_duration_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_period_seconds: float = 2.0
    liveness: str | None = None
    cleanup_timeout_seconds: float = 120.0
    proposal_interval_seconds: float = 60.0

    def __post_init__(self):
        if not self.controller:
            raise ValueError("controller: the controller's gRPC address is required")
        for name in ("refresh_seconds", "rpc_timeout_seconds", "lease_duration_seconds",
                     "renew_deadline_seconds", "retry_period_seconds", "cleanup_timeout_seconds",
                     "proposal_interval_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not self.retry_period_seconds < self.renew_deadline_seconds < self.lease_duration_seconds:
            raise ValueError("renew_deadline_seconds: must lie between retry_period_seconds and "
                             "lease_duration_seconds")


def add_operator_arguments(parser: argparse.ArgumentParser, *, controller_required: bool = True) -> None:
    """Add the operator's options (and the controller TLS/token options, prefixed ``controller-``)."""
    parser.add_argument("--controller", required=controller_required,
                        help="gRPC address of the controller, HOST:PORT")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    parser.add_argument("--namespace", action="append", default=[], dest="namespaces",
                        help="watch this namespace (repeatable; default: all namespaces)")
    parser.add_argument("--refresh-seconds", type=float, default=10.0,
                        help="status refresh interval per object (default 10)")
    parser.add_argument("--rpc-timeout-seconds", type=float, default=30.0,
                        help="deadline of each controller call (default 30)")
    parser.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "expertplane-system"),
                        help="namespace of the leader-election Lease (default $POD_NAMESPACE or expertplane-system)")
    parser.add_argument("--lease-name", default=LEASE_NAME, help=f"leader-election Lease (default {LEASE_NAME})")
    parser.add_argument("--identity", default=None, help="this replica's name in the Lease (default host-pid)")
    parser.add_argument("--lease-duration-seconds", type=float, default=15.0,
                        help="how long a leader's Lease holds without renewal")
    parser.add_argument("--renew-deadline-seconds", type=float, default=10.0,
                        help="a leader that has not renewed within this steps down")
    parser.add_argument("--retry-period-seconds", type=float, default=2.0,
                        help="time between tries to take or renew the Lease")
    parser.add_argument("--liveness", default=None,
                        help="serve a health endpoint at this URL, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--cleanup-timeout-seconds", type=float, default=120.0,
                        help="a deleted ExpertPlacement waits this long for an unreachable "
                             "controller, then is released anyway (default 120)")
    parser.add_argument("--proposal-interval-seconds", type=float, default=60.0,
                        help="approval Manual: how often a placement without a proposal asks "
                             "the controller for one (default 60)")
    add_security_arguments(parser, prefix="controller-")


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    """Build an ``OperatorConfig`` from options added by ``add_operator_arguments``."""
    extra = {"identity": args.identity} if args.identity else {}
    return OperatorConfig(
        controller=args.controller,
        security=security_from_args(args, prefix="controller-"),
        kubeconfig=args.kubeconfig,
        namespaces=tuple(args.namespaces),
        refresh_seconds=args.refresh_seconds,
        rpc_timeout_seconds=args.rpc_timeout_seconds,
        lease_namespace=args.lease_namespace,
        lease_name=args.lease_name,
        lease_duration_seconds=args.lease_duration_seconds,
        renew_deadline_seconds=args.renew_deadline_seconds,
        retry_period_seconds=args.retry_period_seconds,
        liveness=args.liveness,
        cleanup_timeout_seconds=args.cleanup_timeout_seconds,
        proposal_interval_seconds=args.proposal_interval_seconds,
        **extra,
    )
