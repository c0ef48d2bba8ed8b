"""``expertplane rebalance NAME``: ask the controller to re-plan a placement now.

Prints the decision: the balance of the plan in force on the current load window and of a
fresh movement-aware plan (max/mean GPU load, mean over layers; 1.0 = perfect), the relative
gain, the slots and bytes the fresh plan moves, and the reason. Without ``--force`` the policy's
threshold, cooldown and move budget decide; with ``--dry-run`` nothing is stored or rolled out.
"""

from __future__ import annotations

import argparse

from expertplane.cli.output import add_output_argument
from expertplane.cli.remote import add_remote_arguments


def register(sub) -> None:
    parser = sub.add_parser("rebalance", help="re-plan a placement now and print the decision",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", metavar="NAME", help="placement name")
    parser.add_argument("--dry-run", action="store_true",
                        help="decide and print, store and roll out nothing")
    parser.add_argument("--force", action="store_true",
                        help="ignore the policy's threshold and cooldown")
    add_output_argument(parser)
    add_remote_arguments(parser)
    parser.set_defaults(func=_run)


def show_decision(decision, expert_bytes: int) -> None:
    from expertplane.cli.output import moved_bytes

    d = decision
    verdict = "rebalance" if d.rebalance else "keep the plan in force"
    print(f"placement {d.placement}: {verdict}")
    print(f"  balance now        {d.in_force_balance_mean:.4f}  (plan in force on the load window)")
    print(f"  balance predicted  {d.predicted_balance:.4f}  (fresh plan; gain {d.gain:.1%})")
    print(f"  moves              {d.slots_moved} slots, {moved_bytes(d.bytes_moved, expert_bytes)}")
    print(f"  reason             {d.reason}")
    if d.new_version:
        print(f"  new plan           version {d.new_version}")


def _run(args) -> int:
    from expertplane.cli.output import dump, message_dict
    from expertplane.cli.remote import Remote
    from expertplane.proto import expertplane_pb2 as pb

    with Remote(args) as remote:
        expert_bytes = remote.placement(args.name).spec.model.expert_bytes
        req = pb.TriggerRebalanceRequest(placement=args.name, dry_run=args.dry_run, force=args.force)
        decision = remote.call(remote.planning, "TriggerRebalance", req)
    if args.output == "table":
        show_decision(decision, expert_bytes)
    else:
        dump(message_dict(decision), args.output)
    return 0
