"""``expertplane bench goodput``: cluster goodput under drifting load, ExpertPlane's controller
policy against SGLang's and vLLM's built-in EPLB, static placement and a free-moving oracle.

Per scenario (a cluster and a trace) every policy runs the same trace from the same initial
placement (DeepSeek's EPLB on the first ``--profile-steps`` steps, as a deployment profiled
before serving would start). Output: a table per scenario (tokens/s relative to the oracle,
mean and p99 step time, stall seconds, seconds lost to slower steps while copying, bytes moved,
rebalances), ``--json`` rows and one PNG timeline per scenario in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from expertplane.benchmarks.goodput.cost import CostModel
from expertplane.benchmarks.goodput.movers import Mover, MoverConstants
from expertplane.benchmarks.goodput.oracle import simulate_oracle
from expertplane.benchmarks.goodput.policies import (ExpertPlanePolicy, SGLangEPLB, Static,
                                                     VLLMEPLB, plan)
from expertplane.benchmarks.goodput.sim import (Cluster, LoadHistory, RunResult, deepseek_v3,
                                                simulate)
from expertplane.benchmarks.goodput.traces import (KINDS, Trace, TraceSpec, from_demo,
                                                   from_sglang_dump, generate)
from expertplane.controller.config import ControllerConfig
from expertplane.controller.spec import PolicySpec
from expertplane.errors import FieldError

CLUSTERS = {
    "hier-32": deepseek_v3("hier-32", num_nodes=4, gpus_per_node=8, num_replicas=288),
    "global-144": deepseek_v3("global-144", num_nodes=18, gpus_per_node=8, num_replicas=288),
    "global-320": deepseek_v3("global-320", num_nodes=40, gpus_per_node=8, num_replicas=640),
}
POLICIES = ("static", "sglang", "vllm-sync", "vllm-async", "expertplane", "oracle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clusters", nargs="+", choices=list(CLUSTERS), default=list(CLUSTERS),
                        help="simulated clusters to run")
    parser.add_argument("--traces", nargs="*", choices=KINDS, default=["drift", "shift"],
                        help="generated load traces to run (none: only --sglang-dump)")
    parser.add_argument("--steps", type=int, default=TraceSpec.num_steps, help="steps per trace")
    parser.add_argument("--steps-per-tick", type=int, default=TraceSpec.steps_per_tick,
                        help="steps of constant load")
    parser.add_argument("--profile-steps", type=int, default=1000,
                        help="steps the initial placement is planned on")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES),
                        help="rebalancing policies to compare")
    parser.add_argument("--policy-interval", type=float,
                        default=ControllerConfig().policy_interval_seconds,
                        help="ExpertPlane controller's policy interval (s; default: the "
                             "controller's)")
    parser.add_argument("--oracle-window", type=int, default=1000, help="oracle re-plan period")
    parser.add_argument("--variants", nargs="*", default=[], metavar="WINDOW:THRESHOLD",
                        type=_variant, help="also run ExpertPlane's policy with these "
                                            "window_seconds:threshold (defaults: the product's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the traces")
    parser.add_argument("--sglang-dump", type=Path, default=None,
                        help="also replay an SGLang expert-distribution dump recorded per "
                             "forward pass (logical_count [passes, L, E]; .pt or .npy) on every "
                             "cluster of the same layers and experts")
    parser.add_argument("--demo-run", type=Path, default=None, metavar="DIR",
                        help="also replay the per-step load of an `expertplane demo` run (its "
                             "output directory: config.json, timeline.json) on a cluster of "
                             "the demo's shape")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="scenarios simulated at once, one process each (default: the CPUs "
                             "this process may use); the results do not depend on it")
    parser.add_argument("--out", type=Path, default=Path("goodput-out"),
                        help="directory for the PNG timelines")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")


def _variant(text: str) -> tuple[float, float]:
    try:
        window, threshold = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"variant: expected WINDOW:THRESHOLD, got {text!r}")
    if window <= 0 or threshold < 0:
        raise argparse.ArgumentTypeError(f"variant: window must be > 0 and threshold >= 0, "
                                         f"got {text!r}")
    return window, threshold


def make_policy(name: str, cluster: Cluster, args) -> object:
    if name == "static":
        return Static()
    if name == "sglang":
        return SGLangEPLB(cluster)
    if name in ("vllm-sync", "vllm-async"):
        return VLLMEPLB(cluster, use_async=name == "vllm-async")
    return ExpertPlanePolicy(cluster, PolicySpec(), interval_s=args.policy_interval)


def run_scenario(cluster: Cluster, trace: Trace, names, args) -> list[RunResult]:
    """Every policy in ``names`` on ``trace`` from the same initial placement."""
    cost = CostModel.measured(cluster.num_gpus, cluster.slots_per_gpu, cluster.top_k)
    history = LoadHistory(trace)
    initial = plan(cluster, history.between(0, args.profile_steps), "deepseek")
    constants = MoverConstants.measured()
    policies = [make_policy(name, cluster, args) for name in names if name != "oracle"]
    policies += [ExpertPlanePolicy(cluster, PolicySpec(window_seconds=w, threshold=t),
                                   interval_s=args.policy_interval,
                                   name=f"expertplane w={w:g}s t={t:g}")
                 for w, t in getattr(args, "variants", [])]
    results = [simulate(cluster, trace, history, cost, p, Mover(p.mover, constants), initial)
               for p in policies]
    if "oracle" in names:
        pool = [p for r in results for p in r.plans]
        results.append(simulate_oracle(cluster, trace, history, cost, pool, args.oracle_window))
    return results


def rows(scenario: str, results: list[RunResult]) -> list[dict]:
    by_name = {r.policy: r for r in results}
    ref = by_name.get("oracle", results[0]).tokens_per_s
    return [{"scenario": scenario, "policy": r.policy, "tokens_per_s": r.tokens_per_s,
             "vs_oracle": r.tokens_per_s / ref, "mean_step_ms": 1e3 * float(r.step_s.mean()),
             "p99_step_ms": 1e3 * float(np.percentile(r.step_s, 99)), "stall_s": r.stall_s,
             "slowdown_s": r.extra_s, "bytes_moved": r.bytes_moved,
             "rebalances": len(r.rebalances), "hours": r.seconds / 3600} for r in results]


def table(rows_: list[dict]) -> str:
    head = ("| policy | tokens/s vs oracle | mean step ms | p99 step ms | stall s | "
            "slower steps s | GB moved | rebalances |\n|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['policy']} | {r['vs_oracle']:.4f} | {r['mean_step_ms']:.1f} | "
        f"{r['p99_step_ms']:.1f} | {r['stall_s']:.2f} | {r['slowdown_s']:.2f} | "
        f"{_moved(r)} | {r['rebalances']} |\n" for r in rows_)


def _moved(row: dict) -> str:
    return "free" if row["policy"] == "oracle" else f"{row['bytes_moved'] / 1e9:,.0f}"


def timeline_png(path: Path, title: str, trace: Trace, results: list[RunResult]) -> Path:
    """Step time per policy over the run (mean per tick), rebalances marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = trace.steps_per_tick
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for r in results:
        clock = np.concatenate([[0.0], np.cumsum(r.step_s)])
        ticks = r.step_s[:trace.num_ticks * k].reshape(-1, k).mean(axis=1)
        line, = ax.plot(clock[:-1:k] / 60, 1e3 * ticks, lw=1, label=r.policy)
        if r.rebalances and r.policy != "oracle":
            at = np.asarray(r.rebalances)
            ax.plot(clock[at] / 60, 1e3 * r.step_s[at], "v", ms=4, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("minutes")
    ax.set_ylabel("step time, ms (mean per tick; log)")
    ax.set_title(title + "  (triangles: rebalances)")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def read_dump(path: Path) -> np.ndarray:
    """``logical_count`` [passes, L, E] of an SGLang per-pass dump (.pt dict or tensor, .npy)."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    import torch

    content = torch.load(path, map_location="cpu", weights_only=True)
    counts = content["logical_count"] if isinstance(content, dict) else content
    return np.asarray(counts, dtype=np.float64)


def demo_replay(directory: Path, steps_per_tick: int) -> tuple[Cluster, Trace]:
    """The cluster and per-step load of the ``expertplane demo`` run whose output is
    ``directory``: its ``config.json`` (placement, workload, seed) gives the cluster's shape
    (experts of DeepSeek-V3's size, the cost model's) and the synthetic stream's popularity,
    its ``timeline.json`` the steps it ran (``steps`` over all ranks). Raises ``FieldError``
    naming what is missing or unusable."""
    from expertplane.demo.run import RUN_CONFIG

    config = json.loads((directory / RUN_CONFIG).read_text())
    if config.get("model"):
        raise FieldError("demo-run", f"{directory} routed with the HuggingFace model "
                                     f"{config['model']!r}: its load is its router's, not the "
                                     f"synthetic stream's, and was not recorded per step")
    placement, work = config["placement"], config["workload"]
    model, topo = placement["model"], placement["topology"]
    cluster = Cluster(name="demo", num_layers=model["num_layers"],
                      num_experts=model["num_experts"], num_groups=model.get("num_groups", 1),
                      num_nodes=topo["num_nodes"], gpus_per_node=topo["gpus_per_node"],
                      num_replicas=placement["num_replicas"],
                      expert_bytes=CLUSTERS["hier-32"].expert_bytes, top_k=work["top_k"])
    steps = json.loads((directory / "timeline.json").read_text()).get("steps", 0)
    per_rank = int(steps) // cluster.num_gpus
    if per_rank < steps_per_tick:
        raise FieldError("steps", f"{directory / 'timeline.json'}: {steps} steps over "
                                  f"{cluster.num_gpus} ranks, fewer than one tick of "
                                  f"{steps_per_tick} per rank")
    return cluster, from_demo(config, cluster.num_gpus, per_rank, steps_per_tick,
                              seed=int(config["seed"]))


def traces_for(cluster: Cluster, args, dump: np.ndarray | None) -> list[tuple[str, Trace]]:
    """(name, trace) of each generated kind, and of the dump where its shape fits ``cluster``."""
    out = []
    for kind in args.traces:
        spec = replace(TraceSpec(), kind=kind, num_steps=args.steps,
                       steps_per_tick=args.steps_per_tick, seed=args.seed)
        out.append((kind, generate(cluster.num_layers, cluster.num_experts, cluster.top_k,
                                   cluster.num_gpus, spec)))
    if dump is not None:
        if dump.shape[1:] == (cluster.num_layers, cluster.num_experts):
            out.append(("sglang-dump", from_sglang_dump(dump, cluster.num_gpus, cluster.top_k,
                                                        args.steps_per_tick)))
        else:
            print(f"sglang-dump: logical_count has {list(dump.shape[1:])} layers x experts, "
                  f"cluster {cluster.name} {[cluster.num_layers, cluster.num_experts]}: skipped")
    return out


def run_and_report(cluster: Cluster, kind: str, trace: Trace, args) -> list[dict]:
    """Run one scenario, print its table and write its PNG timeline; returns its rows."""
    t0 = time.perf_counter()
    results = run_scenario(cluster, trace, args.policies, args)
    scenario = f"{cluster.name}/{kind}"
    scenario_rows = rows(scenario, results)
    png = timeline_png(args.out / f"goodput-{cluster.name}-{kind}.png", scenario, trace, results)
    hours = scenario_rows[-1]["hours"]
    share = getattr(results[-1], "pool_share", None)
    note = "" if share is None else (f"; the oracle ran another policy's placement on "
                                     f"{share:.1%} of (tick, layer) pairs")
    print(f"\n### {scenario} ({trace.num_steps} steps, {hours:.2f} h served by the last "
          f"policy{note}; simulated in {time.perf_counter() - t0:.1f} s; {png})\n")
    print(table(scenario_rows), flush=True)
    return scenario_rows


def _report_captured(job) -> tuple[str, list[dict]]:
    """``run_and_report(*job)`` in a worker process: (what it printed, its rows)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        scenario_rows = run_and_report(*job)
    return out.getvalue(), scenario_rows


def run(args) -> int:
    all_rows = []
    start = time.perf_counter()
    dump = read_dump(args.sglang_dump) if getattr(args, "sglang_dump", None) else None
    scenarios = [(CLUSTERS[cname], kind, trace) for cname in args.clusters
                 for kind, trace in traces_for(CLUSTERS[cname], args, dump)]
    if getattr(args, "demo_run", None):
        cluster, trace = demo_replay(args.demo_run, args.steps_per_tick)
        scenarios.append((cluster, args.demo_run.resolve().name, trace))
    if args.jobs < 1:
        raise FieldError("jobs", f"must be >= 1, got {args.jobs}")
    jobs = [(cluster, kind, trace, args) for cluster, kind, trace in scenarios]
    if args.jobs == 1 or len(jobs) == 1:
        for job in jobs:
            all_rows += run_and_report(*job)
    else:
        # largest clusters first, so the processes end together; printed in scenario order
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i][0].num_gpus * jobs[i][2].num_steps)
        # spawned, not forked: the parent may already run OpenMP threads (torch, numba)
        with ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {i: pool.submit(_report_captured, jobs[i]) for i in order}
            for i in range(len(jobs)):
                text, scenario_rows = futures[i].result()
                print(text, end="", flush=True)
                all_rows += scenario_rows
    print(f"total {time.perf_counter() - start:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=1))
    return 0
