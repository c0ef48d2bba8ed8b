"""``expertplane controller``: run the control plane's gRPC server.

Agents stream load reports to it and receive plan rollouts; the operator and users query and
apply placements through PlanService. Placements can also come from YAML files (``--placements``).
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from expertplane.rpc.security import add_security_arguments

    parser = sub.add_parser(
        "controller", help="run the controller (load aggregation, rebalance policy, plan store, rollouts)",
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--listen", default="[::]:50051", metavar="HOST:PORT",
                        help="gRPC listen address")
    parser.add_argument("--db", default="sqlite:///expertplane-controller.db", metavar="URL",
                        help="plan store: SQLAlchemy URL (sqlite:///FILE or "
                             "postgresql+psycopg://USER@HOST:PORT/DB)")
    parser.add_argument("--placements", metavar="DIR",
                        help="apply every placement in DIR/*.yaml at start: the controller's YAML or "
                             "ExpertPlacement resources (examples/placements/, docs/controller.md)")
    parser.add_argument("--load-dir", metavar="DIR",
                        help="directory of the load files placements name in initial_load_file "
                             "(the operator's spec.initialLoadFrom.file)")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics on HOST:PORT (off by default)")
    parser.add_argument("--rollout-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="abort a rollout whose workers have not all prepared in this time")
    parser.add_argument("--policy-interval", type=float, default=10.0, metavar="SECONDS",
                        help="how often placements in AUTO mode are evaluated")
    parser.add_argument("--snapshot-interval", type=float, default=60.0, metavar="SECONDS",
                        help="how often load windows are written to the store")
    parser.add_argument("--ingest-queue", type=int, default=512, metavar="N",
                        help="load reports in process at once; beyond, reports are answered OVERLOADED")
    parser.add_argument("--max-workers", type=int, default=64, metavar="N",
                        help="gRPC server threads: unary calls and the store calls of streams "
                             "(an open stream holds none)")
    parser.add_argument("--grace", type=float, default=5.0, metavar="SECONDS",
                        help="on SIGTERM/SIGINT, time given to running calls")
    add_security_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args) -> int:
    import signal
    import threading

    from expertplane.controller.config import ControllerConfig
    from expertplane.controller.server import ControllerServer
    from expertplane.rpc.security import security_from_args

    for name in ("rollout_timeout", "policy_interval", "snapshot_interval"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')}: must be > 0")
    if args.ingest_queue < 1 or args.max_workers < 4:
        raise ValueError("--ingest-queue must be >= 1 and --max-workers >= 4")
    config = ControllerConfig(
        listen=args.listen, db_url=args.db, placements_dir=args.placements, metrics=args.metrics,
        load_dir=args.load_dir,
        security=security_from_args(args), max_workers=args.max_workers,
        ingest_queue=args.ingest_queue, rollout_timeout_seconds=args.rollout_timeout,
        policy_interval_seconds=args.policy_interval,
        snapshot_interval_seconds=args.snapshot_interval)
    server = ControllerServer(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    port = server.start()
    print(f"expertplane controller: serving on port {port} (store {args.db.split('@')[-1]})",
          flush=True)
    stop.wait()
    server.stop(args.grace)
    return 0
