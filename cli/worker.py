"""``expertplane worker``: one rank of the reference worker (synthetic MoE model over
torch.distributed) serving WorkerService to its node agent and applying hot-swaps."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    parser = sub.add_parser(
        "worker", help="run one rank of the reference MoE worker", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("process group")
    g.add_argument("--rank", type=int, required=True, help="global rank (= GPU index)")
    g.add_argument("--world-size", type=int, required=True, help="number of ranks")
    g.add_argument("--master", required=True, metavar="HOST:PORT",
                   help="torch.distributed rendezvous (rank 0 listens there)")
    g.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                   help="torch.distributed backend (nccl for GPUs)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model runs (cuda: GPU --rank %% --gpus-per-node)")
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="ranks per node for replica choice and transfer sources (default: all)")
    g.add_argument("--collective-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="deadline of one collective (all-to-all, all-reduce)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per worker (0 = torch's default)")
    g.add_argument("--drain", type=float, default=5.0, metavar="SECONDS",
                   help="after the last step, wait at most this long for the counter pulls "
                        "that take every window still held")

    g = parser.add_argument_group("control plane")
    g.add_argument("--node", default="node-0", help="node name reported to the agent")
    g.add_argument("--placement", default="default", help="name of the placement this worker serves")
    g.add_argument("--agent", metavar="unix:PATH|HOST:PORT",
                   help="node agent to register with (omit to run standalone)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan", metavar="FILE", help="initial plan file (JSON/YAML from "
                     "`expertplane plan`, SGLang map, .npy/.pt phy2log)")
    src.add_argument("--controller", metavar="HOST:PORT",
                     help="fetch the initial plan from the controller's PlanService")
    g.add_argument("--plan-version", type=int, default=1, help="version of --plan")
    g.add_argument("--listen", metavar="unix:PATH|HOST:PORT",
                   help="WorkerService endpoint (default: a Unix socket in the temp dir)")
    g.add_argument("--rollout-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="longest wait of a Prepare/Commit/Abort call")
    g.add_argument("--swap-step-budget-mb", type=float, default=256.0, metavar="MIB",
                   help="hot-swap staging MiB a rank copies per serving step; 0 = all at once")

    g = parser.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", default=None,
                   help="serve this HuggingFace MoE checkpoint (config.json + safetensors; "
                        "each rank loads only its slots' experts) instead of the synthetic model")
    g = parser.add_argument_group("synthetic model")
    g.add_argument("--layers", type=int, default=4, help="MoE layers L")
    g.add_argument("--experts", type=int, default=16, help="logical experts E per layer")
    g.add_argument("--hidden", type=int, default=64, help="hidden size H of the tokens")
    g.add_argument("--intermediate", type=int, default=128,
                   help="intermediate size I of each expert's SwiGLU FFN")
    g.add_argument("--top-k", type=int, default=4, help="experts each token is routed to")
    g.add_argument("--groups", type=int, default=1, help="expert groups (group-limited routing)")
    g.add_argument("--topk-groups", type=int, default=1,
                   help="groups a token may route into (group-limited routing)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of weights and activations")
    g.add_argument("--seed", type=int, default=0, help="weights seed")

    g = parser.add_argument_group("token stream")
    g.add_argument("--tokens-per-step", type=int, default=256, help="tokens per rank and step")
    g.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of expert popularity")
    g.add_argument("--steer", type=float, default=4.0, help="strength of the popularity signal")
    g.add_argument("--drift-period", type=int, default=50, help="steps between drifts (0 = none)")
    g.add_argument("--drift-swaps", type=int, default=2, help="rank swaps per layer and drift")
    g.add_argument("--stream-seed", type=int, default=0, help="token stream seed")
    g.add_argument("--step-interval", type=float, default=0.0, metavar="SECONDS",
                   help="sleep between steps")
    g.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0 = never)")
    g.add_argument("--verify-every", type=int, default=0,
                   help="check every N-th step against the dense reference (0 = never)")
    g.add_argument("--capacity-factor", type=float, default=0.0,
                   help="per-slot capacity: factor x mean rows per slot; excess rows are "
                        "dropped and reported (0 = no capacity)")
    g.add_argument("--capacity-mode", choices=("drop", "next_best"), default="drop",
                   help="rows over capacity: dropped, or sent to the next best expert")

    from expertplane.rpc.security import LOCAL_TOKEN_ENV, add_security_arguments
    add_security_arguments(parser.add_argument_group(
        "controller TLS/auth", "the connection to the controller (--controller)"))
    add_security_arguments(parser.add_argument_group(
        "node-local TLS/auth", "WorkerService served to the agent (--local-tls-ca: require client "
        "certs) and Register calls to it (--local-tls-ca verifies it, the same cert/key is the "
        "client certificate); --local-token-file may name the same file as --token-file"),
        prefix="local-", token_env=LOCAL_TOKEN_ENV)
    parser.set_defaults(func=_run)


def config_from_args(args):
    """A :class:`WorkerConfig` from parsed arguments."""
    from expertplane.kernels.balancing import CapacityConfig
    from expertplane.worker.synthetic import ModelConfig, StreamConfig
    from expertplane.worker.process import WorkerConfig
    from expertplane.rpc.security import LOCAL_TOKEN_ENV, security_from_args

    return WorkerConfig(
        rank=args.rank, world_size=args.world_size, master=args.master, node=args.node,
        placement=args.placement, agent=args.agent, plan_file=args.plan,
        plan_version=args.plan_version, controller=args.controller, listen=args.listen,
        model=ModelConfig(num_layers=args.layers, num_experts=args.experts, hidden=args.hidden,
                          intermediate=args.intermediate, top_k=args.top_k,
                          num_groups=args.groups, topk_groups=args.topk_groups,
                          dtype=args.dtype, seed=args.seed),
        stream=StreamConfig(tokens_per_step=args.tokens_per_step, zipf_exponent=args.zipf,
                            steer=args.steer, drift_period=args.drift_period,
                            drift_swaps=args.drift_swaps, seed=args.stream_seed),
        device=args.device, backend=args.backend, gpus_per_node=args.gpus_per_node,
        step_interval=args.step_interval, max_steps=args.max_steps,
        verify_every=args.verify_every, collective_timeout=args.collective_timeout,
        rollout_timeout=args.rollout_timeout, threads=args.threads,
        drain_seconds=args.drain, security=security_from_args(args),
        local_security=security_from_args(args, "local-", LOCAL_TOKEN_ENV),
        capacity=CapacityConfig(args.capacity_factor, args.capacity_mode)
        if args.capacity_factor else None,
        swap_step_budget_bytes=None if args.swap_step_budget_mb == 0
        else int(args.swap_step_budget_mb * 2**20), hf_model=args.model)


def _run(args) -> int:
    import signal
    import threading

    from expertplane.worker.process import run_worker

    config = config_from_args(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    result = run_worker(config, stop)
    print(f"rank {config.rank}: {result.steps} steps, {result.failed_steps} failed, "
          f"plan v{result.plan_version}, {result.swaps} swaps")
    return 1 if result.failed_steps else 0
