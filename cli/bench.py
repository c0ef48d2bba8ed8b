"""``expertplane bench NAME``: run one benchmark of ``expertplane.benchmarks``."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "planner": "EPLB algorithms: time, balance, lower bound, movement",
    "pipeline": "pipeline partitioning vs even and parameter splits",
    "topology": "topology-aware placement trade-off curve",
    "controller": "controller ingest throughput/latency and rollout fan-out",
    "kernels": "MoE layer, all-to-all, grouped GEMM and hot-swap (GPU)",
    "router": "EPLB vs aux-loss-free bias vs both",
    "coldstart": "first plan of a fresh process and controller, empty vs warmed numba cache",
    "models": "our layer in a transformers MoE block vs its grouped_mm/eager experts (GPU)",
    "engines": "time ExpertPlane's SGLang hook / vLLM policy add per engine rebalance",
    "goodput": "cluster goodput: ExpertPlane vs SGLang/vLLM EPLB, static, oracle (simulated)",
}


def register(sub) -> None:
    parser = sub.add_parser("bench", help="run a benchmark", description=__doc__)
    names = parser.add_subparsers(dest="benchmark", required=True, metavar="NAME")
    for name, help_text in BENCHMARKS.items():
        p = names.add_parser(name, help=help_text)
        module = importlib.import_module(f"expertplane.benchmarks.{name}")
        module.add_arguments(p)
        p.set_defaults(func=module.run)
