"""``expertplane pipeline``: cut a model's layers into pipeline stages for the fastest step.

Reads a layer profile (YAML/JSON: per-layer F, B, W seconds, activation and parameter bytes;
see docs/pipeline.md or the shipped planner/profiles/*.yaml), finds the contiguous partition
with the least simulated step time under the schedule and the memory limit, and prints the
boundaries, step time, bubble fraction and per-rank memory (or JSON with --json). --plot draws
the schedule's timeline. --profile also accepts a shipped profile's name (deepseek-v3-like,
llama-like).
"""

from __future__ import annotations

import argparse
import re

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


PLAIN_BYTES_MIN = 2**20   # a size without a unit below this is a forgotten unit, not bytes


def parse_bytes(text: str) -> float:
    """``80GiB``, ``1.5e10``, ``512 MB`` -> bytes. A plain number is bytes, and must be at least
    1 MiB: ``80`` (80 bytes) is refused as a forgotten unit."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 80GiB, 500MB, 1e10)")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if not m.group(2) and value < PLAIN_BYTES_MIN:
        raise argparse.ArgumentTypeError(f"{text!r} has no unit and would be {value:g} bytes; "
                                         f"give one, e.g. {m.group(1)}GiB")
    return value


def register(sub) -> None:
    parser = sub.add_parser("pipeline", help="partition layers into pipeline stages",
                            description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", required=True, metavar="FILE",
                        help="layer profile (.yaml/.json) or a shipped profile's name")
    parser.add_argument("--stages", type=int, required=True, metavar="S",
                        help="model stages (ranks; DualPipeV runs S/2 ranks with 2 stages each)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b",
                        help="pipeline schedule (default 1f1b)")
    parser.add_argument("--micro-batches", type=int, metavar="M",
                        help="micro-batches per step (default 2 x ranks)")
    parser.add_argument("--memory-limit", type=parse_bytes, metavar="SIZE",
                        help="memory per GPU, e.g. 80GiB")
    parser.add_argument("--p2p", type=float, default=0.0, metavar="SECONDS",
                        help="time to send activations/gradients between ranks (default 0)")
    parser.add_argument("--overlap", type=float, default=0.0, metavar="X",
                        help="DualPipe F&B pairs: share of the shorter half hidden, 0..1 "
                             "(default 0)")
    parser.add_argument("--node-limit", type=int, default=None, metavar="N",
                        help="cap on search nodes (0 = no cap; default: the library's)")
    parser.add_argument("--plot", metavar="PNG", help="draw the timeline of the plan to PNG")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    import json
    import sys
    from pathlib import Path

    from expertplane.planner.pipeline import (DEFAULT_NODE_LIMIT, load_profile, partition,
                                              shipped_profiles, simulate)

    shipped = shipped_profiles()
    path = shipped[args.profile] if args.profile in shipped and not Path(args.profile).exists() \
        else args.profile
    if not Path(path).exists():
        raise FileNotFoundError(f"--profile: {args.profile!r} is neither a file nor a shipped "
                                f"profile ({', '.join(shipped)})")
    profile = load_profile(path)
    limit = DEFAULT_NODE_LIMIT if args.node_limit is None else (args.node_limit or None)
    plan = partition(profile, args.stages, schedule=args.schedule,
                     micro_batches=args.micro_batches, memory_limit=args.memory_limit,
                     p2p=args.p2p, overlap=args.overlap, node_limit=limit)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        from expertplane.cli.pipeline_plot import timeline_figure
        result = simulate(plan.stage_times, plan.schedule, plan.micro_batches, p2p=args.p2p,
                          overlap=args.overlap)
        timeline_figure(result, f"{profile.name}: {plan.schedule}, {args.stages} stages, "
                                f"{plan.micro_batches} micro-batches, step "
                                f"{plan.step_time:.4g} s").savefig(args.plot, dpi=150)
    doc = {
        "profile": profile.name, "schedule": plan.schedule, "stages": len(plan.boundaries) - 1,
        "ranks": plan.num_ranks, "micro_batches": plan.micro_batches,
        "boundaries": list(plan.boundaries), "step_time_s": plan.step_time,
        "bubble_fraction": plan.bubble_fraction, "optimal": plan.optimal,
        "ranks_detail": [
            {"rank": r, "stages": list(plan.rank_stages[r]),
             "layers": [[plan.boundaries[s], plan.boundaries[s + 1]] for s in plan.rank_stages[r]],
             "peak_memory_bytes": float(plan.peak_memory[r]),
             "param_bytes": float(plan.param_memory[r]),
             "activation_bytes": float(plan.activation_memory[r])}
            for r in range(plan.num_ranks)],
    }
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    print(f"profile {profile.name}: {len(profile)} layers, schedule {plan.schedule}, "
          f"{doc['stages']} stages on {plan.num_ranks} ranks, {plan.micro_batches} micro-batches")
    print(f"boundaries   {list(plan.boundaries)}")
    print(f"step time    {plan.step_time:.6g} s   bubble {plan.bubble_fraction:.2%}   "
          f"{'optimal (proven)' if plan.optimal else 'best found within --node-limit'}")
    print(f"{'rank':>4}  {'stages':<10} {'layers':<22} {'memory GiB':>10} {'params':>8} "
          f"{'activ.':>8}")
    for row in doc["ranks_detail"]:
        layers = " ".join(f"[{a},{b})" for a, b in row["layers"])
        print(f"{row['rank']:>4}  {','.join(map(str, row['stages'])):<10} {layers:<22} "
              f"{row['peak_memory_bytes'] / 2**30:>10.2f} {row['param_bytes'] / 2**30:>8.2f} "
              f"{row['activation_bytes'] / 2**30:>8.2f}")
    if args.plot:
        print(f"timeline     {args.plot}")
    return 0
