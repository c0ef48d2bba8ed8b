"""Benchmark 'controller': load ingestion and rollout fan-out over loopback gRPC.

Ingest: synthetic agents in ``--processes`` separate processes open ``--streams`` ReportLoad
streams each and send LoadReports of ``--layers`` x ``--slots`` slot counts at a paced total rate
of ``--rate`` reports/s (open loop, at most ``--window`` un-acknowledged reports per stream),
timing every report from send to its ack. Baselines measured in the same run: the same load
against a bare gRPC LoadService that acknowledges without doing anything, on two servers (what
Python gRPC on this machine carries without the controller): a synchronous thread-pool server,
and a ``grpc.aio`` server whose ``ReportLoad`` is an async generator on its loop (the
controller's kind of server); and the controller's ``ingest`` called in-process (no gRPC). The
controller's rate is reported as ratios to both echoes.

Flood (``--flood SECONDS``): twice the agents at the same per-agent rate with up to
``--flood-window`` un-acked reports each; samples the controller's RSS and GetPlan latency.

Rollout: ``--workers`` simulated workers (``--gpus-per-node`` per agent stream, in a separate
process) hold RolloutService.Connect streams; a plan goes through prepare and commit to all of
them. Baseline: the same rollout to one agent of ``--gpus-per-node`` workers.

Catch-up: the same ``--workers`` connect on plan 1 while plan 2 is in force, and are timed from
the go signal (their streams opening, HELLO) until every one of them runs plan 2 and no sync
rollout is left. Rounds alternate between agents of the original rollout protocol (a sync, a
prepare with the whole plan and a commit per worker) and agents of protocol BATCHED (one of
each per agent), ``--rollouts`` rounds of each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def add_arguments(parser) -> None:
    parser.add_argument("--rate", type=float, default=5000.0, help="target reports/s in total")
    parser.add_argument("--seconds", type=float, default=8.0, help="ingest duration")
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--streams", type=int, default=4,
                        help="simulated agents (one ReportLoad stream each) per process")
    parser.add_argument("--window", type=int, default=8,
                        help="max un-acked reports per stream (one per worker of the agent)")
    parser.add_argument("--layers", type=int, default=58, help="MoE layers of the placements")
    parser.add_argument("--slots", type=int, default=9, help="slots per GPU")
    parser.add_argument("--experts", type=int, default=256, help="experts per layer")
    parser.add_argument("--ingest-gpus", type=int, default=32, help="GPUs of the ingest placement")
    parser.add_argument("--workers", type=int, default=1000, help="simulated workers for rollout")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per simulated node")
    parser.add_argument("--rollouts", type=int, default=5, help="rollouts timed (best and median)")
    parser.add_argument("--db", help="plan store URL (default: SQLite in a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--skip-rollout", action="store_true", help="do not time rollouts")
    parser.add_argument("--skip-ingest", action="store_true", help="do not time load ingestion")
    parser.add_argument("--flood", type=float, default=0.0, metavar="SECONDS",
                        help="also run twice the ingest load (twice the agents, each at the same "
                             "rate) for SECONDS, sampling the controller's RSS and GetPlan latency")
    parser.add_argument("--flood-window", type=int, default=64,
                        help="max un-acked reports per flood stream (the agent's max_in_flight)")
    parser.add_argument("--ingest-queue", type=int,
                        help="the controller's ingest gate (default: ControllerConfig's)")


# ---------------------------------------------------------------------------- ingest


def _report_prefixes(node: str, ranks: range, counts: np.ndarray, epoch: int) -> list[bytes]:
    """Serialized LoadReports of ``counts`` [L, S] for each rank, without sequence and
    window_end: a generator appends those per report (protobuf merges concatenated messages),
    so it never re-serializes the 58 x 9 counts."""
    from expertplane.benchmarks.simagent import load_report

    prefixes = []
    for rank in ranks:
        report = load_report(node, rank, "bench", 1, 0, counts, epoch=epoch)
        report.ClearField("window_end")
        prefixes.append(report.SerializeToString())
    return prefixes


def _generator(port: int, proc: int, streams: int, rate: float, seconds: float, window: int,
               layers: int, slots: int, gpus_per_node: int, nodes: int, out) -> None:
    """One load-generator process of ``streams`` simulated agents (grpc.aio, one ReportLoad
    stream each), paced at ``rate`` reports/s in total, at most ``window`` un-acked reports per
    stream. Agent ``i`` is node ``i % nodes`` with ``gpus_per_node`` workers whose reports it
    sends in turn, each with its own increasing sequence. All agents start sending at one
    instant ``t0`` and stop at ``t0 + seconds`` even if behind schedule; puts (latencies s, status counts, seconds from ``t0`` to the last ack) on
    ``out``."""
    import asyncio

    import grpc

    from expertplane.proto import expertplane_pb2 as pb

    counts = np.random.default_rng(proc).integers(0, 4096, (layers, slots))
    per_stream = rate / streams
    epoch = time.time_ns() // 1000     # a new agent epoch per run: sequences start again at 1

    async def agent(channel, i: int, t0: float, results: list) -> None:
        index = proc * streams + i
        node = index % nodes
        prefixes = _report_prefixes(f"bench-{index}", range(node * gpus_per_node,
                                                            (node + 1) * gpus_per_node),
                                    counts, epoch=epoch + index)
        call = channel.stream_stream("/expertplane.v1.LoadService/ReportLoad",
                                     request_serializer=bytes,
                                     response_deserializer=pb.LoadAck.FromString)(
            timeout=seconds + 120)
        credit = asyncio.Semaphore(window)
        sent: dict[tuple[int, int], float] = {}
        total, end = int(per_stream * seconds), t0 + seconds

        async def send() -> None:
            suffix = pb.LoadReport()
            for n in range(total):
                delay = t0 + n / per_stream - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await credit.acquire()
                if time.perf_counter() > end:      # behind schedule at the end: stop sending
                    credit.release()
                    break
                worker, seq = n % gpus_per_node, n // gpus_per_node + 1
                suffix.sequence = seq
                suffix.window_end.GetCurrentTime()
                sent[(node * gpus_per_node + worker, seq)] = time.perf_counter()
                await call.write(prefixes[worker] + suffix.SerializeToString())
            await call.done_writing()

        writer = asyncio.ensure_future(send())
        lat, status = [], {}
        async for ack in call:
            lat.append(time.perf_counter() - sent.pop((ack.worker_rank, ack.sequence)))
            status[ack.status] = status.get(ack.status, 0) + 1
            credit.release()
        await writer
        results.append((lat, status, time.perf_counter() - t0))

    async def main() -> list:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        results: list = []
        t0 = time.perf_counter() + 0.5
        await asyncio.gather(*(agent(channel, i, t0, results) for i in range(streams)))
        await channel.close()
        return results

    results = asyncio.run(main())
    lat = [x for r in results for x in r[0]]
    elapsed = max(r[2] for r in results)
    status: dict = {}
    for _, st, _ in results:
        for k, v in st.items():
            status[k] = status.get(k, 0) + v
    out.put((lat, status, elapsed))


def _ingest_spec(args):
    from expertplane.controller.spec import PlacementSpec, PolicySpec

    return PlacementSpec(name="bench", num_layers=args.layers, num_experts=args.experts,
                         num_nodes=max(1, args.ingest_gpus // args.gpus_per_node),
                         gpus_per_node=min(args.gpus_per_node, args.ingest_gpus),
                         num_replicas=args.slots * args.ingest_gpus, num_groups=8,
                         policy=PolicySpec(mode="manual", window_seconds=600))


def _echo_ack(report):
    """The acknowledgement an echo server sends for ``report``: ACCEPTED, nothing looked at."""
    from expertplane.proto import expertplane_pb2 as pb

    return pb.LoadAck(node=report.node, worker_rank=report.worker_rank, sequence=report.sequence,
                      status=pb.LoadAck.ACCEPTED)


class _EchoLoad:
    """Transport baseline on the synchronous thread-pool server: a LoadService that acknowledges
    every report without looking (a handler thread per stream)."""

    def ReportLoad(self, request_iterator, context):
        for r in request_iterator:
            yield _echo_ack(r)


class _AioEchoLoad:
    """Transport baseline on a ``grpc.aio`` server, the controller's kind: ``ReportLoad`` is an
    async generator on the server's loop, as the controller's is."""

    async def ReportLoad(self, request_iterator, context):
        async for r in request_iterator:
            yield _echo_ack(r)


def _drive(port: int, args, nodes: int) -> dict:
    """Run the load generators against ``port``; latency and rate figures."""
    from expertplane.proto import expertplane_pb2 as pb

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_generator, args=(
        port, p, args.streams, args.rate / args.processes, args.seconds, args.window,
        args.layers, args.slots, args.gpus_per_node, nodes, out)) for p in range(args.processes)]
    for p in procs:
        p.start()
    parts = [out.get(timeout=args.seconds + 300) for _ in procs]
    for p in procs:
        p.join()
    lat = np.array([x for part in parts for x in part[0]])
    status: dict = {}
    for part in parts:
        for k, v in part[1].items():
            status[pb.LoadAck.Status.Name(k)] = status.get(pb.LoadAck.Status.Name(k), 0) + v
    elapsed = max(part[2] for part in parts)
    return {"reports": int(len(lat)), "rate": len(lat) / elapsed, "status": status,
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "max_ms": float(lat.max() * 1e3)}


@contextlib.contextmanager
def _sync_echo_server():
    """A synchronous thread-pool server (64 threads) of ``_EchoLoad`` on loopback; yields its port."""
    from expertplane.proto import expertplane_pb2_grpc as pb_grpc
    from expertplane.rpc.channels import make_server

    server = make_server(max_workers=64)
    pb_grpc.add_LoadServiceServicer_to_server(_EchoLoad(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(1).wait()


@contextlib.contextmanager
def _aio_echo_server():
    """A ``grpc.aio`` server of ``_AioEchoLoad`` on its own event-loop thread (as the controller
    runs its server), built by ``make_aio_server`` with the controller's options; yields its port."""
    from expertplane.proto import expertplane_pb2_grpc as pb_grpc
    from expertplane.rpc.channels import aio_server_thread

    with aio_server_thread(lambda server: pb_grpc.add_LoadServiceServicer_to_server(
            _AioEchoLoad(), server), "127.0.0.1:0", max_concurrent_rpcs=4096) as port:
        yield port


def bench_echo(args, echo_server) -> dict:
    """The same load against a bare LoadService that does no work (transport baseline), served
    by ``echo_server`` (``_sync_echo_server`` or ``_aio_echo_server``)."""
    with echo_server() as port:
        return _drive(port, args, _ingest_spec(args).num_nodes)


def bench_ingest(server, args) -> dict:
    from expertplane.benchmarks.simagent import load_report

    c = server.controller
    spec = _ingest_spec(args)
    c.apply_placement(spec)
    # baseline: in-process ingest of the same messages
    counts = np.random.default_rng(0).integers(0, 4096, (args.layers, args.slots))
    msgs = [load_report("base", r % spec.num_gpus, "bench", 1, r + 1, counts, epoch=999)
            for r in range(20000)]
    t0 = time.perf_counter()
    for m in msgs:
        c.ingest(m)
    base_rate = len(msgs) / (time.perf_counter() - t0)

    res = _drive(server.port, args, spec.num_nodes)
    rate = res["rate"]
    return {
        "reports": res["reports"], "target_rate": args.rate, "achieved_rate": rate,
        "accepted": res["status"].get("ACCEPTED", 0), "status": res["status"],
        "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"], "max_ms": res["max_ms"],
        "baseline_inprocess_rate": base_rate, "ratio_to_inprocess": rate / base_rate,
        "meets_target": bool(rate >= 0.98 * args.rate and res["p99_ms"] < 50
                             and res["status"].get("ACCEPTED", 0) == res["reports"]),
    }


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sample(stop: threading.Event, every: float, probe, out: list) -> None:
    """Append (seconds since start, probe()) to ``out`` every ``every`` seconds until ``stop``."""
    t0 = time.perf_counter()
    while not stop.wait(every):
        out.append((time.perf_counter() - t0, probe()))


def _timed_get_plan(stub, placement: str):
    """One GetPlan with a 1 s deadline: (latency s, status code name)."""
    import grpc

    from expertplane.proto import expertplane_pb2 as pb

    t0 = time.perf_counter()
    try:
        stub.GetPlan(pb.GetPlanRequest(placement=placement), timeout=1.0)
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name
    return time.perf_counter() - t0, code


def bench_flood(server, args) -> dict:
    """Twice the ingest load for ``--flood`` seconds: twice the agents at the same per-agent
    rate, each with up to ``--flood-window`` un-acked reports (offered load beyond what the
    controller can take). Samples the controller process's RSS every 0.5 s and times GetPlan
    calls (1 s deadline) made throughout."""
    from expertplane.proto import expertplane_pb2_grpc as pb_grpc
    from expertplane.rpc.channels import make_channel

    flood = argparse.Namespace(**{**vars(args), "streams": 2 * args.streams, "rate": 2 * args.rate,
                                  "seconds": args.flood, "window": args.flood_window})
    stop = threading.Event()
    rss: list = [(0.0, _rss_bytes())]
    queries: list = []
    channel = make_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.PlanServiceStub(channel)
    threads = [threading.Thread(target=_sample, args=(stop, 0.5, _rss_bytes, rss)),
               threading.Thread(target=_sample, args=(stop, 0.1, lambda: _timed_get_plan(
                   stub, "bench"), queries))]
    for t in threads:
        t.start()
    try:
        res = _drive(server.port, flood, _ingest_spec(args).num_nodes)
    finally:
        stop.set()
        for t in threads:
            t.join()
        channel.close()
    mib = np.array([v for _, v in rss]) / 2 ** 20
    half = len(mib) // 2
    lat = np.array([q[1][0] for q in queries])
    codes: dict = {}
    for _, (_, code) in queries:
        codes[code] = codes.get(code, 0) + 1
    return {**res, "offered_rate": flood.rate, "agents": flood.streams * args.processes,
            "window": flood.window, "ingest_queue": server.config.ingest_queue,
            "rss_mib": {"start": float(mib[0]), "max_first_half": float(mib[:half].max()),
                        "max_second_half": float(mib[half:].max()), "end": float(mib[-1]),
                        "samples": [round(float(x), 1) for x in mib]},
            "get_plan": {"calls": len(queries), "codes": codes,
                         "p50_ms": float(np.percentile(lat, 50) * 1e3),
                         "p99_ms": float(np.percentile(lat, 99) * 1e3),
                         "max_ms": float(lat.max() * 1e3)},
            "window_state": server.controller.placements.require("bench").window.sizes()}


# ---------------------------------------------------------------------------- rollout


def _catchup_agents(port: int, placement: str, nodes: int, per_node: int, protocol: int,
                    commands, answers) -> None:
    """Process of ``nodes`` simulated agents of ``protocol`` on plan 1: each "go" on
    ``commands`` connects a fresh set, each "stop" disconnects it (answered "stopped"); None
    ends."""
    from expertplane.benchmarks.simagent import SimulatedAgent
    from expertplane.rpc.channels import make_channel

    channels = [make_channel(f"127.0.0.1:{port}") for _ in range(4)]
    while commands.get() == "go":
        agents = [SimulatedAgent(channels[n % 4], f"node-{n}", placement,
                                 range(n * per_node, (n + 1) * per_node), plan_version=1,
                                 protocol=protocol).start() for n in range(nodes)]
        commands.get()
        for a in agents:
            a.stop()
        answers.put("stopped")


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not reached in {timeout:g} s")
        time.sleep(0.01)


def _time_catchup(server, gpus: int, args) -> dict:
    """Median and best seconds for ``gpus`` workers on plan 1 to reach plan 2, per protocol."""
    from expertplane.controller.convert import plan_message
    from expertplane.controller.store import PlanRecord, utcnow
    from expertplane.proto import expertplane_pb2 as pb

    c, name = server.controller, "catchup"
    spec = _rollout_spec(name, gpus, args)
    c.apply_placement(spec)
    base = c.get_plan(name, 1)
    rec = PlanRecord(**{**base.__dict__, "version": 0, "reason": "api", "previous_version": 1,
                        "created_at": utcnow(), "phy2log": np.roll(base.phy2log, 1, axis=1)})
    c.rollouts.start(name, plan_message(c.store.add_plan(rec), with_load=False), 1, gpus)
    target = c.placement_view(name).stored.plan_version       # in force: nobody to switch
    ctx = mp.get_context("spawn")
    protocols = {"original": pb.ROLLOUT_PROTOCOL_ORIGINAL, "batched": pb.ROLLOUT_PROTOCOL_BATCHED}
    procs, times = {}, {label: [] for label in protocols}
    try:
        for label, protocol in protocols.items():
            commands, answers = ctx.Queue(), ctx.Queue()
            proc = ctx.Process(target=_catchup_agents, args=(
                server.port, name, spec.num_nodes, spec.gpus_per_node, protocol, commands, answers))
            proc.start()
            procs[label] = (proc, commands, answers)

        def caught_up() -> bool:
            ws = c.rollouts.workers(name)
            return len(ws) == gpus and all(w.plan_version == target for w in ws.values()) \
                and not c.rollouts.active_ids()

        for _ in range(args.rollouts):
            for label, (proc, commands, answers) in procs.items():
                t0 = time.perf_counter()
                commands.put("go")
                _wait_until(caught_up, 120, f"catch-up of {gpus} {label} workers")
                times[label].append(time.perf_counter() - t0)
                commands.put("stop")
                answers.get(timeout=60)
                _wait_until(lambda: not c.rollouts.workers(name), 60, "agents disconnected")
    finally:
        for proc, commands, _ in procs.values():
            commands.put(None)
            proc.join(30)
    syncs = [r for r in c.store.list_rollouts(name, 10 ** 6) if r.sync]
    if any(r.state != "committed" or r.reason for r in syncs):
        raise RuntimeError(f"a catch-up sync did not commit cleanly: {syncs[0].reason}")
    out = {label: {"median_s": float(np.median(t)), "best_s": min(t)} for label, t in times.items()}
    out["syncs"] = len(syncs)
    out["ratio_median_original_to_batched"] = out["original"]["median_s"] / out["batched"]["median_s"]
    return out


def _agents(port: int, placement: str, nodes: int, per_node: int, ready, stop) -> None:
    """Process holding ``nodes`` simulated agents of ``per_node`` workers each."""
    from expertplane.benchmarks.simagent import SimulatedAgent
    from expertplane.rpc.channels import make_channel

    channels = [make_channel(f"127.0.0.1:{port}") for _ in range(4)]
    agents = [SimulatedAgent(channels[n % 4], f"node-{n}", placement,
                             range(n * per_node, (n + 1) * per_node), plan_version=1).start()
              for n in range(nodes)]
    ready.set()
    stop.wait()
    for a in agents:
        a.stop()


def _rollout_spec(name: str, gpus: int, args):
    from expertplane.controller.spec import PlacementSpec, PolicySpec

    per_node = min(args.gpus_per_node, gpus)
    return PlacementSpec(name=name, num_layers=args.layers, num_experts=args.experts,
                         num_nodes=gpus // per_node, gpus_per_node=per_node,
                         num_replicas=max(args.experts, gpus) // gpus * gpus
                         + (gpus if max(args.experts, gpus) % gpus else 0),
                         num_groups=8, policy=PolicySpec(mode="manual"))


def _time_rollouts(server, name: str, gpus: int, args) -> dict:
    from expertplane.controller.convert import plan_message
    from expertplane.controller.store import PlanRecord, utcnow

    c = server.controller
    spec = _rollout_spec(name, gpus, args)
    c.apply_placement(spec)
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_agents, args=(server.port, name, spec.num_nodes,
                                             spec.gpus_per_node, ready, stop))
    proc.start()
    try:
        ready.wait(120)
        deadline = time.monotonic() + 120
        while len(c.rollouts.workers(name)) < gpus and time.monotonic() < deadline:
            time.sleep(0.05)
        times, prepare, commit = [], [], []
        base = c.get_plan(name, 1)
        for i in range(args.rollouts):
            cur = c.placement_view(name).stored.plan_version
            rec = PlanRecord(**{**base.__dict__, "version": 0, "reason": "api",
                                "previous_version": cur, "created_at": utcnow(),
                                "phy2log": np.roll(base.phy2log, i + 1, axis=1)})
            msg = plan_message(c.store.add_plan(rec), with_load=False)
            t0 = time.perf_counter()
            started = c.rollouts.start(name, msg, cur, gpus)
            if not c.rollouts.wait(started.id, 60):
                raise RuntimeError(f"rollout to {gpus} workers did not finish in 60 s")
            times.append(time.perf_counter() - t0)
            [done] = [r for r in c.store.list_rollouts(name, 5) if r.id == started.id]
            if done.state != "committed" or done.reason:
                raise RuntimeError(f"rollout ended {done.state}: {done.reason}")
            prepare.append(done.prepare_seconds)
            commit.append(done.commit_seconds)
    finally:
        stop.set()
        proc.join(30)
    return {"workers": gpus, "agents": spec.num_nodes, "best_s": min(times),
            "median_s": float(np.median(times)), "prepare_median_s": float(np.median(prepare)),
            "commit_median_s": float(np.median(commit)),
            "plan_bytes": len(msg.SerializeToString())}


def bench_rollout(server, args) -> dict:
    base = _time_rollouts(server, "rollout-base", args.gpus_per_node, args)
    big = _time_rollouts(server, "rollout-big", args.workers, args)
    return {"baseline": base, "fanout": big, "ratio_median_to_baseline": big["median_s"] / base["median_s"],
            "meets_target": big["median_s"] < 1.0, "catchup": _time_catchup(server, args.workers, args),
            "load_average": os.getloadavg()}


# ---------------------------------------------------------------------------- entry point


def _print_load(label: str, rate: float, res: dict) -> None:
    """One line of a load run's results: ``rate`` reports/s answered, latency percentiles
    (``res``: p50_ms, p99_ms, max_ms) and the acknowledgement statuses."""
    print(f"{label}: {rate:.0f}/s answered, p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} "
          f"ms, max {res['max_ms']:.1f} ms; statuses {res['status']}")


def run(args) -> int:
    from expertplane.controller.config import ControllerConfig
    from expertplane.controller.server import ControllerServer

    tmp = tempfile.TemporaryDirectory()
    db = args.db or f"sqlite:///{tmp.name}/bench.db"
    gate = {} if args.ingest_queue is None else {"ingest_queue": args.ingest_queue}
    server = ControllerServer(ControllerConfig(
        listen="127.0.0.1:0", db_url=db, max_workers=max(64, args.workers // args.gpus_per_node + 32),
        max_concurrent_rpcs=4096, policy_interval_seconds=3600, snapshot_interval_seconds=3600,
        rollout_timeout_seconds=60, **gate))
    server.start()
    results: dict = {"db": db.split("///")[0] + "///..." if db.startswith("sqlite") else db}
    try:
        if not args.skip_ingest:
            results["echo"] = echo = bench_echo(args, _sync_echo_server)
            _print_load("baseline bare echo, sync thread-pool server", echo["rate"], echo)
            results["echo_aio"] = echo_aio = bench_echo(args, _aio_echo_server)
            _print_load("baseline bare echo, grpc.aio server", echo_aio["rate"], echo_aio)
            results["ingest"] = ing = bench_ingest(server, args)
            ing["ratio_to_echo"] = ing["achieved_rate"] / echo["rate"]
            ing["ratio_to_aio_echo"] = ing["achieved_rate"] / echo_aio["rate"]
            _print_load(f"ingest ({ing['reports']} reports of {args.layers}x{args.slots} slots, "
                        f"target {args.rate:.0f}/s)", ing["achieved_rate"], ing)
            print(f"  = {ing['ratio_to_echo']:.2f}x the sync echo, {ing['ratio_to_aio_echo']:.2f}x "
                  f"the aio echo; in-process ingest alone {ing['baseline_inprocess_rate']:.0f}/s; "
                  f"target met: {ing['meets_target']}")
        if args.flood:
            if args.skip_ingest:
                server.controller.apply_placement(_ingest_spec(args))
            results["flood"] = fl = bench_flood(server, args)
            r, q = fl["rss_mib"], fl["get_plan"]
            _print_load(f"flood ({fl['agents']} agents offering {fl['offered_rate']:.0f}/s, <= "
                        f"{fl['window']} un-acked each, ingest gate {fl['ingest_queue']}, "
                        f"{args.flood:.0f} s)", fl["rate"], fl)
            print(f"  controller RSS MiB: start {r['start']:.0f}, max first half "
                  f"{r['max_first_half']:.0f}, max second half {r['max_second_half']:.0f}, end "
                  f"{r['end']:.0f}; GetPlan during the flood: {q['calls']} calls {q['codes']}, "
                  f"p50 {q['p50_ms']:.1f} ms, p99 {q['p99_ms']:.1f} ms, max {q['max_ms']:.0f} ms; "
                  f"window state {fl['window_state']}")
        if not args.skip_rollout:
            results["rollout"] = ro = bench_rollout(server, args)
            b, f = ro["baseline"], ro["fanout"]
            print(f"rollout: {f['workers']} workers on {f['agents']} agent streams: median "
                  f"{f['median_s'] * 1e3:.0f} ms (best {f['best_s'] * 1e3:.0f} ms; prepare "
                  f"{f['prepare_median_s'] * 1e3:.0f} ms, commit {f['commit_median_s'] * 1e3:.0f} ms; "
                  f"plan message {f['plan_bytes'] / 1e3:.0f} kB)")
            print(f"  baseline {b['workers']} workers: median {b['median_s'] * 1e3:.1f} ms; ratio "
                  f"{ro['ratio_median_to_baseline']:.1f}x; target (< 1 s) met: {ro['meets_target']}")
            cu = ro["catchup"]
            print(f"catch-up of {f['workers']} workers on plan 1 to the plan in force "
                  f"({f['agents']} agents, {args.rollouts} alternating rounds each): original "
                  f"protocol median {cu['original']['median_s'] * 1e3:.0f} ms (best "
                  f"{cu['original']['best_s'] * 1e3:.0f}), batched median "
                  f"{cu['batched']['median_s'] * 1e3:.0f} ms (best {cu['batched']['best_s'] * 1e3:.0f}); "
                  f"ratio {cu['ratio_median_original_to_batched']:.1f}x; {cu['syncs']} sync rollouts "
                  f"recorded; load average {', '.join(f'{x:.1f}' for x in ro['load_average'])}")
    finally:
        server.stop(1)
        tmp.cleanup()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0
