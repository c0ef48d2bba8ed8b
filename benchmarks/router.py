"""Benchmark 'router': EPLB alone vs the controller's aux-loss-free router bias alone vs both,
with and without a per-slot capacity factor, on the synthetic MoE model.

The synthetic model (``worker.synthetic``: drifting Zipf expert popularity) runs in-process
(one process holds all ``R`` physical slots of each layer); slot ``s`` belongs to virtual GPU
``s // (R / gpus)``, as in a plan for ``gpus`` GPUs. Each variant runs the same token stream:

- ``static``: the plan for uniform load, never changed (the baseline of the ratios);
- ``eplb``: every ``--rebalance-every`` steps the planner (``planner.eplb.rebalance_experts``)
  re-plans on the logical load observed since the previous plan (the model is rebuilt on the
  new placement: expert weights are seeded per logical expert, so it is the same model);
- ``bias``: every ``--bias-every`` steps the controller's update
  (``controller.bias.global_bias_step``) runs on the demand per logical expert of those steps
  (processed + dropped tokens, mapped through the plan) per replica of the plan in force
  (``replicas=logcnt``, as the controller does) and the bias is set on every layer;
- ``eplb+bias``: both.

Per variant and capacity factor it reports, over the steps after ``--warmup``: max/mean GPU
load (tokens processed per virtual GPU, mean over layers and steps), the same for the demand
(processed + dropped), and the fraction of (token, expert) rows dropped by the capacity.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

VARIANTS = ("static", "eplb", "bias", "eplb+bias")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=4, help="MoE layers")
    parser.add_argument("--experts", type=int, default=16, help="logical experts per layer E")
    parser.add_argument("--replicas", type=int, default=24, help="physical slots per layer R")
    parser.add_argument("--gpus", type=int, default=8, help="virtual GPUs (R %% gpus == 0)")
    parser.add_argument("--top-k", type=int, default=4, help="experts per token")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size H")
    parser.add_argument("--intermediate", type=int, default=64, help="expert FFN intermediate size I")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step")
    parser.add_argument("--steps", type=int, default=200, help="steps per variant")
    parser.add_argument("--warmup", type=int, default=40, help="steps not measured")
    parser.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of popularity")
    parser.add_argument("--drift-period", type=int, default=40,
                        help="steps between popularity drifts (0 = none)")
    parser.add_argument("--rebalance-every", type=int, default=40, help="EPLB re-plan period")
    parser.add_argument("--bias-every", type=int, default=1, help="bias update period (steps)")
    parser.add_argument("--bias-speed", type=float, default=0.002, help="router bias step per update")
    parser.add_argument("--bias-rule", choices=("sign", "proportional"), default="sign",
                        help="bias update rule")
    parser.add_argument("--capacity", type=float, nargs="+", default=[0.0, 1.25],
                        help="capacity factors to run (0 = no capacity)")
    parser.add_argument("--capacity-mode", choices=("drop", "next_best"), default="drop",
                        help="rows over capacity: dropped, or sent to the next best expert")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="balancing variants to compare")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and token stream")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 avoids oversubscription on shared CPUs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


@dataclass(frozen=True)
class RunResult:
    """One variant at one capacity factor: mean over layers and measured steps of max/mean
    GPU load (processed tokens), of max/mean GPU demand (processed + dropped), dropped row
    fraction, seconds per step, plans made (eplb) and final max |bias|."""

    variant: str
    capacity: float
    gpu_balance: float
    demand_balance: float
    dropped_fraction: float
    step_seconds: float
    plans: int
    bias_abs_max: float


def _check(args) -> None:
    for name in ("layers", "experts", "replicas", "gpus", "top_k", "tokens", "steps",
                 "rebalance_every", "bias_every", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1")
    if args.replicas < args.experts or args.replicas % args.gpus:
        raise ValueError("--replicas: must be >= --experts and a multiple of --gpus")
    if not 0 <= args.warmup < args.steps:
        raise ValueError("--warmup: must be in [0, --steps)")
    if any(c < 0 for c in args.capacity):
        raise ValueError("--capacity: factors must be >= 0")


def run_variant(args, variant: str, capacity: float) -> RunResult:
    """Run ``args.steps`` steps of one variant (see module doc)."""
    import numpy as np
    import torch

    from expertplane.controller.bias import global_bias_step
    from expertplane.kernels.balancing import BiasUpdate, CapacityConfig, logical_load
    from expertplane.kernels.moe import LayerPlacement
    from expertplane.worker.synthetic import ModelConfig, StreamConfig, SyntheticMoEModel, TokenStream
    from expertplane.planner.eplb import rebalance_experts

    L, E, R, G = args.layers, args.experts, args.replicas, args.gpus
    model_cfg = ModelConfig(num_layers=L, num_experts=E, hidden=args.hidden,
                            intermediate=args.intermediate, top_k=args.top_k, seed=args.seed)
    stream_cfg = StreamConfig(tokens_per_step=args.tokens, zipf_exponent=args.zipf,
                              drift_period=args.drift_period, seed=args.seed)
    stream = TokenStream(model_cfg, stream_cfg, rank=0)
    cap = CapacityConfig(capacity, args.capacity_mode) if capacity > 0 else None
    eplb, use_bias = variant in ("eplb", "eplb+bias"), variant in ("bias", "eplb+bias")
    update = BiasUpdate(args.bias_speed, args.bias_rule)

    def plan(load: np.ndarray) -> np.ndarray:
        return rebalance_experts(load, R, 1, 1, G)[0].numpy()

    def build(phy2log: np.ndarray, bias: np.ndarray) -> SyntheticMoEModel:
        model = SyntheticMoEModel(model_cfg, stream_cfg,
                                  [LayerPlacement.from_phy2log(phy2log[l], E) for l in range(L)])
        for l, layer in enumerate(model.layers):
            layer.capacity = cap
            layer.set_selection_bias(torch.as_tensor(bias[l], dtype=torch.float32))
        return model

    phy2log = plan(np.ones((L, E)))
    logcnt = np.stack([np.bincount(phy2log[l], minlength=E) for l in range(L)])
    bias = np.zeros((L, E))
    model = build(phy2log, bias)
    since_plan, since_bias = np.zeros((L, E)), np.zeros((L, E))
    balances, demands, dropped_rows, rows, plans, seconds = [], [], 0, 0, 1, 0.0
    p2l = torch.as_tensor(phy2log)
    for step in range(args.steps):
        batch = stream.batch(step)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(batch)
        seconds += time.perf_counter() - t0
        counts = model.read_counters()                                    # [L, R]
        dropped = torch.stack([layer.read_dropped() for layer in model.layers])
        demand = counts + dropped
        load = np.stack([logical_load(demand[l], p2l[l], E).numpy() for l in range(L)])
        since_plan += load
        since_bias += load
        if step >= args.warmup:
            gpu = counts.view(L, G, R // G).sum(-1).double()
            gpu_demand = demand.view(L, G, R // G).sum(-1).double()
            balances.append(float((gpu.max(1).values / gpu.mean(1).clamp_min(1e-9)).mean()))
            demands.append(float((gpu_demand.max(1).values /
                                  gpu_demand.mean(1).clamp_min(1e-9)).mean()))
            dropped_rows += int(dropped.sum())
            rows += int(demand.sum())
        if use_bias and (step + 1) % args.bias_every == 0:
            bias = global_bias_step(bias, since_bias, update, replicas=logcnt)
            since_bias[:] = 0
            for l, layer in enumerate(model.layers):
                layer.set_selection_bias(torch.as_tensor(bias[l], dtype=torch.float32))
        if eplb and (step + 1) % args.rebalance_every == 0 and step + 1 < args.steps:
            phy2log = plan(since_plan)
            p2l = torch.as_tensor(phy2log)
            logcnt = np.stack([np.bincount(phy2log[l], minlength=E) for l in range(L)])
            since_plan[:] = 0
            model = build(phy2log, bias)
            plans += 1
    return RunResult(variant, capacity, float(np.mean(balances)), float(np.mean(demands)),
                     dropped_rows / max(rows, 1), seconds / args.steps, plans,
                     float(np.abs(bias).max()))


def run(args) -> int:
    _check(args)
    import torch
    from expertplane.cli.output import console as rich_console
    from rich.table import Table

    torch.set_num_threads(args.threads)
    results = [run_variant(args, v, c) for c in args.capacity for v in args.variants]
    base = {r.capacity: r for r in results if r.variant == results[0].variant}
    table = Table(title=f"router balancing: {args.layers} layers, E={args.experts}, "
                        f"R={args.replicas} on {args.gpus} GPUs, top-{args.top_k}, "
                        f"{args.tokens} tokens/step, {args.steps - args.warmup} measured steps")
    for col in ("capacity", "variant", "max/mean GPU load", f"vs {results[0].variant}",
                "max/mean GPU demand", "dropped rows", "plans", "max |bias|", "ms/step"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(f"{r.capacity:g}" if r.capacity else "none", r.variant,
                      f"{r.gpu_balance:.3f}", f"{r.gpu_balance / base[r.capacity].gpu_balance:.3f}",
                      f"{r.demand_balance:.3f}", f"{100 * r.dropped_fraction:.2f}%", str(r.plans),
                      f"{r.bias_abs_max:.3f}", f"{1e3 * r.step_seconds:.1f}")
    rich_console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v)
                                                      for k, v in vars(args).items()
                                                      if k not in ("handler", "func")},
                                         "results": [r.__dict__ for r in results]}, indent=2))
    return 0
