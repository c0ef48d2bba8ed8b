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
    parser.add_argument("--loads", required=True, metavar="FILE",
                        help="expert loads [layers, experts]: .npy, .pt, .json, .csv, or an SGLang "
                             "expert-distribution dump (logical_count; window dims are summed)")
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
                        help="bytes of one expert's weights, for the migration size")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="output file (.json or .yaml; default: JSON on stdout)")
    parser.add_argument("--format", choices=("json", "yaml", "sglang"),
                        help="output format (default from the -o suffix; sglang writes "
                             "physical_to_logical_map for --init-expert-location)")
    parser.add_argument("--sizing", action="store_true",
                        help="instead of a plan, print balance against the number of redundant "
                             "experts and recommend the smallest count reaching --target-balance")
    parser.add_argument("--target-balance", type=float, default=1.05, metavar="B",
                        help="--sizing: worst-layer max/mean GPU load to reach (default 1.05)")
    parser.add_argument("--max-redundant", type=int, metavar="N",
                        help="--sizing: largest redundant count to try (default: experts)")
    parser.set_defaults(func=_run)


def _sizing(args, weight) -> int:
    from expertplane.planner.sizing import default_candidates, recommend_redundancy

    candidates = default_candidates(weight.shape[1], args.gpus, args.max_redundant)
    best, curve = recommend_redundancy(weight, args.groups, args.nodes, args.gpus,
                                       args.target_balance, candidates, args.algorithm)
    sys.stdout.write(format_sizing_table(curve, best))
    if best is None:
        print(f"no redundant count up to {candidates[-1]} reaches balance "
              f"{args.target_balance} with {args.algorithm}")
    else:
        print(f"recommended: {best.num_redundant} redundant experts "
              f"(--replicas {best.num_replicas}), worst-layer balance {best.balance_max:.4f}")
    return 0


def _run(args) -> int:
    from pathlib import Path

    from expertplane.errors import FieldError
    from expertplane.planner import balance, migration, rebalance_experts
    from expertplane.planner.deepseek import is_hierarchical
    from expertplane.planner.io import (PlanSetup, dump_document, format_for, load_loads,
                                        load_phy2log, plan_document, sglang_document)

    weight = load_loads(args.loads)
    if args.sizing:
        return _sizing(args, weight)
    if args.replicas is None:
        raise FieldError("--replicas", "is required")
    previous = load_phy2log(args.previous) if args.previous else None
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
        doc = sglang_document(phy2log.numpy())
    else:
        policy = "hierarchical" if is_hierarchical(args.groups, args.nodes) else "global"
        setup = PlanSetup(args.replicas, args.groups, args.nodes, args.gpus, args.algorithm, policy)
        doc = plan_document(setup, phy2log.numpy(), log2phy.numpy(), logcnt.numpy(), bal, moved)
    text = dump_document(doc, "yaml" if fmt == "yaml" else "json")
    if args.output:
        Path(args.output).write_text(text)
        summary = (f"plan: {args.algorithm}, {phy2log.shape[0]} layers x {phy2log.shape[1]} "
                   f"slots -> {args.output}; balance (max/mean GPU load) mean {bal.mean():.4f} "
                   f"worst {bal.max():.4f}")
        if moved is not None:
            summary += f"; moved {moved.slots_moved} slots ({moved.bytes_moved} bytes)"
        print(summary, file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def format_sizing_table(points, recommended=None) -> str:
    """The sizing curve (``planner.sizing.SizingPoint`` s) as a text table (rich), marking the
    ``recommended`` point."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title="redundancy sizing: balance = max / mean GPU load")
    for name in ("redundant", "replicas", "balance mean", "balance worst", "bound worst", ""):
        table.add_column(name, justify="right")
    for p in points:
        mark = "<- recommended" if recommended is not None and p == recommended else ""
        table.add_row(str(p.num_redundant), str(p.num_replicas), f"{p.balance_mean:.4f}",
                      f"{p.balance_max:.4f}", f"{p.bound_max:.4f}", mark)
    out = StringIO()
    Console(file=out, width=100, force_terminal=False, color_system=None).print(table)
    return out.getvalue()
