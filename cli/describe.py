"""``expertplane describe placement NAME``: everything the controller knows of one placement.

The spec, the plan in force, the balance per layer (observed on the load window, of the plan in
force on the load it was computed from, and of a fresh plan on the window), the policy's state
and the last rollouts. Balance is max/mean GPU load: 1.0 = every GPU equally busy.
"""

from __future__ import annotations

import argparse

from expertplane.cli.output import add_output_argument
from expertplane.cli.remote import add_remote_arguments


def register(sub) -> None:
    parser = sub.add_parser("describe", help="show one placement in detail: spec, plan, balance, "
                            "policy, rollouts", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("placement",), help="what to describe")
    parser.add_argument("name", metavar="NAME", help="placement name")
    parser.add_argument("--rollouts", type=int, default=5, metavar="N",
                        help="how many of the last rollouts to show (default 5)")
    add_output_argument(parser)
    add_remote_arguments(parser)
    parser.set_defaults(func=_run)


def _plan_in_force(remote, name: str):
    """The summary of the plan in force, or None when none is (NOT_FOUND)."""
    import grpc

    from expertplane.proto import expertplane_pb2 as pb

    try:
        return remote.plans.GetPlan(pb.GetPlanRequest(placement=name, in_force=True),
                                    timeout=remote.timeout).summary
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise remote.error("GetPlan", exc) from None


def _policy_lines(state) -> list[str]:
    """The policy's settings and where it stands (cooldown, rollout under way)."""
    from expertplane.cli.get import timestamp_text
    from expertplane.cli.output import human_bytes
    from expertplane.proto import expertplane_pb2 as pb

    pol = state.spec.policy
    mode = pb.RebalancePolicy.Mode.Name(pol.mode or pb.RebalancePolicy.AUTO).lower()
    lines = [f"mode {mode}{' (dry run: decides, never rolls out)' if pol.dry_run else ''}, "
             f"window {pol.window_seconds:g} s, half-life {pol.half_life_seconds:g} s",
             f"re-plans when a fresh plan is >= {pol.threshold:.1%} better "
             f"(hysteresis {pol.hysteresis:.1%}), at most every {pol.cooldown_seconds:g} s, "
             f"moving at most {human_bytes(pol.move_budget_bytes) if pol.move_budget_bytes else 'any number of bytes'}"]
    last = timestamp_text(state.last_rebalance)
    lines.append(f"last rebalance {last}; rollout {state.rollout_state or 'none under way'}")
    if last != "-" and pol.cooldown_seconds:
        until = state.last_rebalance.seconds + pol.cooldown_seconds
        lines.append(f"cooldown ends {_utc(until)}")
    return lines


def _utc(seconds: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _show(state, plan, rollouts) -> None:
    from expertplane.cli.get import rollouts_table, timestamp_text
    from expertplane.cli.output import human_bytes, mean, table, worst

    sp = state.spec
    gpus = sp.topology.num_nodes * sp.topology.gpus_per_node
    print(f"Name:        {sp.name}")
    print(f"Model:       {sp.model.num_layers} layers x {sp.model.num_experts} experts in "
          f"{sp.model.num_groups or 1} groups, "
          f"{human_bytes(sp.model.expert_bytes) if sp.model.expert_bytes else 'unknown size'} per expert")
    print(f"Topology:    {sp.topology.num_nodes} nodes x {sp.topology.gpus_per_node} GPUs; "
          f"{sp.num_replicas} slots per layer ({sp.num_replicas // max(gpus, 1)} per GPU, "
          f"{sp.num_replicas - sp.model.num_experts} redundant)")
    print(f"Algorithm:   {sp.algorithm or 'deepseek'}"
          + (f"; router bias {sp.router_bias.rule or 'sign'}" if sp.router_bias.enabled else ""))
    if plan is None:
        print("Plan:        none in force")
    else:
        print(f"Plan:        version {plan.version} in force ({plan.reason or 'initial'}, "
              f"{timestamp_text(plan.created_at)}), balance on its load mean "
              f"{mean(plan.predicted_balance)} worst {worst(plan.predicted_balance)}")
    print("Policy:")
    for line in _policy_lines(state):
        print(f"  {line}")
    print("Balance per layer (max/mean GPU load):")
    observed, predicted = list(state.observed_balance), list(state.predicted_balance)
    in_force = list(plan.predicted_balance) if plan is not None else []
    rows = [(layer, _at(observed, layer), _at(in_force, layer), _at(predicted, layer))
            for layer in range(sp.model.num_layers)]
    rows.append(("mean", mean(observed), mean(in_force), mean(predicted)))
    table(("  LAYER", "OBSERVED", "PLAN ON ITS LOAD", "FRESH PLAN"),
          [(f"  {r[0]}", *r[1:]) for r in rows])
    if not observed:
        print("  (no load reported under the plan in force yet: OBSERVED and FRESH PLAN are empty)")
    print(f"Rollouts ({len(rollouts)} most recent):")
    if rollouts:
        rollouts_table(rollouts)
    else:
        print("  none")


def _at(values: list[float], i: int) -> str:
    return f"{values[i]:.4f}" if i < len(values) else "-"


def _run(args) -> int:
    from expertplane.cli.output import dump, message_dict
    from expertplane.cli.remote import Remote

    if args.rollouts < 0:
        raise ValueError("--rollouts: must be >= 0")
    with Remote(args) as remote:
        state = remote.placement(args.name)
        plan = _plan_in_force(remote, args.name)
        rollouts = remote.rollouts(args.name, args.rollouts) if args.rollouts else []
    if args.output == "table":
        _show(state, plan, rollouts)
    else:
        dump({"placement": message_dict(state),
              "plan_in_force": message_dict(plan) if plan is not None else None,
              "rollouts": [message_dict(r) for r in rollouts]}, args.output)
    return 0
