"""The reference worker process: one rank of the synthetic MoE model over torch.distributed,
serving ``WorkerService`` on a node-local endpoint and registered with its node agent.

:func:`run_worker` runs one rank from a :class:`WorkerConfig` (the demo and tests call it in
their own processes; ``expertplane worker`` is its command line). The step loop::

    while coordinator.step_boundary():       # one MIN all_reduce: swaps and stop, in step
        apply a pending router bias
        forward one batch of the token stream (optionally checked against the dense reference)
        add the per-slot counts [L, S] to the ledger under the plan version in force
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
import torch.distributed as dist
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_when_event_set,
    wait_exponential_jitter,
)

from expertplane.kernels.balancing import CapacityConfig
from expertplane.kernels.hotswap import DEFAULT_STEP_BUDGET_BYTES, HotSwapEngine, SwapCoordinator
from expertplane.planner.io import load_phy2log
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.security import SecurityConfig
from expertplane.worker.service import (
    CounterLedger,
    WorkerIdentity,
    WorkerServicer,
    placements_from_plan,
    serve_worker_service,
)
from expertplane.worker.synthetic import ModelConfig, StreamConfig, SyntheticMoEModel, TokenStream


__all__ = ["WorkerConfig", "WorkerResult", "initial_plan", "run_worker"]

log = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    """Everything one rank needs.

    master: ``host:port`` of the torch.distributed rendezvous (rank 0 listens there).
    agent: the node agent's endpoint (``unix:/path`` or ``host:port``), None = standalone.
    plan_file (a JSON/YAML plan as written by ``expertplane plan``, or any file
    ``planner.io.load_phy2log`` reads) with ``plan_version``, or ``controller`` (PlanService
    GetPlan of ``placement`` with ``in_force``: the plan in force on its workers, never an
    aborted rollout's): the initial plan.
    listen: this worker's WorkerService endpoint; default a Unix socket in the temp dir.
    step_interval: seconds to sleep between steps (0 = flat out); max_steps: 0 = until stopped.
    verify_every: compare every N-th step with the dense reference (0 = never); a mismatch
    beyond the dtype's tolerance counts as a failed step.
    threads: torch intra-op threads (CPU; 0 = torch's default).
    drain_seconds: after the last step, keep serving until every counted step has been pulled
    (one pull per counter window; a plan version change since the last pull leaves two) and, by
    an agent, acknowledged (``CounterLedger.wait_delivered``), at most this long.
    capacity: per-slot capacity of every layer (None = none); its drops are reported in
    ``CounterSnapshot.dropped_tokens``.
    hf_model: a HuggingFace MoE checkpoint directory to serve instead of the synthetic model
    (``engines.hf``: each rank loads only its slots' experts; routing is the model's own, so
    no capacity, router bias or dense-reference check; ``stream`` sets its token ids).
    swap_step_budget_bytes: hot-swap staging bytes a rank copies, sends or receives per serving
    step (the copies of a swap spread over several steps); None = all at once (unpaced).
    security: TLS / bearer token of the connection to the controller (initial plan).
    local_security: TLS / mTLS / bearer token of the node-local side: the WorkerService server
    (``tls_cert``/``tls_key`` serve it, ``tls_ca`` requires client certs, ``token`` is required
    from the agent) and the Register calls to the agent (``tls_ca`` verifies it, the same
    cert/key is the client certificate, ``token`` is sent).
    """

    rank: int
    world_size: int
    master: str
    node: str = "node-0"
    placement: str = "default"
    agent: str | None = None
    plan_file: str | None = None
    plan_version: int = 1
    controller: str | None = None
    listen: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    device: str = "cpu"
    backend: str = "gloo"
    gpus_per_node: int | None = None
    step_interval: float = 0.0
    max_steps: int = 0
    verify_every: int = 0
    collective_timeout: float = 120.0
    rollout_timeout: float = 120.0
    drain_seconds: float = 5.0
    threads: int = 1
    security: SecurityConfig = field(default_factory=SecurityConfig)
    capacity: CapacityConfig | None = None
    swap_step_budget_bytes: int | None = DEFAULT_STEP_BUDGET_BYTES
    local_security: SecurityConfig = field(default_factory=SecurityConfig)
    hf_model: str | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: must be in [0, {self.world_size}), got {self.rank}")
        if ":" not in self.master:
            raise ValueError(f"master: must be HOST:PORT, got {self.master!r}")
        if (self.plan_file is None) == (self.controller is None):
            raise ValueError("plan_file/controller: give exactly one source of the initial plan")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device: must be cpu or cuda, got {self.device!r}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend: must be gloo or nccl, got {self.backend!r}")
        if self.backend == "nccl" and self.device != "cuda":
            raise ValueError("backend: nccl needs device cuda")
        if self.step_interval < 0 or self.max_steps < 0 or self.verify_every < 0:
            raise ValueError("step_interval/max_steps/verify_every: must be >= 0")
        if self.swap_step_budget_bytes is not None and self.swap_step_budget_bytes < 1:
            raise ValueError("swap_step_budget_bytes: must be >= 1 byte or None (unpaced), "
                             f"got {self.swap_step_budget_bytes}")
        if self.hf_model and (self.capacity is not None or self.verify_every):
            raise ValueError("capacity/verify_every: not available with hf_model (the model "
                             "routes itself and no rank holds every expert)")
        gpn = self.gpus_per_node or self.world_size
        if self.world_size % gpn:
            raise ValueError(f"gpus_per_node: {gpn} must divide world_size {self.world_size}")

    def listen_address(self) -> str:
        if self.listen:
            return self.listen
        return "unix:" + os.path.join(tempfile.gettempdir(),
                                      f"expertplane-{self.placement}-{self.node}-{self.rank}.sock")


@dataclass(frozen=True)
class WorkerResult:
    """How a run ended: steps run, steps failed, the plan version in force, swaps committed."""

    steps: int
    failed_steps: int
    plan_version: int
    swaps: int


def initial_plan(config: WorkerConfig, stop: threading.Event | None = None) -> pb.Plan:
    """The starting plan as a ``Plan`` message: from ``plan_file`` or the controller (retried
    with backoff until it answers or ``stop`` is set)."""
    if config.plan_file:
        phy2log = load_phy2log(config.plan_file, "plan_file")
        plan = pb.Plan(phy2log=pb.Int64Tensor(shape=list(phy2log.shape),
                                              values=phy2log.ravel().tolist()))
        plan.summary.version = config.plan_version
        plan.summary.placement = config.placement
        return plan
    channel = make_channel(config.controller, config.security)
    stub = pb_grpc.PlanServiceStub(channel)
    try:
        for attempt in Retrying(wait=wait_exponential_jitter(initial=0.2, max=5.0),
                                retry=retry_if_exception_type(grpc.RpcError),
                                stop=stop_when_event_set(stop or threading.Event()),
                                reraise=True):
            with attempt:
                return stub.GetPlan(pb.GetPlanRequest(placement=config.placement, in_force=True),
                                    timeout=10.0)
    finally:
        channel.close()
    raise OSError("controller: stopped before the initial plan arrived")


class _AgentLink:
    """Registers with the node agent (over ``security``), retrying with backoff, and registers
    again when the agent stops pulling (it restarted and forgot us)."""

    def __init__(self, target: str, info: Callable[[], pb.WorkerInfo], stop: threading.Event,
                 security: SecurityConfig) -> None:
        self.target, self._info, self._stop, self._security = target, info, stop, security
        self.last_contact = time.monotonic()
        self.interval = 1.0
        self.registrations = 0
        self._thread = threading.Thread(target=self._run, name="agent-link", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def touched(self) -> None:
        """The agent pulled our counters: it knows us."""
        self.last_contact = time.monotonic()

    def _register(self, stub) -> None:
        for attempt in Retrying(wait=wait_exponential_jitter(initial=0.2, max=5.0),
                                retry=retry_if_exception_type(grpc.RpcError),
                                stop=stop_when_event_set(self._stop), reraise=True,
                                before_sleep=before_sleep_log(log, logging.WARNING)):
            with attempt:
                resp = stub.Register(pb.RegisterRequest(worker=self._info()), timeout=5.0)
        self.interval = resp.pull_interval_seconds or 1.0
        self.registrations += 1
        self.touched()
        log.info("registered with agent %s (node %s, pull interval %.2fs)", self.target,
                 resp.node, self.interval)

    def _run(self) -> None:
        channel = make_channel(self.target, self._security)
        stub = pb_grpc.AgentServiceStub(channel)
        try:
            while not self._stop.is_set():
                try:
                    self._register(stub)
                except grpc.RpcError:
                    return  # only when stopping
                while not self._stop.wait(0.2):
                    if time.monotonic() - self.last_contact > max(3 * self.interval, 2.0):
                        log.warning("agent %s has not pulled for %.1fs: registering again",
                                    self.target, time.monotonic() - self.last_contact)
                        break
        finally:
            channel.close()


def _init_distributed(config: WorkerConfig) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device == "cuda":
        local = config.rank % (config.gpus_per_node or torch.cuda.device_count())
        torch.cuda.set_device(local)
    dist.init_process_group(config.backend, init_method=f"tcp://{config.master}",
                            rank=config.rank, world_size=config.world_size,
                            timeout=datetime.timedelta(seconds=config.collective_timeout))


def run_worker(config: WorkerConfig, stop: threading.Event | None = None,
               ready: threading.Event | None = None) -> WorkerResult:
    """Run one rank until ``max_steps`` or until any rank is asked to stop (``stop`` set, or
    :meth:`SwapCoordinator.request_stop`); all ranks stop at the same step. ``ready`` is set
    once the WorkerService endpoint is up. Creates and destroys the default process group."""
    stop = stop or threading.Event()
    plan = initial_plan(config, stop)
    _init_distributed(config)
    device = torch.device("cuda", torch.cuda.current_device()) if config.device == "cuda" \
        else torch.device("cpu")
    num_slots = int(plan.phy2log.shape[1]) if len(plan.phy2log.shape) == 2 else 0
    if config.hf_model:     # transformers is an optional dependency (the [hf] extra)
        from expertplane.engines.hf.serving import HFServedModel, moe_shape
        num_layers, num_experts = moe_shape(config.hf_model)
    else:
        num_layers, num_experts = config.model.num_layers, config.model.num_experts
    ident = WorkerIdentity(config.node, config.rank, config.world_size, config.placement,
                           num_layers, num_experts, num_slots)
    version, placements = placements_from_plan(plan, ident)
    swap_group = dist.new_group(backend=config.backend)
    if config.hf_model:
        model = stream = HFServedModel(
            config.hf_model, placements, tokens_per_step=config.stream.tokens_per_step,
            zipf=config.stream.zipf_exponent, drift_period=config.stream.drift_period,
            seed=config.stream.seed, rank=config.rank, gpus_per_node=config.gpus_per_node,
            device=device)
    else:
        model = SyntheticMoEModel(config.model, config.stream, placements,
                                  gpus_per_node=config.gpus_per_node, device=device)
        stream = TokenStream(config.model, config.stream, config.rank, device)
        for layer in model.layers:
            layer.capacity = config.capacity
    if model.pretune(config.world_size):
        log.info("rank %d: expert GEMMs tuned for up to %d tokens per step", config.rank,
                 config.stream.tokens_per_step)
    engine = HotSwapEngine(list(model.layers), group=swap_group,
                           gpus_per_node=config.gpus_per_node,
                           step_budget_bytes=config.swap_step_budget_bytes)
    coord = SwapCoordinator(engine, version)
    ledger = CounterLedger(num_layers, num_slots // config.world_size, version)

    pending_bias: list[np.ndarray] = []
    address = [config.listen_address()]
    link_stop = threading.Event()
    link: _AgentLink | None = None
    servicer = WorkerServicer(ident, coord, ledger, address=lambda: address[0],
                              on_bias=pending_bias.append,
                              on_pull=lambda: link.touched() if link else None,
                              max_wait=config.rollout_timeout)
    server, address[0] = serve_worker_service(servicer, address[0], config.local_security)
    log.info("rank %d/%d serving WorkerService on %s, plan v%d", config.rank,
             config.world_size, address[0], version)
    if config.agent:
        link = _AgentLink(config.agent, servicer.info, link_stop, config.local_security)
        link.start()
    if ready is not None:
        ready.set()

    steps = swaps = 0
    try:
        while True:
            if stop.is_set():
                coord.request_stop()
            before = coord.version
            if not coord.step_boundary():
                break
            if coord.version != before:
                swaps += 1
                log.info("rank %d: switched to plan v%d at step %d (%s)", config.rank,
                         coord.version, steps, coord.last_stats)
            while pending_bias:
                bias = torch.as_tensor(pending_bias.pop(0), dtype=torch.float32)
                if config.hf_model:
                    log.warning("rank %d: router bias ignored: %s routes with its own router",
                                config.rank, config.hf_model)
                    continue
                for l, layer in enumerate(model.layers):
                    layer.set_selection_bias(bias[l])
            verify = bool(config.verify_every) and steps % config.verify_every == 0
            result = model(stream.batch(steps), verify=verify)
            failed = verify and not result.max_error <= model.tolerance
            if failed:
                log.error("rank %d step %d: output differs from the dense reference (rel. error "
                          "%.3g > %.3g)", config.rank, steps, result.max_error, model.tolerance)
            dropped = torch.stack([layer.read_dropped() for layer in model.layers]).numpy() \
                if config.capacity is not None else None
            ledger.add(coord.version, model.read_counters().numpy(), failed, dropped)
            steps += 1
            if config.max_steps and steps >= config.max_steps:
                coord.request_stop()
            if config.step_interval:
                time.sleep(config.step_interval)
        if config.drain_seconds and (config.agent or servicer.pulled) \
                and not ledger.wait_delivered(config.drain_seconds):
            log.warning("rank %d: the counts of %d steps were not delivered within %.1f s of "
                        "stopping (--drain): lost unless the last pull's answer arrived",
                        config.rank, ledger.undelivered_steps, config.drain_seconds)
    except BaseException as exc:
        coord.close(f"serving loop failed: {exc}")
        raise
    finally:
        coord.close("worker stopped")
        link_stop.set()
        server.stop(grace=1.0).wait()
        dist.destroy_process_group()
    return WorkerResult(steps, ledger.total_failed, coord.version, swaps)
