"""``expertplane watch plans NAME``: print a placement's plan versions as the controller stores
them (the latest one first), until interrupted (Ctrl-C), ``--count`` plans were printed, or the
controller ends the stream (exit status 1)."""

from __future__ import annotations

import json
import sys

from expertplane.cli.output import add_output_argument
from expertplane.cli.remote import add_remote_arguments


def register(sub) -> None:
    parser = sub.add_parser("watch", help="stream a placement's new plan versions",
                            description=__doc__)
    parser.add_argument("kind", choices=("plans",), help="what to watch")
    parser.add_argument("name", metavar="NAME", help="placement name")
    parser.add_argument("--after-version", type=int, metavar="V",
                        help="start after this version (default: print the latest, then new ones)")
    parser.add_argument("--count", type=int, metavar="N", help="stop after N plans")
    add_output_argument(parser)
    add_remote_arguments(parser)
    parser.set_defaults(func=_run)


def _row(s, expert_bytes: int) -> tuple:
    from expertplane.cli.get import timestamp_text
    from expertplane.cli.output import mean, moved_bytes, worst

    return (s.version, s.reason or "-", mean(s.predicted_balance), worst(s.predicted_balance),
            s.slots_moved, moved_bytes(s.bytes_moved, expert_bytes) if s.previous_version else "-",
            timestamp_text(s.created_at))


def _run(args) -> int:
    import grpc

    from expertplane.cli.output import dump, message_dict
    from expertplane.cli.remote import Remote
    from expertplane.proto import expertplane_pb2 as pb

    if args.count is not None and args.count < 1:
        raise ValueError("--count: must be >= 1")
    if args.after_version is not None and args.after_version < 0:
        raise ValueError("--after-version: must be >= 0")
    printed = 0
    with Remote(args) as remote:
        expert_bytes = remote.placement(args.name).spec.model.expert_bytes
        after = args.after_version
        if after is None:
            summaries = remote.plan_summaries(args.name)
            after = summaries[-1].version - 1 if summaries else 0
        stream = remote.plans.WatchPlans(pb.WatchPlansRequest(placement=args.name,
                                                              after_version=after))
        widths = (8, 8, 8, 8, 12, 28, 19)
        if args.output == "table":
            header = ("VERSION", "REASON", "BALANCE", "WORST", "SLOTS MOVED", "BYTES MOVED", "CREATED")
            print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), flush=True)
        try:
            for summary in stream:
                if args.output == "table":
                    print("  ".join(str(c).ljust(w) for c, w in zip(_row(summary, expert_bytes), widths))
                          .rstrip(), flush=True)
                elif args.output == "json":
                    print(json.dumps(message_dict(summary)), flush=True)
                else:
                    sys.stdout.write("---\n")
                    dump(message_dict(summary), "yaml")
                    sys.stdout.flush()
                printed += 1
                if args.count is not None and printed >= args.count:
                    stream.cancel()
                    return 0
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise remote.error("WatchPlans", exc) from None
    print(f"watch: the controller ended the stream after {printed} plan(s)", file=sys.stderr)
    return 1
