"""Benchmark 'planner': EPLB algorithms on the issue's shapes and skewed load families.

For each shape x load family it measures, in one run:

* time of DeepSeek's eplb.py (``benchmarks.reference_eplb``, the baseline), of our "deepseek"
  (identical output) and of our "balanced" algorithm, with the speed-up against the baseline;
* balance (max / mean GPU load, mean over layers) of "deepseek" and "balanced", the lower bound
  (``planner.bounds``) and the share of the deepseek-to-bound gap that "balanced" closes;
* movement-aware re-planning after a 10% load drift (``--drift``): slots a fresh "balanced"
  plan changes vs slots the movement-aware plan changes, its balance against the fresh one and
  its time.

Times are the best of ``--repeat`` runs after one warm-up run (numba compilation excluded).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shape:
    """One placement problem: 256 experts in ``num_groups`` groups, layers from ``--layers``."""

    name: str
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int


SHAPES = {
    "hier-288/32": Shape("hier-288/32", 288, 8, 4, 32),
    "global-288/144": Shape("global-288/144", 288, 8, 18, 144),
    "global-640/320": Shape("global-640/320", 640, 8, 40, 320),
}
FAMILIES = ("zipf0.8", "zipf1.2", "zipf1.5", "lognormal", "deepseek-like")


def make_loads(family: str, layers: int, experts: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic token counts float64 [layers, experts] of one family (experts shuffled per layer).

    zipfS: expert of rank k gets ~ k^-S; lognormal: exp(N(0, 1.2)); deepseek-like: a flat
    lognormal(0, 0.4) base plus 4-12 hot experts at 8-40x the median (as in DeepSeek-V3 traces).
    """
    if family.startswith("zipf"):
        s = float(family[4:])
        base = np.arange(1, experts + 1, dtype=np.float64) ** -s
    elif family == "lognormal":
        base = rng.lognormal(0.0, 1.2, experts)
    elif family == "deepseek-like":
        base = rng.lognormal(0.0, 0.4, experts)
        hot = rng.choice(experts, int(rng.integers(4, 13)), replace=False)
        base[hot] *= rng.uniform(8.0, 40.0, hot.size)
    else:
        raise ValueError(f"family: unknown load family {family!r} (choose from {FAMILIES})")
    rows = np.stack([rng.permutation(base) for _ in range(layers)])
    return np.round(rows / rows.sum(-1, keepdims=True) * 1e6)


def drift(weight: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Loads after a drift: each expert's load times exp(N(0, amount)), total kept per layer."""
    moved = weight * np.exp(rng.normal(0.0, amount, weight.shape))
    return moved * (weight.sum(-1, keepdims=True) / np.maximum(moved.sum(-1, keepdims=True), 1e-300))


def _best_time(fn, repeat: int) -> tuple[float, object]:
    out = fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


@dataclass
class Row:
    shape: str
    family: str
    t_reference: float | None
    t_deepseek: float
    t_balanced: float
    balance_deepseek: float
    balance_balanced: float
    worst_deepseek: float
    worst_balanced: float
    bound: float
    gap_closed: float
    moved_fresh: int | None
    moved_aware: int | None
    aware_vs_fresh: float | None
    t_aware: float | None


def bench_case(shape: Shape, family: str, layers: int, repeat: int, with_reference: bool,
               with_movement: bool, drift_amount: float, seed: int) -> Row:
    """Measure one shape x family (see module docstring)."""
    import torch

    from expertplane.benchmarks.reference_eplb import reference_rebalance_experts
    from expertplane.planner import balance, migration, rebalance_experts
    from expertplane.planner.bounds import lower_bound
    from expertplane.planner.deepseek import is_hierarchical

    rng = np.random.default_rng(seed)
    w = make_loads(family, layers, 256, rng)
    args = (shape.num_replicas, shape.num_groups, shape.num_nodes, shape.num_gpus)
    t_ref = None
    if with_reference:
        t_ref, _ = _best_time(lambda: reference_rebalance_experts(torch.from_numpy(w), *args), 1)
    t_ds, ds = _best_time(lambda: rebalance_experts(w, *args), repeat)
    t_bal, bal = _best_time(lambda: rebalance_experts(w, *args, algorithm="balanced"), repeat)
    b_ds = balance(w, ds[0].numpy(), ds[2].numpy(), shape.num_gpus)
    b_bal = balance(w, bal[0].numpy(), bal[2].numpy(), shape.num_gpus)
    bound = lower_bound(w, *args, is_hierarchical(shape.num_groups, shape.num_nodes))
    gap = b_ds.mean() - bound.mean()
    closed = (b_ds.mean() - b_bal.mean()) / gap if gap > 1e-9 else 1.0
    moved_fresh = moved_aware = ratio = t_aware = None
    if with_movement:
        w2 = drift(w, drift_amount, rng)
        fresh = rebalance_experts(w2, *args, algorithm="balanced")
        t_aware, aware = _best_time(
            lambda: rebalance_experts(w2, *args, algorithm="balanced", previous=bal[0]), repeat)
        moved_fresh = migration(bal[0], fresh[0]).slots_moved
        moved_aware = migration(bal[0], aware[0]).slots_moved
        ratio = float((balance(w2, aware[0].numpy(), aware[2].numpy(), shape.num_gpus)
                       / balance(w2, fresh[0].numpy(), fresh[2].numpy(), shape.num_gpus)).max())
    return Row(shape.name, family, t_ref, t_ds, t_bal, float(b_ds.mean()), float(b_bal.mean()),
               float(b_ds.max()), float(b_bal.max()), float(bound.mean()), float(closed),
               moved_fresh, moved_aware, ratio, t_aware)


def _table(rows: list[Row]):
    from rich.table import Table

    table = Table(title="expertplane bench planner (balance = max/mean GPU load, mean over "
                        "layers; speed-up vs DeepSeek eplb.py)")
    for col in ("shape", "loads", "eplb.py", "deepseek", "balanced", "bal deepseek",
                "bal balanced", "bound", "gap closed", "moves fresh", "moves aware",
                "aware/fresh bal", "aware time"):
        table.add_column(col, justify="right")
    for r in rows:
        def speed(t):
            text = f"{t * 1e3:.1f} ms"
            return text + (f" ({r.t_reference / t:.0f}x)" if r.t_reference else "")
        table.add_row(
            r.shape, r.family, f"{r.t_reference * 1e3:.0f} ms" if r.t_reference else "-",
            speed(r.t_deepseek), speed(r.t_balanced), f"{r.balance_deepseek:.4f}",
            f"{r.balance_balanced:.4f}", f"{r.bound:.4f}", f"{r.gap_closed:.0%}",
            "-" if r.moved_fresh is None else str(r.moved_fresh),
            "-" if r.moved_aware is None else
            f"{r.moved_aware} ({r.moved_aware / max(r.moved_fresh, 1):.1%})",
            "-" if r.aware_vs_fresh is None else f"{r.aware_vs_fresh:.4f}",
            "-" if r.t_aware is None else f"{r.t_aware * 1e3:.0f} ms")
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                        help="placement shapes (replicas/GPUs) to run")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="synthetic load families to run")
    parser.add_argument("--layers", type=int, default=58, help="MoE layers (default 58)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs per algorithm, best kept (default 3)")
    parser.add_argument("--reference", choices=("first", "all", "none"), default="first",
                        help="time DeepSeek's eplb.py on the first family of each shape (default;"
                             " its time does not depend on the loads), on all, or skip it")
    parser.add_argument("--movement", choices=("first", "all", "none"), default="first",
                        help="movement-aware re-planning on the first family of each shape "
                             "(default), on all, or none")
    parser.add_argument("--drift", type=float, default=0.1,
                        help="load drift for the movement test: sigma of the log-normal "
                             "per-expert factor (default 0.1 = 10%%)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic loads")
    parser.add_argument("--json", type=Path, help="also write the rows here")


def run(args) -> int:
    from expertplane.cli.output import console as rich_console

    if args.layers < 1 or args.repeat < 1:
        raise ValueError("--layers/--repeat: must be >= 1")
    rows = []
    for shape_name in args.shapes:
        for i, family in enumerate(args.families):
            rows.append(bench_case(
                SHAPES[shape_name], family, args.layers, args.repeat,
                args.reference == "all" or (args.reference == "first" and i == 0),
                args.movement == "all" or (args.movement == "first" and i == 0),
                args.drift, args.seed + i))
    rich_console().print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0
