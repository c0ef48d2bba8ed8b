"""Typed configuration of a controller process."""

from __future__ import annotations

from dataclasses import dataclass, field

from expertplane.rpc.security import SecurityConfig


@dataclass(frozen=True)
class ControllerConfig:
    """Everything a ``ControllerServer`` needs.

    listen: gRPC address (``HOST:PORT``; port 0 picks a free one). db_url: SQLAlchemy URL of the
    plan store. placements_dir: YAML placements applied at start. metrics: ``HOST:PORT`` for
    Prometheus (None = off). ingest_queue: load reports held at once (received, ack not yet sent;
    see ``core.IngestGate``); more are answered OVERLOADED. rollout_timeout_seconds: prepare (and
    commit) deadline of a rollout.
    policy_interval_seconds: how often AUTO placements are evaluated. snapshot_interval_seconds:
    how often load windows are written to the store. load_dir: directory of the load files that
    placements name in ``initial_load_file`` (None: such placements are refused).
    """

    listen: str = "[::]:50051"
    db_url: str = "sqlite:///expertplane-controller.db"
    placements_dir: str | None = None
    load_dir: str | None = None
    metrics: str | None = None
    security: SecurityConfig = field(default_factory=SecurityConfig)
    max_workers: int = 64
    max_concurrent_rpcs: int = 1024
    ingest_queue: int = 512
    rollout_timeout_seconds: float = 30.0
    policy_interval_seconds: float = 10.0
    snapshot_interval_seconds: float = 60.0
    watch_queue: int = 1024
    tick_seconds: float = 0.1
