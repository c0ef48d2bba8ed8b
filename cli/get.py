"""``expertplane get``: list what a running controller holds, as tables or full objects.

  get placements          every placement: plan in force, balance observed and predicted
  get plans NAME          the stored plan versions of a placement
  get load NAME           its load window, per layer
  get rollouts NAME       its last rollouts

``-o json`` / ``-o yaml`` print every field of the wire messages instead of the table.
Balance is max/mean GPU load (1.0 = every GPU equally busy), the mean over layers.
"""

from __future__ import annotations

import argparse
import functools

from expertplane.cli.output import add_output_argument
from expertplane.cli.remote import add_remote_arguments

KINDS = ("placements", "plans", "load", "rollouts")


def register(sub) -> None:
    parser = sub.add_parser("get", help="list placements, plans, load or rollouts of a running controller",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS, help="what to list")
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help="placement (required for plans, load and rollouts)")
    parser.add_argument("--limit", type=int, default=20, metavar="N",
                        help="rollouts: how many of the most recent (default 20)")
    add_output_argument(parser)
    add_remote_arguments(parser)
    parser.set_defaults(func=_run)


def timestamp_text(ts) -> str:
    """A protobuf Timestamp as ``YYYY-MM-DD HH:MM:SS`` UTC; ``-`` when unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")


def placements_table(states) -> None:
    from expertplane.cli.output import mean, table
    from expertplane.proto import expertplane_pb2 as pb

    rows = []
    for st in states:
        sp = st.spec
        rows.append((sp.name, st.plan_version or "-", sp.algorithm or "deepseek",
                     f"{sp.topology.num_nodes}x{sp.topology.gpus_per_node}", sp.num_replicas,
                     pb.RebalancePolicy.Mode.Name(sp.policy.mode or pb.RebalancePolicy.AUTO).lower(),
                     mean(st.observed_balance), mean(st.predicted_balance),
                     st.rollout_state or "-", timestamp_text(st.last_rebalance)))
    table(("NAME", "VERSION", "ALGORITHM", "GPUS", "SLOTS", "MODE", "BALANCE", "PREDICTED",
           "ROLLOUT", "LAST REBALANCE"), rows)


def plans_table(summaries, expert_bytes: int) -> None:
    from expertplane.cli.output import mean, moved_bytes, table, worst

    rows = [(s.version, s.previous_version or "-", s.reason or "-", s.algorithm,
             mean(s.predicted_balance), worst(s.predicted_balance), s.slots_moved,
             moved_bytes(s.bytes_moved, expert_bytes) if s.previous_version else "-",
             timestamp_text(s.created_at)) for s in summaries]
    table(("VERSION", "PREVIOUS", "REASON", "ALGORITHM", "BALANCE", "WORST", "SLOTS MOVED",
           "BYTES MOVED", "CREATED"), rows)


def load_table(window) -> None:
    """Per layer: tokens, hottest expert / mean expert, GPU balance under the plan in force,
    capacity-dropped tokens."""
    import numpy as np

    from expertplane.cli.output import table
    from expertplane.rpc.tensors import to_numpy

    load = to_numpy(window.load, "load")
    gpu = to_numpy(window.gpu_load, "gpu_load")
    dropped = to_numpy(window.dropped_tokens, "dropped_tokens")
    print(f"placement {window.placement}: {window.reports} reports, {window.steps} steps "
          f"({window.failed_steps} failed), as of {timestamp_text(window.as_of)}")
    if load.size == 0 or not load.sum():
        print("no load in the window yet")
        return
    rows = []
    for layer in range(load.shape[0]):
        row, tokens = load[layer], load[layer].sum()
        experts = f"{row.max() / row.mean():.3f}" if tokens else "-"
        gpus = f"{gpu[layer].max() / gpu[layer].mean():.4f}" if gpu.size and gpu[layer].sum() else "-"
        drop = f"{dropped[layer].sum():.0f}" if dropped.size else "0"
        rows.append((layer, f"{tokens:.0f}", experts, gpus, drop))
    table(("LAYER", "TOKENS", "HOTTEST/MEAN EXPERT", "GPU BALANCE", "DROPPED"), rows)
    if gpu.size and gpu.sum():
        per_layer = [r[3] for r in rows if r[3] != "-"]
        print(f"GPU balance: mean {np.mean([float(b) for b in per_layer]):.4f}, "
              f"worst {max(float(b) for b in per_layer):.4f}")


def rollouts_table(records) -> None:
    from expertplane.cli.output import table

    rows = [(r.rollout_id[:12], r.from_version, r.to_version, r.state,
             f"{r.prepare_seconds:.2f}", f"{r.commit_seconds:.2f}", len(r.prepared),
             timestamp_text(r.started_at), r.reason or "-") for r in records]
    table(("ROLLOUT", "FROM", "TO", "STATE", "PREPARE S", "COMMIT S", "WORKERS", "STARTED",
           "REASON"), rows)


def _run(args) -> int:
    from expertplane.cli.output import dump, message_dict
    from expertplane.cli.remote import Remote
    from expertplane.proto import expertplane_pb2 as pb

    if args.kind != "placements" and not args.name:
        raise ValueError(f"NAME: 'get {args.kind}' needs a placement name")
    if args.limit < 1:
        raise ValueError("--limit: must be >= 1")
    with Remote(args) as remote:
        if args.kind == "placements":
            items = remote.placements()
            if args.name:
                items = [remote.placement(args.name)]
            show = placements_table
        elif args.kind == "plans":
            items = remote.plan_summaries(args.name)
            expert_bytes = remote.placement(args.name).spec.model.expert_bytes
            show = functools.partial(plans_table, expert_bytes=expert_bytes)
        elif args.kind == "load":
            items = remote.call(remote.plans, "GetLoad", pb.GetLoadRequest(placement=args.name))
            show = load_table
        else:
            items = remote.rollouts(args.name, args.limit)
            show = rollouts_table
    if args.output == "table":
        show(items)
    elif isinstance(items, list):
        dump([message_dict(m) for m in items], args.output)
    else:
        dump(message_dict(items), args.output)
    return 0
