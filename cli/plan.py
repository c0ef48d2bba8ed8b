"""``expertplane plan``: compute an expert placement from a load file and write it out.

Reads loads [layers, experts] (.npy/.pt/.json/.csv, or SGLang's expert-distribution dump),
runs ``expertplane.planner.rebalance_experts`` and writes phy2log/log2phy/logcnt with the
predicted per-layer balance and the migration from ``--previous`` (JSON or YAML), or an SGLang
``--init-expert-location`` file (``--format sglang``).
"""

from __future__ import annotations

import argparse
import sys

ALGORITHMS = ("deepseek", "balanced", "topology")


def register(sub) -> None:
    parser = sub.add_parser(
        "plan", help="compute an expert placement (EPLB) from expert loads",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", required=True, metavar="PATH",
                        help="expert loads [layers, experts]: .npy, .pt, .json, .csv; an SGLang "
                             "expert-distribution dump (.pt, stat or per_pass) or a directory of "
                             "them; a TensorRT-LLM statistics directory (meta_info.json)")
    parser.add_argument("--replicas", type=int, metavar="R",
                        help="physical expert slots per layer (multiple of --gpus; required "
                             "unless --sizing)")
    parser.add_argument("--groups", type=int, required=True, metavar="G", help="expert groups")
    parser.add_argument("--nodes", type=int, required=True, metavar="N", help="server nodes")
    parser.add_argument("--gpus", type=int, required=True, metavar="P",
                        help="GPUs in total (multiple of --nodes)")
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="deepseek",
                        help="placement algorithm (default deepseek: identical to DeepSeek EPLB)")
    parser.add_argument("--remote-cost", type=float, metavar="C",
                        help="topology algorithm: cost per remote node per token")
    parser.add_argument("--previous", metavar="PLAN",
                        help="plan in force (our JSON/YAML, SGLang JSON, or a .npy/.pt phy2log): "
                             "re-plan moving few slots and report the migration")
    parser.add_argument("--expert-bytes", type=int, default=0, metavar="B",
                        help="bytes of one expert's weights, for the migration size "
                             "(without it the size is reported unknown)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="output file (.json or .yaml; default: JSON on stdout)")
    parser.add_argument("--format", choices=("json", "yaml", "sglang", "trtllm"),
                        help="output format (default from the -o suffix; sglang writes "
                             "physical_to_logical_map for --init-expert-location, one row per "
                             "hidden layer; trtllm writes the moe_config.load_balancer YAML)")
    parser.add_argument("--hidden-layers", type=int, metavar="H",
                        help="the model's hidden (decoder) layers, e.g. 61 for DeepSeek-V3 "
                             "(known from an SGLang dump)")
    parser.add_argument("--moe-layers", metavar="LIST",
                        help="hidden-layer index of each MoE layer, e.g. 3-60 (default: the rows "
                             "of an SGLang dump that carry load, else the last layers of "
                             "--hidden-layers)")
    parser.add_argument("--sizing", action="store_true",
                        help="instead of a plan, print balance against the number of redundant "
                             "experts and recommend the smallest count reaching --target-balance")
    parser.add_argument("--target-balance", type=float, default=1.05, metavar="B",
                        help="--sizing: worst-layer max/mean GPU load to reach (default 1.05)")
    parser.add_argument("--max-redundant", type=int, metavar="N",
                        help="--sizing: largest redundant count to try (default: experts)")
    parser.set_defaults(func=_run)


def _layers(args, loaded, given):
    """(num_hidden_layers or None, hidden-layer index of each load row or None)."""
    from expertplane.errors import FieldError

    hidden = args.hidden_layers if args.hidden_layers is not None else loaded.num_hidden_layers
    if hidden is not None and hidden < 1:
        raise FieldError("--hidden-layers", f"must be >= 1, got {hidden}")
    if loaded.num_hidden_layers is not None and hidden != loaded.num_hidden_layers:
        raise FieldError("--hidden-layers", f"is {hidden} but the SGLang dump has "
                                            f"{loaded.num_hidden_layers} hidden layers")
    rows = loaded.loads.shape[0]
    moe = loaded.layers if loaded.layers is not None else given
    if moe is None and hidden is not None:
        if rows > hidden:
            raise FieldError("--hidden-layers", f"{hidden} is fewer than the {rows} load rows")
        moe = tuple(range(hidden - rows, hidden))
    if moe is not None and len(moe) != rows:
        raise FieldError("--moe-layers", f"names {len(moe)} layers for {rows} load rows")
    if moe is not None and hidden is not None and max(moe) >= hidden:
        raise FieldError("--moe-layers", f"layer {max(moe)} is beyond --hidden-layers {hidden}")
    return hidden, moe


def _sizing(args, weight) -> int:
    from expertplane.planner.deepseek import is_hierarchical
    from expertplane.planner.sizing import default_candidates, recommend_redundancy

    candidates = default_candidates(weight.shape[1], args.gpus, args.max_redundant)
    best, curve = recommend_redundancy(weight, args.groups, args.nodes, args.gpus,
                                       args.target_balance, candidates, args.algorithm)
    sys.stdout.write(format_sizing_table(curve, best, is_hierarchical(args.groups, args.nodes)))
    if best is None:
        print(f"no redundant count up to {candidates[-1]} reaches balance "
              f"{args.target_balance} with {args.algorithm}")
    else:
        print(f"recommended: {best.num_redundant} redundant experts "
              f"(--replicas {best.num_replicas}), worst-layer balance {best.balance_max:.4f}")
    return 0


def _run(args) -> int:
    from pathlib import Path

    from expertplane.cli.output import moved_bytes
    from expertplane.errors import FieldError
    from expertplane.planner import balance, migration, rebalance_experts
    from expertplane.planner.deepseek import is_hierarchical
    from expertplane.engines.loads import parse_layers, read_loads
    from expertplane.planner.io import (PlanSetup, dump_document, format_for, load_phy2log,
                                        plan_document, sglang_document)

    given = parse_layers(args.moe_layers) if args.moe_layers else None
    loaded = read_loads(args.loads, given)
    weight = loaded.loads
    hidden, moe = _layers(args, loaded, given)
    if args.sizing:
        return _sizing(args, weight)
    if args.replicas is None:
        raise FieldError("--replicas", "is required")
    previous = load_phy2log(args.previous) if args.previous else None
    if previous is not None and moe is not None and hidden is not None \
            and previous.shape[0] == hidden != weight.shape[0]:
        previous = previous[list(moe)]               # an SGLang map: keep the MoE rows
    options = {}
    if args.remote_cost is not None:
        if args.algorithm != "topology":
            raise FieldError("--remote-cost", "applies only to --algorithm topology")
        options["remote_cost"] = args.remote_cost
    phy2log, log2phy, logcnt = rebalance_experts(
        weight, args.replicas, args.groups, args.nodes, args.gpus, algorithm=args.algorithm,
        previous=previous, **options)
    bal = balance(weight, phy2log.numpy(), logcnt.numpy(), args.gpus)
    moved = migration(previous, phy2log.numpy(), args.expert_bytes, num_gpus=args.gpus,
                      num_nodes=args.nodes) if previous is not None else None
    fmt = format_for(args.output, args.format)
    if fmt == "sglang":
        doc = sglang_document(phy2log.numpy(), moe, hidden, weight.shape[1])
    elif fmt == "trtllm":
        from expertplane.engines.trtllm import load_balancer_config

        if moe is None:
            raise FieldError("--moe-layers", "--format trtllm keys layers by decoder index: give "
                                             "--moe-layers or --hidden-layers")
        doc = load_balancer_config(phy2log.numpy(), moe)
    else:
        policy = "hierarchical" if is_hierarchical(args.groups, args.nodes) else "global"
        setup = PlanSetup(args.replicas, args.groups, args.nodes, args.gpus, args.algorithm, policy)
        doc = plan_document(setup, phy2log.numpy(), log2phy.numpy(), logcnt.numpy(), bal, moved,
                            moe_layers=None if moe is None else list(moe),
                            num_hidden_layers=hidden)
    text = dump_document(doc, "yaml" if fmt in ("yaml", "trtllm") else "json")
    if args.output:
        Path(args.output).write_text(text)
        summary = (f"plan: {args.algorithm}, {phy2log.shape[0]} layers x {phy2log.shape[1]} "
                   f"slots -> {args.output}; balance (max/mean GPU load) mean {bal.mean():.4f} "
                   f"worst {bal.max():.4f}")
        if moved is not None:
            summary += (f"; moved {moved.slots_moved} slots "
                        f"({moved_bytes(moved.bytes_moved, args.expert_bytes)})")
        print(summary, file=sys.stderr)
    else:
        sys.stdout.write(text)
    print(what_bounds(weight, args), file=sys.stderr)
    return 0


def what_bounds(weight, args) -> str:
    """One line on what limits the balance: the policy's constraint and its lower bound (no
    plan under that policy balances better; ``planner.bounds``)."""
    from expertplane.planner.bounds import lower_bound
    from expertplane.planner.deepseek import is_hierarchical

    hierarchical = is_hierarchical(args.groups, args.nodes)
    bound = lower_bound(weight, args.replicas, args.groups, args.nodes, args.gpus, hierarchical)
    figures = f"mean {bound.mean():.4f} worst {bound.max():.4f}"
    if not hierarchical:
        return (f"bound: global policy ({args.groups} groups do not split evenly over "
                f"{args.nodes} nodes, so replicas go to any GPU): no plan balances better than "
                f"{figures}")
    text = (f"bound: hierarchical policy ({args.groups} groups on {args.nodes} nodes): each "
            f"group's experts stay on one node, so no plan keeping them there balances better "
            f"than {figures}")
    if args.algorithm == "topology":
        return text + "; topology adds cross-node replicas of hot experts and may go below it"
    return text + ("; --algorithm topology adds cross-node replicas of hot experts to go below "
                   "it, at the cost of tokens sent to other nodes")


def _flat_tail(points):
    """The first point from which the lower bound no longer falls (None when it falls to the
    last point, or there are fewer than two points)."""
    i = len(points) - 1
    while i > 0 and abs(points[i - 1].bound_max - points[-1].bound_max) <= 1e-9:
        i -= 1
    return points[i] if i < len(points) - 1 else None


def format_sizing_table(points, recommended=None, hierarchical: bool = False) -> str:
    """The sizing curve as a text table (rich), marking the recommended point, with a note when
    the lower bound does not fall with more replicas (``hierarchical``: the policy keeps each
    expert group on one node, so the heaviest node's groups set the bound)."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title="redundancy sizing: balance = max / mean GPU load")
    for name in ("redundant", "replicas", "balance mean", "balance worst layer",
                 "lower bound worst layer", "recommended"):
        table.add_column(name, justify="right")
    for p in points:
        mark = "<-" if recommended is not None and p == recommended else ""
        table.add_row(str(p.num_redundant), str(p.num_replicas), f"{p.balance_mean:.4f}",
                      f"{p.balance_max:.4f}", f"{p.bound_max:.4f}", mark)
    flat = _flat_tail(points)
    if flat is not None:
        why = ("the hierarchical policy keeps each expert group on one node, so the node with the "
               "heaviest groups sets it" if hierarchical else
               "the placement's other constraints, not the replica count, set it")
        table.caption = (f"From {flat.num_redundant} redundant experts on, the lower bound stays "
                         f"at {flat.bound_max:.4f}: {why}. More replicas cannot go below it.")
    out = StringIO()
    Console(file=out, width=120, force_terminal=False, color_system=None).print(table)
    return out.getvalue()
