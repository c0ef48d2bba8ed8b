"""``expertplane demo``: controller, agents and gloo workers on this machine, balancing live."""

from __future__ import annotations

import pathlib


def register(sub) -> None:
    parser = sub.add_parser(
        "demo", help="run a small MoE cluster on this machine and watch it balance itself",
        description=__doc__ + " Writes report.png, timeline.json and logs to the output directory; "
        "exits non-zero if a step failed or balance did not improve over the initial plan.")
    parser.add_argument("--config", type=pathlib.Path, metavar="FILE",
                        help="placement + workload YAML (default: the shipped examples/demo.yaml)")
    parser.add_argument("--duration", type=float, default=45.0, metavar="SECONDS",
                        help="seconds of traffic after the workers start (default 45)")
    parser.add_argument("--settle", type=float, default=10.0, metavar="SECONDS",
                        help="seconds after the first load report left out of the balance "
                        "comparison (default 10)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo-out"),
                        help="output directory (default ./demo-out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and token stream")
    parser.add_argument("--no-rebalance", dest="rebalance", action="store_false",
                        help="control run: keep the initial plan")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda runs the workers on GPUs with NCCL")
    parser.add_argument("--layers", type=int, help="MoE layers")
    parser.add_argument("--experts", type=int, help="logical experts per layer")
    parser.add_argument("--nodes", type=int, help="simulated nodes")
    parser.add_argument("--gpus-per-node", type=int, help="workers per node")
    parser.add_argument("--redundant", type=int, help="redundant expert slots per layer")
    parser.add_argument("--model", metavar="NAME", choices=("tiny-deepseek-v3", "tiny-qwen3-moe",
                                                          "tiny-mixtral"),
                        help="serve a tiny random-init HuggingFace model of this family, saved as "
                        "a checkpoint, instead of the synthetic model (docs/models.md)")
    parser.add_argument("--no-live", dest="live", action="store_const", const=False, default=None,
                        help="print progress lines instead of the live view")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from expertplane.demo.run import DemoOptions, run_demo

    if args.duration <= 0:
        raise ValueError(f"--duration: must be > 0, got {args.duration}")
    return run_demo(DemoOptions(
        config=args.config, duration=args.duration, settle=args.settle, out_dir=args.out,
        seed=args.seed, rebalance=args.rebalance, device=args.device, layers=args.layers,
        experts=args.experts, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        redundant=args.redundant, live=args.live, model=args.model))
