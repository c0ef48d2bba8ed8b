"""Benchmark 'coldstart': the first plan of a fresh process, with and without numba's cache.

Every measurement runs in a fresh Python process, at DeepSeek-V3 scale (58 layers x 256 experts
in 8 groups, 288 slots on 4 nodes x 8 GPUs, Zipf(1.2) load):

* ``planner``: per algorithm, the first ``rebalance_experts`` call and the first movement-aware
  call (``previous=``) after it; the import of the planner is timed apart;
* ``controller``: ``expertplane controller`` started fresh: seconds until it serves, then the
  first RPC (ApplyPlacement of ``examples/placements/deepseek-v3.yaml``, which computes the
  initial plan), then the first movement-aware ComputePlan on a new load;
* ``warm``: the time of ``expertplane warm`` (what ``make setup`` runs) into an empty cache.

Each is measured twice: with an EMPTY cache (``NUMBA_CACHE_DIR`` = a new empty folder per
process: the first plan starts the kernels' build in a background process and is computed by
the numpy path where the algorithm has one; the movement-aware call waits for the build) and
with the cache ``expertplane warm`` filled (the state after ``make setup`` or in the Docker
image). The processes run in the default kernel mode (``EXPERTPLANE_PLANNER_KERNELS`` unset).
The load average before and after each measurement is recorded: on a shared machine it scales
every figure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ALGORITHMS = ("deepseek", "balanced", "topology")
TARGET_SECONDS = 3.0
REPO = Path(__file__).resolve().parent.parent

_PLANNER = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    import numpy as np
    from expertplane.planner import rebalance_experts
    t1 = time.perf_counter()
    w = np.random.default_rng(0).zipf(1.2, (58, 256)).astype(np.float64)
    a = time.perf_counter()
    p, _, _ = rebalance_experts(w, 288, 8, 4, 32, algorithm=sys.argv[1])
    b = time.perf_counter()
    from expertplane.planner.compiled import build
    built_apart = build.pid is not None
    drifted = w * np.exp(np.random.default_rng(1).normal(0.0, 0.3, w.shape))
    rebalance_experts(drifted, 288, 8, 4, 32, algorithm=sys.argv[1], previous=p.numpy())
    c = time.perf_counter()
    from expertplane.planner.compiled import wait_compiled
    wait_compiled("the benchmark")   # the build ends here, not during the next measurement
    built = time.perf_counter() - a if built_apart else 0.0
    from numba.core.dispatcher import Dispatcher
    compiled = sum(sum(obj.stats.cache_misses.values())
                   for name, module in list(sys.modules.items()) if name.startswith("expertplane.")
                   for obj in vars(module).values() if isinstance(obj, Dispatcher))
    print(json.dumps({"import": t1 - t0, "first": b - a, "movement_first": c - b,
                      "built": built,
                      "compiled": f"{compiled} here" + (", build apart" if built_apart else "")}))
""")

_CONTROLLER = textwrap.dedent("""
    import json, os, re, subprocess, sys, time
    import numpy as np
    from expertplane.controller.placement_files import read_placement_files
    from expertplane.proto import expertplane_pb2 as pb, expertplane_pb2_grpc as pb_grpc
    from expertplane.rpc.channels import make_channel
    from expertplane.rpc.tensors import double_tensor
    port, db, placement_file = sys.argv[1], sys.argv[2], sys.argv[3]
    placement = read_placement_files(placement_file).placements[0]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "expertplane.cli.main", "--log-level",
                             "WARNING", "controller", "--listen", f"127.0.0.1:{port}", "--db", db],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving on port" in line, (line, proc.stderr.read())
        serving = time.perf_counter() - start
        channel = make_channel(f"127.0.0.1:{port}")
        plans, planning = pb_grpc.PlanServiceStub(channel), pb_grpc.PlanningServiceStub(channel)
        a = time.perf_counter()
        plans.ApplyPlacement(placement, timeout=600)
        b = time.perf_counter()
        load = np.random.default_rng(0).zipf(1.2, (58, 256)).astype(np.float64)
        planning.ComputePlan(pb.ComputePlanRequest(placement=placement.name,
                                                   load=double_tensor(load)), timeout=600)
        c = time.perf_counter()
        name = placement.name
        calls = {
            "ListPlacements": lambda: plans.ListPlacements(pb.ListPlacementsRequest(), timeout=60),
            "GetPlan": lambda: plans.GetPlan(pb.GetPlanRequest(placement=name), timeout=60),
            "ListPlans": lambda: plans.ListPlans(pb.ListPlansRequest(placement=name), timeout=60),
            "GetLoad": lambda: plans.GetLoad(pb.GetLoadRequest(placement=name), timeout=60),
            "ListRollouts": lambda: plans.ListRollouts(pb.ListRolloutsRequest(placement=name),
                                                       timeout=60),
            "ApplyPlacement (update)": lambda: plans.ApplyPlacement(placement, timeout=600),
            "ComputePlan (movement-aware)": lambda: planning.ComputePlan(pb.ComputePlanRequest(
                placement=name, load=double_tensor(load)), timeout=600),
            "TriggerRebalance (dry run)": lambda: planning.TriggerRebalance(
                pb.TriggerRebalanceRequest(placement=name, dry_run=True, force=True), timeout=600),
        }
        rpc_ms = {}
        for label, call in calls.items():
            times = []
            for _ in range(5):
                t = time.perf_counter()
                call()
                times.append((time.perf_counter() - t) * 1e3)
            rpc_ms[label] = sorted(times)[2]
        t = time.perf_counter()
        plans.DeletePlacement(pb.DeletePlacementRequest(placement=name), timeout=60)
        rpc_ms["DeletePlacement"] = (time.perf_counter() - t) * 1e3
        channel.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    build = re.search(r"building them in the background \\(pid (\\d+)", err)
    alive = lambda: build and os.path.exists(f"/proc/{build.group(1)}")
    while alive() and time.perf_counter() - a < 1800:
        time.sleep(1.0)   # the controller's build ends here, not during the next measurement
    built = time.perf_counter() - a if build else 0.0
    print(json.dumps({"serving": serving, "first_rpc": b - a, "movement_first": c - b,
                      "built": built,
                      "notice": "building them in the background" in err, "rpc_ms": rpc_ms}))
""")


@dataclass(frozen=True)
class Row:
    """One fresh-process measurement (seconds); ``load_before``/``load_after``: 1-min load
    average around it; ``compiled``: kernels numba compiled (cache misses) in the planner
    process and whether it started the background build, or for the controller whether it
    logged that build."""

    what: str
    cache: str
    first: float
    second: float
    setup: float
    load_before: float
    load_after: float
    compiled: int | str = "-"
    rpc_ms: dict | None = None
    built: float = 0.0


def add_arguments(parser) -> None:
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS),
                        metavar="ALG", help="planner algorithms to time (default: all three)")
    parser.add_argument("--skip-empty", action="store_true",
                        help="time only the warmed cache (the empty-cache runs take minutes)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


def _python(code: str, args: list[str], cache: Path) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    env.pop("EXPERTPLANE_NUMBA_CACHE_SEED", None)
    env.pop("EXPERTPLANE_PLANNER_KERNELS", None)
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                         text=True, timeout=1800, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"benchmark process failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(what: str, cache_label: str, cache: Path, tmp: Path) -> Row:
    before = os.getloadavg()[0]
    if what == "controller":
        db = f"sqlite:///{tmp / f'c-{cache_label}.db'}"
        r = _python(_CONTROLLER, [str(_free_port()), db,
                                  str(REPO / "examples" / "placements" / "deepseek-v3.yaml")], cache)
        return Row(what, cache_label, r["first_rpc"], r["movement_first"], r["serving"], before,
                   os.getloadavg()[0], "build apart" if r["notice"] else "none", r["rpc_ms"],
                   r["built"])
    r = _python(_PLANNER, [what], cache)
    return Row(f"planner {what}", cache_label, r["first"], r["movement_first"], r["import"],
               before, os.getloadavg()[0], r["compiled"], built=r["built"])


def _warm(cache: Path) -> float:
    start = time.perf_counter()
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    subprocess.run([sys.executable, "-m", "expertplane.cli.main", "--log-level", "WARNING",
                    "warm"], env=env, check=True, capture_output=True, timeout=3600)
    return time.perf_counter() - start


def print_table(rows: list[Row], warm_seconds: float) -> None:
    """A markdown table (readable piped or pasted)."""
    print(f"| measured (fresh process) | cache | first call / first RPC | first movement-aware "
          f"| import / start to serving | first <= {TARGET_SECONDS:g} s? | kernels compiled "
          f"| background build done after | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        met = "yes" if r.first <= TARGET_SECONDS else "no"
        built = f"{r.built:.0f} s" if r.built else "-"
        print(f"| {r.what} | {r.cache} | {r.first:.2f} s | {r.second:.2f} s | {r.setup:.2f} s "
              f"| {met} | {r.compiled} | {built} | {r.load_before:.1f} → {r.load_after:.1f} |")
    print(f"\n`expertplane warm` into an empty cache: {warm_seconds:.1f} s")
    for r in rows:
        if r.rpc_ms:
            print(f"\nlater calls of the {r.cache}-cache controller (median of 5, ms; "
                  f"DeletePlacement once):\n")
            print("| RPC | ms |\n|---|---|")
            for label, ms in r.rpc_ms.items():
                print(f"| {label} | {ms:.1f} |")


def run(args) -> int:
    whats = [*args.algorithms, "controller"]
    rows: list[Row] = []
    print(f"coldstart: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="expertplane-coldstart-") as tmp:
        tmp = Path(tmp)
        if not args.skip_empty:
            for what in whats:
                print(f"coldstart: {what}, empty cache ...", flush=True)
                rows.append(_measure(what, "empty", tmp / f"empty-{what}", tmp))
        print("coldstart: expertplane warm ...", flush=True)
        warm_seconds = _warm(tmp / "warm")
        for what in whats:
            print(f"coldstart: {what}, warmed cache ...", flush=True)
            rows.append(_measure(what, "warmed", tmp / "warm", tmp))
    print_table(rows, warm_seconds)
    if args.json:
        Path(args.json).write_text(json.dumps({"warm_seconds": warm_seconds,
                                               "rows": [asdict(r) for r in rows]}, indent=2))
    return 0
