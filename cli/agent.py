"""``expertplane agent``: the node agent (workers register here; load goes to the controller)."""

from __future__ import annotations

import argparse
import os

PLAN_FILE_ENV = "EXPERTPLANE_PLAN_FILE"   # engines.plan_file.PLAN_FILE_ENV (not imported: --help)
RECORDER_DIR_ENV = "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"   # SGLang's, default /tmp


def register(sub) -> None:
    from expertplane.rpc.security import LOCAL_TOKEN_ENV, add_security_arguments

    parser = sub.add_parser(
        "agent", help="run the node agent: pull worker counters, stream load, relay rollouts",
        description="Run the node agent of one GPU node. Workers register on --socket/--listen; "
        "the agent pulls their per-slot counters every --interval, streams LoadReports to the "
        "controller and relays rollout commands. SIGTERM/SIGINT flush and stop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--controller", required=True, help="controller gRPC address HOST:PORT")
    parser.add_argument("--node", required=True, help="this node's name")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="serve AgentService on this Unix socket")
    where.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:50061",
                       help="serve AgentService on this TCP address (when no --socket)")
    parser.add_argument("--interval", default="1s", help="counter pull interval (e.g. 500ms, 1s)")
    parser.add_argument("--buffer", type=int, default=1024,
                        help="LoadReports held while the controller is unreachable")
    parser.add_argument("--lost-after", type=int, default=3,
                        help="missed pulls after which a worker is reported lost")
    parser.add_argument("--pull-timeout", default="500ms", help="deadline of one counter pull")
    parser.add_argument("--prepare-timeout", default="60s",
                        help="deadline of a worker's Prepare (it stages new weights)")
    parser.add_argument("--commit-timeout", default="30s", help="deadline of a worker's Commit")
    parser.add_argument("--flush-timeout", default="5s",
                        help="the longest shutdown waits for buffered reports to be acknowledged")
    parser.add_argument("--hello-timeout", default="10s",
                        help="how long the controller may take to register this agent before "
                             "an error is printed (the agent keeps trying)")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics here (e.g. 0.0.0.0:9101)")
    engines = parser.add_argument_group(
        "engines", "serving engines (SGLang, vLLM) on this node: see docs/engines.md")
    engines.add_argument("--placement", default="", metavar="NAME",
                         help="the placement the node's engine serves (with --plan-file)")
    engines.add_argument("--plan-file", metavar="PATH", default=os.environ.get(PLAN_FILE_ENV),
                         help="keep the plan in force of --placement in this file for the "
                              f"engine's plugin (default: ${PLAN_FILE_ENV})")
    engines.add_argument("--plan-poll", default="2s",
                         help="how often the plan in force is asked for (--plan-file)")
    engines.add_argument("--sglang-url", metavar="URL",
                         help="report the load of the SGLang server at this URL (e.g. "
                              "http://127.0.0.1:30000) for --placement: its expert-distribution "
                              "recorder is started once and dumped every --sglang-interval")
    engines.add_argument("--sglang-recorder-dir", metavar="DIR",
                         default=os.environ.get(RECORDER_DIR_ENV, "/tmp"),
                         help="the SGLang server's recorder directory, shared with the agent "
                              f"(default: ${RECORDER_DIR_ENV}, else /tmp as in SGLang)")
    engines.add_argument("--sglang-interval", default="10s",
                         help="seconds between recorder dumps (one load report each)")
    engines.add_argument("--sglang-moe-layers", metavar="LAYERS",
                         help="hidden-layer index of each MoE layer, e.g. 3-60 (default: learned "
                              "from the first dump with traffic: the rows that carry load)")
    engines.add_argument("--sglang-timeout", default="30s",
                         help="deadline of one HTTP call to SGLang (3 tries when unreachable)")
    engines.add_argument("--sglang-dump-wait", default="5s",
                         help="how long a dump file may take to appear in --sglang-recorder-dir")
    engines.add_argument("--sglang-api-key-file", metavar="PATH",
                         help="file holding SGLang's --api-key / --admin-api-key (sent as a "
                              "bearer token)")
    add_security_arguments(parser.add_argument_group(
        "controller uplink TLS/auth", "the agent's connection to the controller"))
    add_security_arguments(parser.add_argument_group(
        "node-local TLS/auth", "AgentService served to the workers (--local-tls-ca: require "
        "client certs) and the agent's calls to them (--local-tls-ca verifies them, the same "
        "cert/key is the client certificate); --local-token-file may name the same file as "
        "--token-file"), prefix="local-", token_env=LOCAL_TOKEN_ENV)
    parser.set_defaults(func=_run)


def config_from_args(args):
    """An ``AgentConfig`` from parsed options (raises ValueError naming a bad option)."""
    from expertplane.agent.config import AgentConfig, Deadlines, parse_duration
    from expertplane.rpc.security import LOCAL_TOKEN_ENV, security_from_args

    deadlines = Deadlines(pull=parse_duration(args.pull_timeout, "--pull-timeout"),
                          prepare=parse_duration(args.prepare_timeout, "--prepare-timeout"),
                          commit=parse_duration(args.commit_timeout, "--commit-timeout"))
    return AgentConfig(
        controller=args.controller, node=args.node,
        listen=f"unix:{args.socket}" if args.socket else args.listen,
        interval=parse_duration(args.interval, "--interval"),
        buffer=args.buffer, lost_after=args.lost_after,
        flush_timeout=parse_duration(args.flush_timeout, "--flush-timeout"),
        hello_timeout=parse_duration(args.hello_timeout, "--hello-timeout"),
        metrics=args.metrics, deadlines=deadlines, security=security_from_args(args),
        local_security=security_from_args(args, "local-", LOCAL_TOKEN_ENV))


def sidecars_from_args(args) -> list:
    """The agent's sidecar factories for the engine options (raises ValueError naming one)."""
    from expertplane.agent.config import parse_duration

    sidecars = []
    source = sglang_source_from_args(args)
    if source is not None:
        sidecars.append(lambda ctx: source.reporting_to(ctx.engine_load, ctx.registry))
    if args.plan_file:
        from expertplane.engines.plan_file_writer import PlanFileWriter

        if not args.placement:
            raise ValueError("--placement: required with --plan-file")
        poll = parse_duration(args.plan_poll, "--plan-poll")
        layout = (lambda: source.layout) if source is not None else None
        sidecars.append(lambda ctx: PlanFileWriter(args.placement, args.plan_file, ctx.channel,
                                                   poll=poll, layout=layout))
    return sidecars


def sglang_source_from_args(args):
    """The SGLang load source of ``--sglang-url`` (None without it); raises ValueError naming
    the option."""
    if not args.sglang_url:
        return None
    from expertplane.agent.config import parse_duration
    from expertplane.engines.loads import parse_layers
    from expertplane.engines.sglang import TESTED_VERSIONS
    from expertplane.engines.sglang_http import HttpPolicy
    from expertplane.engines.sglang_load import SglangLoadSource, SglangSourceConfig
    from expertplane.errors import FieldError

    if not args.placement:
        raise ValueError("--placement: required with --sglang-url")
    key = None
    if args.sglang_api_key_file:
        try:
            key = open(args.sglang_api_key_file).read().strip()
        except OSError as exc:
            raise ValueError(f"--sglang-api-key-file: cannot read {args.sglang_api_key_file}: "
                             f"{exc.strerror}") from None
    try:
        config = SglangSourceConfig(
            url=args.sglang_url, recorder_dir=args.sglang_recorder_dir, placement=args.placement,
            interval=parse_duration(args.sglang_interval, "--sglang-interval"),
            moe_layers=(parse_layers(args.sglang_moe_layers, "--sglang-moe-layers")
                        if args.sglang_moe_layers else None),
            dump_wait=parse_duration(args.sglang_dump_wait, "--sglang-dump-wait"),
            http=HttpPolicy(timeout=parse_duration(args.sglang_timeout, "--sglang-timeout")),
            api_key=key)
    except FieldError as exc:            # named as the option that carried the field
        option = exc.field if exc.field.startswith("--") else f"--{exc.field.replace('_', '-')}"
        raise exc.at(option) from None
    return SglangLoadSource(config, TESTED_VERSIONS)


def _run(args) -> int:
    import signal
    import threading

    from expertplane.agent.agent import Agent

    agent = Agent(config_from_args(args), sidecars_from_args(args))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    address = agent.start()
    print(f"agent {args.node} serving workers at {address}"
          + (f", metrics on :{agent.metrics_port}" if agent.metrics_port else ""), flush=True)
    threading.Thread(target=_say_when_registered, args=(agent, args.node), daemon=True).start()
    done.wait()
    flushed = agent.stop()
    print(f"agent {args.node} stopped ({'all reports acknowledged' if flushed else 'unacknowledged reports dropped'})",
          flush=True)
    return 0


def _say_when_registered(agent, node: str) -> None:
    """Print one line once the controller has registered the agent (ready), or one error line
    on stderr when it has not within --hello-timeout (then the line once it has)."""
    import sys

    try:
        agent.wait_registered()
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        agent.registered.wait()
    print(f"agent {node} ready: registered with the controller at {agent.config.controller}",
          flush=True)
