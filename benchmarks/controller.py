"""Benchmark 'controller': load ingestion and rollout fan-out over loopback gRPC.

Ingest: synthetic agents in ``--processes`` separate processes open ``--streams`` ReportLoad
streams each and send LoadReports of ``--layers`` x ``--slots`` slot counts at a paced total rate
of ``--rate`` reports/s (open loop, at most ``--window`` un-acknowledged reports per stream),
timing every report from send to its ack. Baselines measured in the same run: the same load
against a bare gRPC LoadService that acknowledges without doing anything (what Python gRPC on
this machine can carry), and the controller's ``ingest`` called in-process (no gRPC).

Rollout: ``--workers`` simulated workers (``--gpus-per-node`` per agent stream, in a separate
process) hold RolloutService.Connect streams; a plan goes through prepare and commit to all of
them. Baseline: the same rollout to one agent of ``--gpus-per-node`` workers.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def add_arguments(parser) -> None:
    parser.add_argument("--rate", type=float, default=5000.0, help="target reports/s in total")
    parser.add_argument("--seconds", type=float, default=8.0, help="ingest duration")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--streams", type=int, default=2, help="ReportLoad streams per process")
    parser.add_argument("--window", type=int, default=256, help="max un-acked reports per stream")
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--slots", type=int, default=9, help="slots per GPU")
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--ingest-gpus", type=int, default=32, help="GPUs of the ingest placement")
    parser.add_argument("--workers", type=int, default=1000, help="simulated workers for rollout")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--rollouts", type=int, default=5, help="rollouts timed (best and median)")
    parser.add_argument("--db", help="plan store URL (default: SQLite in a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--skip-rollout", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true")


# ---------------------------------------------------------------------------- ingest


def _generator(port: int, proc: int, streams: int, rate: float, seconds: float, window: int,
               layers: int, slots: int, gpus: int, out) -> None:
    """One load-generator process: ``streams`` paced ReportLoad streams; puts
    (latencies seconds, status counts) on ``out``."""
    from expertplane.controller.simagent import load_report
    from expertplane.proto import expertplane_pb2_grpc as pb_grpc
    from expertplane.rpc.channels import make_channel

    rng = np.random.default_rng(proc)
    counts = rng.integers(0, 4096, (layers, slots))
    per_stream = rate / streams
    results: list = []

    def stream(i: int) -> None:
        channel = make_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.LoadServiceStub(channel)
        rank = (proc * streams + i) % gpus
        template = load_report(f"bench-{proc}-{i}", rank, "bench", 1, 0, counts,
                               epoch=proc * 1000 + i + 1)
        sent: dict[int, float] = {}
        credit = threading.Semaphore(window)
        total = int(per_stream * seconds)
        t0 = time.perf_counter() + 0.2

        def requests():
            for seq in range(1, total + 1):
                due = t0 + seq / per_stream
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                credit.acquire()
                template.sequence = seq
                template.window_end.GetCurrentTime()
                sent[seq] = time.perf_counter()
                yield template

        lat, status = [], {}
        for ack in stub.ReportLoad(requests(), timeout=seconds + 120):
            lat.append(time.perf_counter() - sent.pop(ack.sequence))
            status[ack.status] = status.get(ack.status, 0) + 1
            credit.release()
        results.append((lat, status))
        channel.close()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    lat = [x for r in results for x in r[0]]
    status: dict = {}
    for _, st in results:
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


class _EchoLoad:
    """The transport baseline: a LoadService that acknowledges every report without looking."""

    def ReportLoad(self, request_iterator, context):
        from expertplane.proto import expertplane_pb2 as pb

        for r in request_iterator:
            yield pb.LoadAck(node=r.node, worker_rank=r.worker_rank, sequence=r.sequence,
                             status=pb.LoadAck.ACCEPTED)


def _drive(port: int, args, gpus: int) -> dict:
    """Run the load generators against ``port``; latency and rate figures."""
    from expertplane.proto import expertplane_pb2 as pb

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_generator, args=(
        port, p, args.streams, args.rate / args.processes, args.seconds, args.window,
        args.layers, args.slots, gpus, out)) for p in range(args.processes)]
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


def bench_echo(args) -> dict:
    """The same load against a bare gRPC LoadService that does no work (transport baseline)."""
    from expertplane.proto import expertplane_pb2_grpc as pb_grpc
    from expertplane.rpc.channels import make_server

    server = make_server(max_workers=64)
    pb_grpc.add_LoadServiceServicer_to_server(_EchoLoad(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        return _drive(port, args, args.ingest_gpus)
    finally:
        server.stop(1).wait()


def bench_ingest(server, args) -> dict:
    from expertplane.controller.simagent import load_report

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

    res = _drive(server.port, args, spec.num_gpus)
    rate = res["rate"]
    return {
        "reports": res["reports"], "target_rate": args.rate, "achieved_rate": rate,
        "accepted": res["status"].get("ACCEPTED", 0), "status": res["status"],
        "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"], "max_ms": res["max_ms"],
        "baseline_inprocess_rate": base_rate, "ratio_to_inprocess": rate / base_rate,
        "meets_target": bool(rate >= 0.98 * args.rate and res["p99_ms"] < 50
                             and res["status"].get("ACCEPTED", 0) == res["reports"]),
    }


# ---------------------------------------------------------------------------- rollout


def _agents(port: int, placement: str, nodes: int, per_node: int, ready, stop) -> None:
    """Process holding ``nodes`` simulated agents of ``per_node`` workers each."""
    from expertplane.controller.simagent import SimulatedAgent
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
            "meets_target": big["median_s"] < 1.0}


# ---------------------------------------------------------------------------- entry point


def run(args) -> int:
    from expertplane.controller.config import ControllerConfig
    from expertplane.controller.server import ControllerServer

    tmp = tempfile.TemporaryDirectory()
    db = args.db or f"sqlite:///{tmp.name}/bench.db"
    server = ControllerServer(ControllerConfig(
        listen="127.0.0.1:0", db_url=db, max_workers=max(64, args.workers // args.gpus_per_node + 32),
        max_concurrent_rpcs=4096, ingest_queue=4096, policy_interval_seconds=3600,
        snapshot_interval_seconds=3600, rollout_timeout_seconds=60))
    server.start()
    results: dict = {"db": db.split("///")[0] + "///..." if db.startswith("sqlite") else db}
    try:
        if not args.skip_ingest:
            results["echo"] = echo = bench_echo(args)
            print(f"baseline bare gRPC echo: {echo['rate']:.0f}/s (target {args.rate:.0f}/s), p50 "
                  f"{echo['p50_ms']:.2f} ms, p99 {echo['p99_ms']:.2f} ms")
            results["ingest"] = ing = bench_ingest(server, args)
            ing["ratio_to_echo"] = ing["achieved_rate"] / echo["rate"]
            print(f"ingest: {ing['reports']} reports of {args.layers}x{args.slots} slots, "
                  f"{ing['achieved_rate']:.0f}/s (target {args.rate:.0f}/s), p50 "
                  f"{ing['p50_ms']:.2f} ms, p99 {ing['p99_ms']:.2f} ms, max {ing['max_ms']:.1f} ms; "
                  f"statuses {ing['status']}")
            print(f"  = {ing['ratio_to_echo']:.2f}x the bare echo; in-process ingest alone "
                  f"{ing['baseline_inprocess_rate']:.0f}/s; target met: {ing['meets_target']}")
        if not args.skip_rollout:
            results["rollout"] = ro = bench_rollout(server, args)
            b, f = ro["baseline"], ro["fanout"]
            print(f"rollout: {f['workers']} workers on {f['agents']} agent streams: median "
                  f"{f['median_s'] * 1e3:.0f} ms (best {f['best_s'] * 1e3:.0f} ms; prepare "
                  f"{f['prepare_median_s'] * 1e3:.0f} ms, commit {f['commit_median_s'] * 1e3:.0f} ms; "
                  f"plan message {f['plan_bytes'] / 1e3:.0f} kB)")
            print(f"  baseline {b['workers']} workers: median {b['median_s'] * 1e3:.1f} ms; ratio "
                  f"{ro['ratio_median_to_baseline']:.1f}x; target (< 1 s) met: {ro['meets_target']}")
    finally:
        server.stop(1)
        tmp.cleanup()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0
