"""Benchmark 'hotswap': expert hot-swap bandwidth vs raw P2P, and step time during a swap.

Every rank holds ``S`` local slots per layer, one logical expert each (``E = R = W * S``).
Moving ``m`` experts per rank rotates the first ``m`` slots of every rank to the next rank
(world size W >= 2: each rank receives m experts from rank r-1 and sends m to rank r+1), or
shifts them among the rank's own slots (W = 1: local copies only). Measured in one run:

1. raw baseline: ``batch_isend_irecv`` of the same m expert-sized buffers in the same pattern
   (W >= 2), or a device copy of the same bytes (W = 1);
2. hot-swap: :meth:`HotSwapEngine.prepare` until every copy is complete, bytes moved per rank /
   time, as a ratio to (1). On CUDA both (1) and (2) are timed with CUDA events around the
   copies (the engine's side stream: first copy issued to last copy done; the planning before
   it is reported apart as "prepare ms", host time of the whole ``prepare`` + ``wait``);
   on CPU with the host clock;
3. step time of the synthetic MoE model (W ranks, the same layer sizes) while swaps are being
   staged and at the committing step, vs normal steps measured just before, through the real
   step-boundary protocol (:class:`SwapCoordinator`), once unpaced (every copy issued with
   the prepare: the sweep's setting) and once per ``--step-budget-mb`` (copies spread over
   step boundaries, that many MiB per step): the steps that issued copies, the steps each
   swap's copies were spread over and their effective bandwidth (bytes / GPU time from the
   first copy to the last); after all swaps, the output vs the dense reference;
4. after each commit, the steps while the engine compacts the split layers back to one stacked
   buffer (:meth:`HotSwapEngine.compact`, paced by the same budget) and the steps after the
   compaction finished, vs normal, and the steps each compaction took.

``expertplane bench kernels`` runs it with the defaults (CUDA when present, else CPU/gloo).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from expertplane.kernels.hotswap import DEFAULT_STEP_BUDGET_BYTES

TARGETS = {"swap_vs_raw": 0.8, "step_during_swap_vs_normal": 1.1}
MIB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks (default: the GPU count on cuda, 2 on cpu)")
    parser.add_argument("--hidden", type=int, default=None, help="default 7168 cuda / 256 cpu")
    parser.add_argument("--intermediate", type=int, default=None,
                        help="default 2048 cuda / 128 cpu")
    parser.add_argument("--local-experts", type=int, default=None,
                        help="slots per rank and layer S (default 32 cuda / 8 cpu)")
    parser.add_argument("--layers", type=int, default=1, help="MoE layers of the model")
    parser.add_argument("--moved", type=int, nargs="+", default=None,
                        help="experts moved per rank (default 1 4 8 16 cuda / 1 2 4 cpu; "
                             "a single rank starts at 2)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per rank and step (default 4096 cuda / 256 cpu)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="default bfloat16 cuda / float32 cpu")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per measurement")
    parser.add_argument("--steps", type=int, default=30, help="normal steps timed")
    parser.add_argument("--swaps", type=int, default=4,
                        help="swaps per staging mode during the step-time part")
    parser.add_argument("--settle-steps", type=int, default=5,
                        help="steps served on each new layout, once compacted back to one "
                             "stacked buffer, before the next swap is asked for (the baseline "
                             "of that swap's staging steps)")
    parser.add_argument("--step-budget-mb", type=float, nargs="+", default=None,
                        help="paced staging budgets (MiB per rank and step) whose step times "
                             "are measured next to unpaced staging (default: the engine's, "
                             "256)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def resolve_config(args) -> dict:
    """The run's settings from parsed :func:`add_arguments` options (defaults filled in per
    device); raises ValueError naming the option. Pass the result to :func:`measure`."""
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise OSError("device: cuda asked for but torch.cuda.is_available() is False")
    pick = (lambda gpu, cpu: gpu) if cuda else (lambda gpu, cpu: cpu)
    world = args.world_size if args.world_size is not None else \
        (torch.cuda.device_count() if cuda else 2)
    cfg = {
        "device": "cuda" if cuda else "cpu",
        "backend": "nccl" if cuda else "gloo",
        "world_size": world,
        "hidden": args.hidden or pick(7168, 256),
        "intermediate": args.intermediate or pick(2048, 128),
        "local_experts": args.local_experts or pick(32, 8),
        "layers": args.layers,
        "moved": args.moved or [m for m in pick([1, 4, 8, 16], [1, 2, 4]) if m > 1 or world > 1],
        "tokens": args.tokens or pick(4096, 256),
        "top_k": args.top_k,
        "dtype": args.dtype or pick("bfloat16", "float32"),
        "reps": args.reps, "steps": args.steps, "swaps": args.swaps,
        "settle": args.settle_steps,
        "budgets_mb": args.step_budget_mb or [DEFAULT_STEP_BUDGET_BYTES / MIB],
    }
    if cfg["world_size"] < 1:
        raise ValueError("world_size: need at least one rank")
    if world == 1 and min(cfg["moved"]) < 2:
        raise ValueError("moved: a single rank moves experts between its own slots: need >= 2")
    if max(cfg["moved"]) > cfg["local_experts"]:
        raise ValueError(f"moved: at most --local-experts ({cfg['local_experts']}) per rank")
    if cfg["top_k"] > cfg["local_experts"] * cfg["world_size"]:
        raise ValueError("top_k: exceeds the number of experts")
    if cfg["settle"] < 1:
        raise ValueError("settle_steps: need at least one step between swaps")
    if min(cfg["budgets_mb"]) * MIB < 1:
        raise ValueError("step_budget_mb: each budget must be at least one byte")
    return cfg


def run(args) -> int:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    cfg = resolve_config(args)
    results = measure(cfg)
    print_results(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if results["failed_steps"] == 0 else 1


def measure(cfg: dict) -> dict:
    """Run the benchmark on ``cfg['world_size']`` ranks (spawned processes when > 1)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "result.json")
        if cfg["world_size"] == 1:
            _rank_main(0, cfg, store, out)
        else:
            mp.spawn(_rank_main, args=(cfg, store, out), nprocs=cfg["world_size"], join=True)
        return json.loads(Path(out).read_text())


# ---------------------------------------------------------------- per rank

def _rank_main(rank: int, cfg: dict, store: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    if cfg["device"] == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg["world_size"]))
    dist.init_process_group(cfg["backend"], init_method=f"file://{store}", rank=rank,
                            world_size=cfg["world_size"])
    try:
        result = _bench(rank, cfg)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _placements(cfg: dict, moved: int, flip: bool):
    """Layer placements: identity, or with the first ``moved`` slots of each rank rotated."""
    import numpy as np

    from expertplane.kernels.moe import LayerPlacement

    w, s = cfg["world_size"], cfg["local_experts"]
    phy2log = np.arange(w * s)
    if flip and moved:
        src = phy2log.reshape(w, s).copy()
        new = src.copy()
        if w > 1:
            new[:, :moved] = np.roll(src[:, :moved], 1, axis=0)
        else:
            new[0, :moved] = np.roll(src[0, :moved], 1) if moved > 1 else src[0, :1]
        phy2log = new.ravel()
    return [LayerPlacement.from_phy2log(phy2log, w * s) for _ in range(cfg["layers"])]


class _Clock:
    def __init__(self, device) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def _bench(rank: int, cfg: dict) -> dict:
    import torch
    import torch.distributed as dist

    from expertplane.kernels.hotswap import HotSwapEngine
    from expertplane.worker.synthetic import (
        ModelConfig,
        StreamConfig,
        SyntheticMoEModel,
        TokenStream,
    )

    device = torch.device("cuda", torch.cuda.current_device()) if cfg["device"] == "cuda" \
        else torch.device("cpu")
    w, s = cfg["world_size"], cfg["local_experts"]
    model_cfg = ModelConfig(num_layers=cfg["layers"], num_experts=w * s, hidden=cfg["hidden"],
                            intermediate=cfg["intermediate"], top_k=cfg["top_k"],
                            dtype=cfg["dtype"], seed=11)
    stream_cfg = StreamConfig(tokens_per_step=cfg["tokens"], drift_period=0, seed=5)
    model = SyntheticMoEModel(model_cfg, stream_cfg, _placements(cfg, 0, False), device=device)
    swap_group = dist.new_group()
    clock = _Clock(device)
    result: dict = {"config": cfg, "expert_bytes": model_cfg.expert_bytes,
                    "device_name": torch.cuda.get_device_name() if clock.cuda else "cpu",
}
    stream = TokenStream(model_cfg, stream_cfg, rank, device)
    model.pretune(w)  # as the worker does before serving: no Triton autotune in a timed step
    for i in range(3):  # warm-up
        model(stream.batch(i))
    engine = HotSwapEngine(list(model.layers), group=swap_group)
    result["sweep"] = _sweep(model, engine, cfg, swap_group, clock)
    modes = [None] + [int(mb * MIB) for mb in cfg["budgets_mb"]]
    result["steps"] = [_step_times(model, engine, stream, cfg, clock, budget)
                       for budget in modes]
    error = model(stream.batch(0), verify=True).max_error
    result["rel_err_after_swaps"] = error
    failed = int(error > model.tolerance)
    totals = [None] * w
    dist.all_gather_object(totals, failed)
    result["failed_steps"] = sum(totals)
    return result


def _sweep(model, engine, cfg: dict, group, clock) -> list[dict]:
    """Raw transfer vs hot-swap staging (unpaced), per number of experts moved per rank."""
    expert_bytes = model.config.expert_bytes
    engine.step_budget_bytes = None
    out = []
    for moved in cfg["moved"]:
        raw = _raw_times(model, moved, cfg, group, clock)
        target = _placements(cfg, moved, True)
        swap, prepare = [], []
        for _ in range(cfg["reps"] + 1):
            t0 = clock()
            engine.prepare(1, target)
            engine.wait()
            prepare.append(clock() - t0)
            copy_ms = engine.staged_copy_ms()
            swap.append(prepare[-1] if copy_ms is None else copy_ms / 1e3)
            engine.abort()
        moved_bytes = moved * expert_bytes * cfg["layers"]
        raw_s, swap_s = statistics.median(raw), statistics.median(swap[1:])  # first warms up
        out.append({"moved_per_rank": moved, "bytes_per_rank": moved_bytes,
                    "raw_ms": raw_s * 1e3, "swap_ms": swap_s * 1e3,
                    "prepare_ms": statistics.median(prepare[1:]) * 1e3,
                    "raw_gbps": moved_bytes / raw_s / 1e9, "swap_gbps": moved_bytes / swap_s / 1e9,
                    "swap_vs_raw": raw_s / swap_s})
    return out


def _step_times(model, engine, stream, cfg: dict, clock, budget: int | None) -> dict:
    """Step times through the real step-boundary protocol with staging paced by ``budget``
    bytes per step (None: unpaced): ``steps`` normal steps, then ``swaps`` swaps of the
    largest ``moved``, each asked for ``settle`` steps after the previous commit's layers were
    compacted back to one stacked buffer (:meth:`HotSwapEngine.compact`); each step is
    classed as starting (its boundary started the swap and issued the first step's copies),
    copying (its boundary issued a later step's copies), waiting (every copy issued, not
    switched yet), committing, compacting (no swap staged, a layer not yet stacked again
    after the step), or between (no swap staged, every layer stacked: the baseline of the
    next swap, on the layout it stages over)."""
    import torch
    import torch.distributed as dist

    from expertplane.kernels.hotswap import SwapCoordinator

    engine.step_budget_bytes = budget
    version = 1
    coord = SwapCoordinator(engine, version=version)
    moved = max(cfg["moved"])
    flip, home = _placements(cfg, moved, True), _placements(cfg, moved, False)
    flipped = torch.equal(engine.current_phy2log(), torch.stack([p.phy2log for p in flip]))
    plans = [home, flip] if flipped else [flip, home]   # the first swap moves experts too
    normal = [_timed_step(coord, model, stream, i, clock) for i in range(cfg["steps"])]
    done = threading.Event()
    errors: list[BaseException] = []
    served = [0]   # steps served in the swap loop

    def control() -> None:
        try:
            for j in range(cfg["swaps"]):
                while engine.compacting is not None and engine.compaction_error is None:
                    time.sleep(1e-4)
                mark = served[0]
                while served[0] < mark + cfg["settle"]:
                    time.sleep(1e-4)
                coord.prepare(version + 1 + j, plans[j % 2], timeout=300)
                coord.commit(version + 1 + j, timeout=300)
        except BaseException as exc:  # re-raised in the serving thread below
            errors.append(exc)
        done.set()

    threading.Thread(target=control, daemon=True).start()
    series: list[tuple[str, float]] = []
    swaps, step = [], 0
    while True:
        flag = torch.tensor([int(done.is_set())], device=engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item():
            break
        before, progress = coord.version, engine.staging_progress()
        dt = _timed_step(coord, model, stream, step, clock)
        after = engine.staging_progress()
        if coord.version != before:
            series.append(("committing", dt))
            swaps.append(coord.last_stats)
        elif after is not None and progress is None:
            series.append(("starting", dt))
        elif after is not None and after[0] > progress[0]:
            series.append(("copying", dt))
        elif after is not None:
            series.append(("waiting", dt))
        elif engine.compacting is not None:
            series.append(("compacting", dt))
        else:
            series.append(("between", dt))
        step += 1
        served[0] = step
    if errors:
        raise errors[0]
    moved_bytes = moved * cfg["layers"] * model.config.expert_bytes
    return _step_summary(budget, moved_bytes, statistics.median(normal), series, swaps)


def _timed_step(coord, model, stream, step: int, clock) -> float:
    """Seconds of one step boundary + forward pass (the clock syncs the device, so copies
    issued at the boundary count in full)."""
    batch = stream.batch(step)
    t0 = clock()
    coord.step_boundary()
    model(batch)
    return clock() - t0


def _step_summary(budget: int | None, moved_bytes: int, normal: float,
                  series: list[tuple[str, float]], swaps: list) -> dict:
    """One staging mode's row from its (kind, seconds) step series: medians and maxima in ms,
    ratios to the normal step (seconds); "staging" = the starting and copying steps together;
    the steps each swap's copies took and their effective bandwidth (``moved_bytes`` per rank
    and swap over the GPU time from first copy to last); "compacting" = steps after a commit
    with a layer not stacked yet (per swap: how many), "compacted" = the between steps after
    the first commit (every layer stacked again)."""
    kinds = {k: [dt for kind, dt in series if kind == k]
             for k in ("starting", "copying", "waiting", "committing")}
    staging = kinds["starting"] + kinds["copying"]

    def ms(xs, f=statistics.median):
        return f(xs) * 1e3 if xs else None

    def ratio(xs, f=statistics.median):
        return f(xs) / normal if xs else None

    spans = [s.copy_seconds for s in swaps if s.copy_seconds]
    compacting = [dt for kind, dt in series if kind == "compacting"]
    first_commit = next((i for i, (kind, _) in enumerate(series) if kind == "committing"),
                        len(series))
    stacked = [dt for kind, dt in series[first_commit:] if kind == "between"]
    runs = [len(list(group)) for kind, group in itertools.groupby(k for k, _ in series)
            if kind == "compacting"]
    per_swap = _staging_vs_before(series)
    return {
        "mode": "unpaced" if budget is None else f"paced {budget / MIB:g} MiB/step",
        "budget_bytes": budget, "bytes_per_swap": moved_bytes, "swaps": len(swaps),
        "normal_ms": normal * 1e3,
        "staging_ms": ms(staging), "staging_max_ms": ms(staging, max),
        "staging_steps": len(staging), "staging_vs_normal": ratio(staging),
        "staging_max_vs_normal": ratio(staging, max),
        "staging_vs_before": statistics.median(m for m, _ in per_swap) if per_swap else None,
        "staging_max_vs_before": max(x for _, x in per_swap) if per_swap else None,
        "starting_ms": ms(kinds["starting"]), "starting_vs_normal": ratio(kinds["starting"]),
        "copying_ms": ms(kinds["copying"]), "copying_vs_normal": ratio(kinds["copying"]),
        "waiting_ms": ms(kinds["waiting"]), "waiting_steps": len(kinds["waiting"]),
        "commit_ms": ms(kinds["committing"]), "commit_max_ms": ms(kinds["committing"], max),
        "commit_vs_normal": ratio(kinds["committing"]),
        "steps_per_swap": statistics.median(s.steps for s in swaps) if swaps else None,
        "copy_span_ms": statistics.median(spans) * 1e3 if spans else None,
        "compacting_ms": ms(compacting), "compacting_steps": len(compacting), "compacting_vs_normal": ratio(compacting),
        "compacting_max_vs_normal": ratio(compacting, max),
        "compacted_ms": ms(stacked), "compacted_steps": len(stacked), "compacted_vs_normal": ratio(stacked),
        "compacting_steps_per_swap": statistics.median(runs) if runs else None,
        "effective_gbps": moved_bytes / statistics.median(spans) / 1e9 if spans else None,
        "series": [(kind, dt * 1e3) for kind, dt in series],
    }


def _staging_vs_before(series: list[tuple[str, float]]) -> list[tuple[float, float]]:
    """Per swap: (median, max) of its starting and copying steps over the median of the
    between steps just before it (the same weight layout, which decides the GEMM path)."""
    out, before, staging = [], [], []
    for kind, dt in series:
        if kind == "between":
            if staging:
                before, staging = [], []
            before.append(dt)
        elif kind in ("starting", "copying"):
            staging.append(dt)
        elif kind == "committing" and staging and before:
            base = statistics.median(before)
            out.append((statistics.median(staging) / base, max(staging) / base))
            before, staging = [], []
    return out


def _raw_times(model, moved: int, cfg: dict, group, clock) -> list[float]:
    """Seconds to move ``moved`` expert-sized buffers per layer the way a swap does, without
    the engine: P2P ring (W >= 2) or a device copy (W = 1); CUDA events on CUDA."""
    import torch
    import torch.distributed as dist

    w = cfg["world_size"]
    rank = dist.get_rank()
    live = [layer.experts.segments[0] for layer in model.layers]   # [S, ...] before any swap
    recv = [(torch.empty_like(w13[:moved]), torch.empty_like(w2[:moved])) for w13, w2 in live]
    times = []
    for _ in range(cfg["reps"] + 1):
        t0 = clock()
        if clock.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        if w == 1:
            for (w13, w2), (r13, r2) in zip(live, recv):
                r13.copy_(w13[:moved])
                r2.copy_(w2[:moved])
        else:
            ops = []
            for (w13, w2), (r13, r2) in zip(live, recv):
                for i in range(moved):
                    ops += [dist.P2POp(dist.isend, w13[i], (rank + 1) % w, group),
                            dist.P2POp(dist.isend, w2[i], (rank + 1) % w, group),
                            dist.P2POp(dist.irecv, r13[i], (rank - 1) % w, group),
                            dist.P2POp(dist.irecv, r2[i], (rank - 1) % w, group)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        if clock.cuda:
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(clock() - t0)
    return times[1:]  # first one warms up


def print_results(results: dict) -> None:
    """The staging-vs-raw table and the step-time table of :func:`measure`'s results."""
    from expertplane.cli.output import console as rich_console
    from rich.table import Table

    cfg = results["config"]
    console = rich_console()
    baseline = "raw batch_isend_irecv" if cfg["world_size"] > 1 else "raw device copy"

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    timing = "CUDA events" if results["device_name"] != "cpu" else "host clock"
    table = Table(title=f"hot-swap staging vs {baseline} ({cfg['world_size']} x "
                        f"{results['device_name']}, {cfg['backend']}, expert "
                        f"{results['expert_bytes'] / 1e6:.1f} MB, {cfg['layers']} layer(s), "
                        f"{timing})")
    for col in ("moved/rank", "MB moved", "raw ms", "swap ms", "raw GB/s", "swap GB/s",
                "swap/raw", "target", "prepare ms (host)"):
        table.add_column(col)
    for row in results["sweep"]:
        table.add_row(str(row["moved_per_rank"]), f"{row['bytes_per_rank'] / 1e6:.1f}",
                      f"{row['raw_ms']:.3f}", f"{row['swap_ms']:.3f}",
                      f"{row['raw_gbps']:.1f}", f"{row['swap_gbps']:.1f}",
                      f"{row['swap_vs_raw']:.2f}", f">= {TARGETS['swap_vs_raw']}",
                      f"{row['prepare_ms']:.3f}")
    console.print(table)
    steps = Table(title=f"step time while staging ({max(cfg['moved'])} experts/rank per swap, "
                        f"{cfg['swaps']} swaps per mode; target <= "
                        f"{TARGETS['step_during_swap_vs_normal']}x normal)")
    for col in ("staging", "normal ms", "staging ms (steps)", "x normal", "max x", "x before",
                "max x before", "x first", "x later", "waiting ms (steps)", "commit ms",
                "x normal", "steps/swap", "copy span ms", "eff. GB/s"):
        steps.add_column(col)
    for row in results["steps"]:
        steps.add_row(row["mode"], fmt(row["normal_ms"]),
                      f"{fmt(row['staging_ms'])} ({row['staging_steps']})",
                      fmt(row["staging_vs_normal"], ".2f"), fmt(row["staging_max_vs_normal"], ".2f"),
                      fmt(row["staging_vs_before"], ".2f"),
                      fmt(row["staging_max_vs_before"], ".2f"),
                      fmt(row["starting_vs_normal"], ".2f"), fmt(row["copying_vs_normal"], ".2f"),
                      f"{fmt(row['waiting_ms'])} ({row['waiting_steps']})", fmt(row["commit_ms"]),
                      fmt(row["commit_vs_normal"], ".2f"), fmt(row["steps_per_swap"], "g"),
                      fmt(row["copy_span_ms"]), fmt(row["effective_gbps"], ".1f"))
    console.print(steps)
    after = Table(title="steps after the swaps: while compacting split layers back to one "
                        "stacked buffer, and once compacted (x normal)")
    for col in ("staging", "compacting ms (steps)", "x normal", "max x", "steps/compaction",
                "compacted ms (steps)", "x normal"):
        after.add_column(col)
    for row in results["steps"]:
        after.add_row(row["mode"], f"{fmt(row['compacting_ms'])} ({row['compacting_steps']})",
                      fmt(row["compacting_vs_normal"], ".2f"),
                      fmt(row["compacting_max_vs_normal"], ".2f"),
                      fmt(row["compacting_steps_per_swap"], "g"),
                      f"{fmt(row['compacted_ms'])} ({row['compacted_steps']})",
                      fmt(row["compacted_vs_normal"], ".2f"))
    console.print(after)
    console.print(f"rel. error vs dense reference after the swaps "
                  f"{results['rel_err_after_swaps']:.2e}")
    console.print(f"failed steps: {results['failed_steps']}")
