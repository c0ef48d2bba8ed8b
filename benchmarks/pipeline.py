"""Benchmark 'pipeline': optimal partition vs an even split by layer count and a split balanced
by parameter bytes (DeepSpeed's ``parameters`` method), on the shipped DeepSeek-V3-like and
Llama-like profiles, for every schedule, S = 4, 8, 16 ranks and M = 2S, 4S micro-batches.
Cells are simulated step times as ratios to the best partition's (>1: the baseline is
slower), with the search nodes it took. DualPipeV runs 2S stages on S ranks. Also times
``partition`` for every schedule on 61 layers / 16 stages and on 1,000 layers / 64 stages (best
of N after a first call that compiles the layout's step DAG, and that first call), against one
``simulate`` call of the same step (with its timeline) as baseline, and reports the load
average. ``--baseline-rev REV`` also times ``partition`` as it was at git revision ``REV``
(``planner/pipeline/partition.py`` of that revision, run on the current simulator) on the same
cases and 8-stage ones, in the same process. Last, times the small LP that weighs the
critical-path rows of the DualPipe search (``paths._game``, a numba simplex) against scipy's
``linprog`` (HiGHS) on the same games, the shapes the search solves (at most 6 completions
against up to 1,024 rows), checking both give the same value.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16], metavar="S",
                        help="pipeline ranks to compare (default 4 8 16)")
    parser.add_argument("--schedules", nargs="+", metavar="NAME",
                        default=["1f1b", "zb1p", "dualpipe", "dualpipev"], help="schedules to run")
    parser.add_argument("--node-limit", type=int, default=500, metavar="N",
                        help="search node cap per partition (default 500)")
    parser.add_argument("--repeat", type=int, default=5, metavar="N",
                        help="timing repetitions (best reported, default 5)")
    parser.add_argument("--baseline-rev", metavar="REV",
                        help="also time partition() of this git revision on the same cases")


def _ratios(profile, schedule: str, ranks: int, m: int, node_limit: int) -> dict:
    from expertplane.planner.pipeline import (balanced_boundaries, evaluate, even_boundaries,
                                              partition)
    stages = 2 * ranks if schedule == "dualpipev" else ranks
    t0 = time.perf_counter()
    best = partition(profile, stages, schedule=schedule, micro_batches=m, node_limit=node_limit)
    elapsed = time.perf_counter() - t0
    row = {"optimal": best.step_time, "proven": best.optimal, "seconds": elapsed,
           "bubble": best.bubble_fraction, "nodes": best.explored}
    for name, cuts in (("even", even_boundaries(len(profile), stages)),
                       ("params", balanced_boundaries(profile.param_bytes, stages))):
        row[name] = evaluate(profile, cuts, schedule=schedule, micro_batches=m).step_time
    return row


def _baseline_partition(rev: str):
    """``partition`` from ``planner/pipeline/partition.py`` at git revision ``rev``, imported
    next to the current modules it uses."""
    import importlib.util
    import subprocess
    import tempfile
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "-C", str(root), "show", f"{rev}:planner/pipeline/partition.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "partition_baseline.py"
    path.write_text(source)
    name = "expertplane.planner.pipeline._partition_baseline"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.partition


def _best_of(partition, profile, stages: int, schedule: str, m: int, repeat: int):
    """``(seconds of a first call, best seconds of repeat later calls, the plan)``."""
    t0 = time.perf_counter()
    plan = partition(profile, stages, schedule=schedule, micro_batches=m)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        plan = partition(profile, stages, schedule=schedule, micro_batches=m)
        times.append(time.perf_counter() - t0)
    return first, min(times), plan


def _compare(args, profiles: dict) -> None:
    """Table: ``partition`` of ``--baseline-rev`` against the current one, same cases."""
    from expertplane.planner.pipeline import partition
    baseline = _baseline_partition(args.baseline_rev)
    print(f"\n## partition() now vs at {args.baseline_rev}, best of {args.repeat}, same process\n")
    print("| case | schedule | then ms | now ms | now / then | then step s | now step s | "
          "then proven | now proven (nodes) |")
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [(name, profiles[name], s) for name in profiles for s in (8, 16)] + \
        [("uniform-1000", _big_profile(1000), 64)]
    for label, profile, stages in cases:
        for schedule in args.schedules:
            ranks = stages // 2 if schedule == "dualpipev" else stages
            _, then, old = _best_of(baseline, profile, stages, schedule, 2 * ranks, args.repeat)
            _, now, new = _best_of(partition, profile, stages, schedule, 2 * ranks, args.repeat)
            print(f"| {label}, {stages} stages, M={2 * ranks} | {schedule} | {then * 1e3:.1f} | "
                  f"{now * 1e3:.1f} | {now / then:.2f} | {old.step_time:.6f} | "
                  f"{new.step_time:.6f} | {'yes' if old.optimal else 'no'} | "
                  f"{'yes' if new.optimal else 'no'} ({new.explored}) |", flush=True)


def _timing(profile, stages: int, schedule: str, m: int, repeat: int) -> dict:
    """Seconds of the first ``partition`` call (compiles the layout's tables), the best of
    ``repeat`` later calls, and the best of ``repeat`` ``simulate`` calls of the plan."""
    from expertplane.planner.pipeline import partition, simulate
    first, best, plan = _best_of(partition, profile, stages, schedule, m, repeat)
    sim = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        simulate(plan.stage_times, schedule, m)
        sim.append(time.perf_counter() - t0)
    return {"first": first, "best": best, "simulate": min(sim), "proven": plan.optimal,
            "nodes": plan.explored}


def _big_profile(num_layers: int):
    from expertplane.planner.pipeline import profile_from_layers
    return profile_from_layers([
        {"kind": "embedding", "F": 1e-4, "B": 2e-4, "W": 1e-4, "param_bytes": 1.1e9},
        {"kind": "dense", "F": 2.1e-3, "B": 4.3e-3, "W": 2.1e-3, "activation_bytes": 6e8,
         "param_bytes": 1.7e9, "repeat": num_layers - 2},
        {"kind": "head", "F": 1.05e-2, "B": 2.1e-2, "W": 1.05e-2, "param_bytes": 1.1e9}],
        name=f"uniform-{num_layers}")


def _lp_timing(repeat: int) -> None:
    """Print the numba simplex (``paths._game``) vs scipy's ``linprog`` (HiGHS) on random
    games [X completions, P rows] of the shapes the search solves; best of ``repeat`` each."""
    import numpy as np
    from scipy.optimize import linprog

    from expertplane.planner.pipeline.paths import _game

    def highs(values):
        X, P = values.shape
        res = linprog(np.r_[np.zeros(P), -1.0], A_ub=np.c_[-values, np.ones(X)],
                      b_ub=np.zeros(X), A_eq=np.r_[np.ones(P), 0.0][None], b_eq=[1.0],
                      bounds=[(0, None)] * P + [(None, None)], method="highs")
        return -res.fun

    def best_ms(fn, values):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn(values)
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3, out

    rng = np.random.default_rng(0)
    _game(rng.normal(size=(2, 3)))                                   # compile outside timing
    print(f"\n## Path-combination LP: numba simplex vs scipy linprog (HiGHS), best of {repeat}\n")
    print("| completions X | rows P | simplex ms | HiGHS ms | HiGHS / simplex | same value |")
    print("|---|---|---|---|---|---|")
    for X in (2, 6):
        for P in (64, 256, 1024):
            values = 1.0 + 0.01 * rng.normal(size=(X, P))           # step-time-like payoffs
            ms, (_, value) = best_ms(_game, values)
            ms_h, value_h = best_ms(highs, values)
            same = abs(value - value_h) <= 1e-7 * abs(value_h)
            print(f"| {X} | {P} | {ms:.3f} | {ms_h:.3f} | {ms_h / ms:.1f} | "
                  f"{'yes' if same else 'NO'} |", flush=True)


def run(args) -> int:
    from expertplane.planner.pipeline import load_profile, shipped_profiles

    profiles = {name: load_profile(path) for name, path in shipped_profiles().items()}
    print("## Step time of the baselines / step time of the best partition\n")
    print("| profile | schedule | S | M | even / opt | params / opt | opt bubble | proven "
          "optimal | nodes | partition s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, profile in profiles.items():
        for schedule in args.schedules:
            for ranks in args.ranks:
                for m in (2 * ranks, 4 * ranks):
                    row = _ratios(profile, schedule, ranks, m, args.node_limit)
                    print(f"| {name} | {schedule} | {ranks} | {m} | "
                          f"{row['even'] / row['optimal']:.3f} | "
                          f"{row['params'] / row['optimal']:.3f} | {row['bubble']:.1%} | "
                          f"{'yes' if row['proven'] else 'no (node cap)'} | "
                          f"{row['nodes']} | {row['seconds']:.2f} |", flush=True)
    print(f"\n## partition() time, best of {args.repeat}, vs one simulate() of the same step\n")
    print(f"Load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| case | schedule | target ms | best ms | first call ms (*) | simulate ms | "
          "best / simulate | proven optimal | nodes |")
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [("deepseek-v3-like, 61 layers, 16 stages", profiles["deepseek-v3-like"], 16, 10),
             ("uniform, 1000 layers, 64 stages", _big_profile(1000), 64, 1000)]
    for label, profile, stages, target in cases:
        for schedule in args.schedules:
            ranks = stages // 2 if schedule == "dualpipev" else stages
            row = _timing(profile, stages, schedule, 2 * ranks, args.repeat)
            print(f"| {label}, M={2 * ranks} | {schedule} | {target} | {row['best'] * 1e3:.1f} | "
                  f"{row['first'] * 1e3:.1f} | {row['simulate'] * 1e3:.1f} | "
                  f"{row['best'] / row['simulate']:.2f} | "
                  f"{'yes' if row['proven'] else 'no (node cap)'} | {row['nodes']} |", flush=True)
    print("\n(*) the first call for the layout in this process: it includes building the "
          "layout's step DAG unless the table above already did (with the default --ranks it "
          "did for every 61-layer row).")
    if args.baseline_rev:
        _compare(args, profiles)
    _lp_timing(args.repeat)
    print(f"\nLoad average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0
