"""Run the whole system on one machine: controller, one agent per simulated node, gloo workers.

The controller and the agents run in this process (threads); every worker is its own process
(``multiprocessing`` spawn) running :func:`expertplane.worker.process.run_worker`. The demo polls
the controller over gRPC like any user would and records a :class:`Timeline`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.resources
import json
import logging
import multiprocessing as mp
import pathlib
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import yaml

from expertplane.demo.timeline import RolloutEvent, Sample, Timeline

APPLY_TIMEOUT_SECONDS = 300.0   # deadline of the demo's ApplyPlacement (see run_demo)

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "demo.yaml"
RUN_CONFIG = "config.json"      # what a run routes, in its output directory (write_run_config)
MIN_IMPROVEMENT = 0.02  # the demo fails unless balance beats the initial plan's by this fraction


@dataclass(frozen=True)
class DemoOptions:
    """Command-line choices. ``duration``: seconds of traffic, counted from the first load report
    (worker start-up, up to ``startup_timeout`` seconds, comes before);
    ``settle``: seconds after the first load report left out of the before/after comparison (the
    initial plan is computed before any load is seen). Size overrides
    (None = keep the config file's value): layers, experts, nodes, gpus_per_node, redundant."""

    config: pathlib.Path | None = None
    duration: float = 45.0
    startup_timeout: float = 120.0
    settle: float = 10.0
    out_dir: pathlib.Path = pathlib.Path("demo-out")
    seed: int = 0
    rebalance: bool = True
    device: str = "cpu"
    layers: int | None = None
    experts: int | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    redundant: int | None = None
    live: bool | None = None  # None = live view when stdout is a terminal
    model: str | None = None  # a tiny HuggingFace model (engines.hf.tiny) instead of synthetic


def load_config(opts: DemoOptions) -> tuple[dict, dict]:
    """The (placement document, workload) of the config file with ``opts``' overrides applied."""
    if opts.config is None:
        text = (importlib.resources.files("expertplane") / "examples" / DEFAULT_CONFIG).read_text()
        source = DEFAULT_CONFIG
    else:
        text, source = pathlib.Path(opts.config).read_text(), str(opts.config)
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("placement"), dict) \
            or not isinstance(doc.get("workload"), dict):
        raise ValueError(f"{source}: must be a mapping with 'placement' and 'workload' mappings")
    placement, workload = copy.deepcopy(doc["placement"]), dict(doc["workload"])
    model, topo = placement.setdefault("model", {}), placement.setdefault("topology", {})
    redundant = placement.get("num_replicas", model.get("num_experts", 0)) - model.get("num_experts", 0)
    for value, section, key in ((opts.layers, model, "num_layers"), (opts.experts, model, "num_experts"),
                                (opts.nodes, topo, "num_nodes"), (opts.gpus_per_node, topo, "gpus_per_node")):
        if value is not None:
            if value < 1:
                raise ValueError(f"{key}: must be >= 1, got {value}")
            section[key] = value
    if opts.redundant is not None:
        if opts.redundant < 0:
            raise ValueError(f"redundant: must be >= 0, got {opts.redundant}")
        redundant = opts.redundant
    placement["num_replicas"] = model["num_experts"] + redundant
    gpus = topo["num_nodes"] * topo["gpus_per_node"]
    if placement["num_replicas"] % gpus:
        raise ValueError(f"redundant: experts + redundant = {placement['num_replicas']} must be a "
                         f"multiple of the {gpus} GPUs")
    if model.get("num_groups", 1) > model["num_experts"] or model["num_experts"] % model.get("num_groups", 1):
        model["num_groups"] = 1
    if not opts.rebalance:
        placement.setdefault("policy", {})["mode"] = "off"
    return placement, workload


def write_run_config(out: pathlib.Path, placement: dict, workload: dict,
                     opts: DemoOptions) -> pathlib.Path:
    """Write ``out/config.json``: the placement and workload of this run (overrides applied),
    its seed and its HuggingFace model (null: the synthetic stream, whose per-step popularity
    follows from these; ``bench goodput --demo-run`` replays it). Returns the path."""
    path = out / RUN_CONFIG
    path.write_text(json.dumps({"placement": placement, "workload": workload, "seed": opts.seed,
                                "model": opts.model}, indent=1))
    return path


def _save_tiny_model(opts: DemoOptions, mdoc: dict, workload: dict, out: pathlib.Path) -> str:
    """Write the tiny HuggingFace model ``opts.model`` at the placement's sizes to
    ``out/model`` (its routing is skewed by its init: engines.hf.tiny); returns the path."""
    from expertplane.engines.hf.tiny import TinySpec, save_tiny

    groups = mdoc.get("num_groups", 1)
    spec = TinySpec(layers=mdoc["num_layers"], experts=mdoc["num_experts"],
                    top_k=workload["top_k"], hidden=workload["hidden"],
                    intermediate=workload["intermediate"], groups=groups,
                    topk_groups=min(workload.get("topk_groups", 1), groups))
    mdoc["expert_bytes"] = 3 * spec.hidden * spec.intermediate * 4      # fp32
    return str(save_tiny(opts.model, out / "model", spec, opts.seed))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(config, log_path: str, results) -> None:
    """Child process: one rank. SIGINT is left to the parent, SIGTERM stops at a common step."""
    import torch

    from expertplane.worker.process import run_worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    torch.set_num_threads(1)
    logging.basicConfig(filename=log_path, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        results.put((config.rank, dataclasses.asdict(run_worker(config, stop)), None))
    except BaseException as exc:  # reported to the parent, then re-raised for the exit code
        results.put((config.rank, None, f"{type(exc).__name__}: {exc}"))
        raise


class _Poller:
    """Reads the controller's view of one placement into a :class:`Timeline`."""

    def __init__(self, channel, name: str, num_gpus: int):
        from expertplane.proto import expertplane_pb2 as pb
        from expertplane.proto import expertplane_pb2_grpc as pb_grpc
        from expertplane.rpc.tensors import to_numpy

        self.pb, self.to_numpy = pb, to_numpy
        self.plans = pb_grpc.PlanServiceStub(channel)
        self.name, self.num_gpus = name, num_gpus
        first = self.plans.GetPlan(pb.GetPlanRequest(placement=name, version=0), timeout=10)
        self.initial_version = first.summary.version
        self.initial_phy2log = to_numpy(first.phy2log, "phy2log", ndim=2)
        self.initial_logcnt = to_numpy(first.logcnt, "logcnt", ndim=2)
        self._rollouts: dict[str, RolloutEvent] = {}

    def poll(self, timeline: Timeline, t: float) -> None:
        from expertplane.planner.metrics import balance, balance_of_gpu_loads

        pb = self.pb
        window = self.plans.GetLoad(pb.GetLoadRequest(placement=self.name), timeout=5)
        timeline.steps, timeline.failed_steps = window.steps, window.failed_steps  # live, all ranks
        load = self.to_numpy(window.load, "load", ndim=2)
        gpu_load = self.to_numpy(window.gpu_load, "gpu_load", ndim=2)
        # right after a switch the window under the new plan is still empty: skip, don't plot 1.0
        if load.sum() > 0 and gpu_load.sum(axis=1).all():
            state = next(p for p in self.plans.ListPlacements(pb.ListPlacementsRequest(), timeout=5)
                         .placements if p.spec.name == self.name)
            predicted = np.asarray(state.predicted_balance) if state.predicted_balance else \
                np.full(load.shape[0], np.nan)
            timeline.samples.append(Sample(
                t=t, plan_version=state.plan_version, balance=balance_of_gpu_loads(gpu_load),
                control=balance(load, self.initial_phy2log, self.initial_logcnt, self.num_gpus),
                predicted=predicted, gpu_load=gpu_load))
        for rec in self.plans.ListRollouts(pb.ListRolloutsRequest(placement=self.name, limit=50),
                                           timeout=5).rollouts:
            known = self._rollouts.get(rec.rollout_id)
            if known is not None and known.state == rec.state:
                continue
            summary = self.plans.GetPlan(pb.GetPlanRequest(placement=self.name, version=rec.to_version),
                                         timeout=5).summary
            cur, new = np.mean(summary.previous_plan_balance or [np.nan]), np.mean(summary.predicted_balance)
            self._rollouts[rec.rollout_id] = RolloutEvent(
                t=t, from_version=rec.from_version, to_version=rec.to_version, state=rec.state,
                slots_moved=summary.slots_moved, bytes_moved=summary.bytes_moved,
                gain=float((cur - new) / cur) if cur > 0 else 0.0,
                prepare_seconds=rec.prepare_seconds, commit_seconds=rec.commit_seconds)
        timeline.rollouts = sorted(self._rollouts.values(), key=lambda r: r.to_version)


def run_demo(opts: DemoOptions) -> int:
    """Run the demo; returns the exit code (0 = no failed step and, when rebalancing, balance
    improved over the initial plan on the same load)."""
    from expertplane.cli.output import console as rich_console
    from rich.live import Live

    from expertplane.agent.agent import Agent
    from expertplane.agent.config import AgentConfig
    from expertplane.controller.config import ControllerConfig
    from expertplane.controller.placement_files import placement_from_dict
    from expertplane.controller.server import ControllerServer
    from expertplane.demo.view import render
    from expertplane.worker.synthetic import ModelConfig, StreamConfig
    from expertplane.worker.process import WorkerConfig
    from expertplane.proto import expertplane_pb2_grpc as pb_grpc
    from expertplane.rpc.channels import make_channel

    placement, workload = load_config(opts)
    name, mdoc, topo = placement["name"], placement["model"], placement["topology"]
    nodes, per_node = topo["num_nodes"], topo["gpus_per_node"]
    world = nodes * per_node
    model = ModelConfig(num_layers=mdoc["num_layers"], num_experts=mdoc["num_experts"],
                        hidden=workload["hidden"], intermediate=workload["intermediate"],
                        top_k=workload["top_k"], num_groups=mdoc.get("num_groups", 1),
                        topk_groups=min(workload.get("topk_groups", 1), mdoc.get("num_groups", 1)),
                        seed=opts.seed)
    stream = StreamConfig(tokens_per_step=workload["tokens_per_step"],
                          zipf_exponent=workload["zipf_exponent"], steer=workload["steer"],
                          drift_period=workload["drift_period"], drift_swaps=workload["drift_swaps"],
                          seed=opts.seed)
    mdoc["expert_bytes"] = model.expert_bytes

    out = pathlib.Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model = _save_tiny_model(opts, mdoc, workload, out) if opts.model else None
    write_run_config(out, placement, workload, opts)
    (out / "controller.db").unlink(missing_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.FileHandler(out / "demo.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    console = rich_console()
    live_view = console.is_terminal if opts.live is None else opts.live
    mode = "rebalancing" if opts.rebalance else "control run: --no-rebalance"
    timeline = Timeline(tokens_per_step=stream.tokens_per_step)
    results: dict[int, dict] = {}
    errors: list[str] = []
    sockets = tempfile.mkdtemp(prefix="ep-demo-")
    ctx = mp.get_context("spawn")
    result_queue = ctx.Queue()
    procs: list = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, sockets, True)
        controller = ControllerServer(ControllerConfig(
            listen="127.0.0.1:0", db_url=f"sqlite:///{out / 'controller.db'}",
            policy_interval_seconds=1.0, snapshot_interval_seconds=30.0, rollout_timeout_seconds=30.0))
        address = f"127.0.0.1:{controller.start()}"
        stack.callback(controller.stop, 2.0)
        channel = make_channel(address)
        stack.callback(channel.close)
        message = placement_from_dict(placement)
        # The first run on a machine compiles the planner (numba, cached on disk afterwards)
        # while it computes the initial plan: 27 s on 2 busy vCPUs, so a generous deadline.
        console.print("applying the placement: computing its initial plan")
        pb_grpc.PlanServiceStub(channel).ApplyPlacement(message, timeout=APPLY_TIMEOUT_SECONDS)
        agents = []
        for n in range(nodes):
            agent = Agent(AgentConfig(controller=address, node=f"node-{n}",
                                      listen=f"unix:{sockets}/agent-{n}.sock", interval=0.5))
            agents.append((agent, agent.start()))
        stack.callback(lambda: [a.stop() for a, _ in agents])
        master = f"127.0.0.1:{_free_port()}"
        for rank in range(world):
            cfg = WorkerConfig(
                rank=rank, world_size=world, master=master, node=f"node-{rank // per_node}",
                placement=name, agent=agents[rank // per_node][1], controller=address,
                listen=f"unix:{sockets}/worker-{rank}.sock", model=model, stream=stream,
                device=opts.device, backend="nccl" if opts.device == "cuda" else "gloo",
                gpus_per_node=per_node, step_interval=workload.get("step_interval", 0.0),
                verify_every=0 if hf_model else workload.get("verify_every", 0),
                hf_model=hf_model)
            proc = ctx.Process(target=_worker_main, name=f"worker-{rank}", daemon=True,
                               args=(cfg, str(out / f"worker-{rank}.log"), result_queue))
            proc.start()
            procs.append(proc)
        stack.callback(_reap, procs)

        poller = _Poller(channel, name, world)
        start = time.monotonic()
        console.print(f"[bold]ExpertPlane demo[/]: {nodes} nodes x {per_node} workers, "
                      f"{model.num_layers} MoE layers x {model.num_experts} experts, "
                      f"{placement['num_replicas']} slots per layer ({mode}); logs in {out}/")
        live = Live(render(timeline, 0.0, _deadline(timeline, opts), mode), console=console,
                    auto_refresh=False) if live_view else contextlib.nullcontext()
        with live:
            last_print = 0.0
            while (elapsed := time.monotonic() - start) < _deadline(timeline, opts):
                dead = [p.name for p in procs if not p.is_alive()]
                if dead:
                    errors.append(f"{', '.join(dead)} exited early (see {out}/worker-*.log)")
                    break
                poller.poll(timeline, elapsed)
                if live_view:
                    live.update(render(timeline, elapsed, _deadline(timeline, opts), mode), refresh=True)
                elif elapsed - last_print >= 10 and timeline.samples:
                    last_print = elapsed
                    s = timeline.samples[-1]
                    console.print(f"t={elapsed:5.1f}s plan v{s.plan_version} balance now "
                                  f"{np.mean(s.balance):.3f}, initial plan {np.mean(s.control):.3f}, "
                                  f"rollouts {sum(r.state == 'committed' for r in timeline.rollouts)}, "
                                  f"steps {timeline.steps}, failed {timeline.failed_steps}")
                time.sleep(1.0)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: every rank stops at the same step
        deadline = time.monotonic() + 60
        while len(results) + len(errors) < world and time.monotonic() < deadline:
            try:
                rank, result, error = result_queue.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if error:
                errors.append(f"worker {rank}: {error}")
            else:
                results[rank] = result
        poller.poll(timeline, time.monotonic() - start)
    if results:  # the workers' own totals include steps after their last counter pull
        timeline.steps = sum(r["steps"] for r in results.values())
        timeline.failed_steps = max(timeline.failed_steps,
                                    sum(r["failed_steps"] for r in results.values()))
    if len(results) < world:
        errors.append(f"only {len(results)} of {world} workers reported a result")
    if not timeline.samples:
        errors.append(f"no load reached the controller within {opts.startup_timeout:.0f} s")
    return _finish(timeline, opts, mode, out, errors, console)


def _finish(timeline: Timeline, opts: DemoOptions, mode: str, out: pathlib.Path,
            errors: list[str], console) -> int:
    from expertplane.demo.report import summary_lines, write_png

    (out / "timeline.json").write_text(json.dumps({
        "samples": [{"t": s.t, "plan_version": s.plan_version, "balance": s.balance.tolist(),
                     "control": s.control.tolist(), "predicted": s.predicted.tolist(),
                     "gpu_load": s.gpu_load.tolist()} for s in timeline.samples],
        "rollouts": [dataclasses.asdict(r) for r in timeline.rollouts],
        "steps": timeline.steps, "failed_steps": timeline.failed_steps, "tokens": timeline.tokens,
        "errors": errors,
    }, indent=1))
    if timeline.samples:
        png = write_png(timeline, out / "report.png", f"ExpertPlane demo ({mode})")
        console.print(f"report: {png}")
    for line in summary_lines(timeline, opts.settle):
        console.print(line)
    observed = timeline.mean_balance("balance", opts.settle)
    control = timeline.mean_balance("control", opts.settle)
    if timeline.failed_steps:
        errors.append(f"{timeline.failed_steps} steps failed")
    committed = sum(r.state == "committed" for r in timeline.rollouts)
    if opts.rebalance and not (committed and observed <= (1 - MIN_IMPROVEMENT) * control):
        errors.append(f"balance did not improve by {MIN_IMPROVEMENT:.0%}: {observed:.3f} observed "
                      f"vs {control:.3f} for the initial plan on the same load, "
                      f"{committed} rollouts committed")
    for e in errors:
        console.print(f"[red]FAILED[/]: {e}")
    if not errors:
        console.print("[green]OK[/]: no failed step" + (
            f"; balance {control:.3f} -> {observed:.3f} ({(control - observed) / control:.0%} better "
            "than keeping the initial plan)" if opts.rebalance else ""))
    return 1 if errors else 0


def _deadline(timeline: Timeline, opts: DemoOptions) -> float:
    """Seconds after start at which the demo stops: ``duration`` after the first load sample."""
    if not timeline.samples:
        return opts.startup_timeout + opts.duration
    return timeline.samples[0].t + opts.duration


def _reap(procs) -> None:
    """Stop every worker process: SIGTERM, then SIGKILL after a grace period."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 10
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
