"""Benchmark 'kernels': grouped expert GEMM, token movement, the MoE layer step, all-to-all
dispatch/combine, and (through ``benchmarks.hotswap``) expert hot-swap. Needs CUDA.

Every number is paired with a baseline measured in the same run:
- grouped GEMM: the layer's expert FFN (Triton, SwiGLU fused) vs ``torch._grouped_mm`` + torch
  SwiGLU, and each Triton GEMM alone vs ``torch._grouped_mm``, on the same rows, DeepSeek-V3
  shapes (H 7168, I 2048, 32 local experts);
- Triton weighted combine / SwiGLU / histogram vs the torch ops, in GB/s;
- the MoE layer step (world size 1 over NCCL) vs its expert GEMM alone;
- dispatch+combine bus bandwidth vs a raw ``all_to_all_single`` of the same bytes (>= 2 GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

ISSUE_TARGETS = {
    "gemm_4096": 1.2, "gemm_32768": 1.0, "a2a": 0.9,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768],
                        help="rows through the grouped GEMM (default: 4096 32768)")
    parser.add_argument("--hidden", type=int, default=7168, help="hidden size H")
    parser.add_argument("--intermediate", type=int, default=2048, help="expert FFN intermediate size I")
    parser.add_argument("--local-experts", type=int, default=32, help="experts per GPU")
    parser.add_argument("--top-k", type=int, default=8, help="experts per token")
    parser.add_argument("--layer-tokens", type=int, default=4096,
                        help="tokens per rank for the layer step and the all-to-all part")
    parser.add_argument("--iters", type=int, default=20, help="timed repetitions (median)")
    parser.add_argument("--parts", nargs="+", default=["gemm", "tokens", "layer", "a2a", "hotswap"],
                        choices=["gemm", "tokens", "layer", "a2a", "hotswap"], help="parts to run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def run(args) -> int:
    import torch

    os.environ["NCCL_NVLS_ENABLE"] = "0"
    if not torch.cuda.is_available():
        raise OSError("bench kernels needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    results: dict[str, object] = {"device": torch.cuda.get_device_name(),
                                  "torch": torch.__version__, "gpus": torch.cuda.device_count()}
    parts = {"gemm": _bench_gemm, "tokens": _bench_tokens, "layer": _bench_layer,
             "a2a": _bench_a2a, "hotswap": _bench_hotswap}
    for name in args.parts:
        results[name] = parts[name](args)
        _print_part(name, results[name])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def time_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs, timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _random_counts(total: int, groups: int, seed: int) -> list[int]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(groups, generator=gen) + 0.5            # mildly skewed, no empty group
    counts = torch.multinomial(probs, total, replacement=True, generator=gen)
    return torch.bincount(counts, minlength=groups).tolist()


def _bench_gemm(args) -> dict:
    """Each variant against its own baseline, same rows, same run (best of two interleaved
    passes of medians):

    - ``ffn_*``: the whole expert FFN (gate/up GEMM, SwiGLU, down GEMM). Baseline
      ``ffn_torch_grouped_mm`` = ``torch._grouped_mm`` + torch SwiGLU + ``torch._grouped_mm``;
      ``ffn_layer`` = ``LocalExperts.forward`` (CUDA: the Triton grouped GEMM with the SwiGLU
      fused into the gate/up epilogue, then the Triton down GEMM): GEMM+activation fused vs
      GEMMs + activation (from GROUPED_MM_MIN_ROWS rows per slot on, the layer runs
      ``torch._grouped_mm`` + Triton SwiGLU instead); ``ffn_layer_swapped`` = the same
      weights after a hot-swap (not one stacked buffer: always the Triton kernel);
      ``ffn_loop`` = the per-expert matmul fallback.
    - ``gemm_up_*`` / ``gemm_down_*``: one GEMM alone, Triton ``grouped_gemm`` vs
      ``torch._grouped_mm`` (gate/up: K = H, N = 2I; down: K = I, N = H).
    """
    import torch
    import torch.nn.functional as F

    from expertplane.kernels import triton_ops
    from expertplane.kernels.experts import LocalExperts, grouped_mm_loop

    h, i, s = args.hidden, args.intermediate, args.local_experts
    w13 = torch.randn(s, h, 2 * i, device="cuda", dtype=torch.bfloat16) / h ** 0.5
    w2 = torch.randn(s, i, h, device="cuda", dtype=torch.bfloat16) / i ** 0.5
    experts = LocalExperts(w13, w2)
    # as after a hot-swap: slot 0 reads a second buffer, so the weights are not one stack and
    # the Triton kernel runs at every size
    swapped = LocalExperts.from_segments([(w13, w2), (w13[:1].clone(), w2[:1].clone())],
                                         [(1, 0)] + [(0, e) for e in range(1, s)])
    (base13, offs13), (base2, offs2) = experts.weight_tables()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    dense_ms = time_ms(lambda: a @ b, args.iters)
    weight_bytes = (w13.numel() + w2.numel()) * w13.element_size()
    out = {"dense_8192_tflops": 2 * 8192 ** 3 / dense_ms / 1e9, "weight_bytes": weight_bytes,
           "rows": {}}
    del a, b
    for n in args.tokens:
        counts = _random_counts(n, s, seed=n)
        tokens_per_slot = torch.tensor(counts, device="cuda")
        offs = torch.cumsum(tokens_per_slot, 0).to(torch.int32)
        x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
        act = torch.randn(n, i, device="cuda", dtype=torch.bfloat16)

        def ffn_torch():
            gate, up = torch._grouped_mm(x, w13, offs=offs).chunk(2, dim=-1)
            return torch._grouped_mm((F.silu(gate) * up).contiguous(), w2, offs=offs)

        def ffn_loop():
            gate, up = grouped_mm_loop(x, w13, counts).chunk(2, dim=-1)
            return grouped_mm_loop((F.silu(gate) * up).contiguous(), w2, counts)

        flops_ffn, flops_up, flops_down = 6 * n * h * i, 4 * n * h * i, 2 * n * h * i
        # name: (fn, baseline name, flops, reference fn for the error)
        variants = {
            "ffn_torch_grouped_mm": (ffn_torch, "ffn_torch_grouped_mm", flops_ffn, ffn_loop),
            "ffn_layer": (lambda: experts(x, tokens_per_slot, counts), "ffn_torch_grouped_mm",
                          flops_ffn, ffn_loop),
            "ffn_layer_swapped": (lambda: swapped(x, tokens_per_slot, counts),
                                  "ffn_torch_grouped_mm", flops_ffn, ffn_loop),
            "ffn_loop": (ffn_loop, "ffn_torch_grouped_mm", flops_ffn, ffn_loop),
            "gemm_up_torch_grouped_mm": (lambda: torch._grouped_mm(x, w13, offs=offs),
                                         "gemm_up_torch_grouped_mm", flops_up,
                                         lambda: grouped_mm_loop(x, w13, counts)),
            "gemm_up_triton": (lambda: triton_ops.grouped_gemm(x, base13, offs13, offs, 2 * i,
                                                                 2 * i),
                               "gemm_up_torch_grouped_mm", flops_up,
                               lambda: grouped_mm_loop(x, w13, counts)),
            "gemm_down_torch_grouped_mm": (lambda: torch._grouped_mm(act, w2, offs=offs),
                                           "gemm_down_torch_grouped_mm", flops_down,
                                           lambda: grouped_mm_loop(act, w2, counts)),
            "gemm_down_triton": (lambda: triton_ops.grouped_gemm(act, base2, offs2, offs, h, h),
                                 "gemm_down_torch_grouped_mm", flops_down,
                                 lambda: grouped_mm_loop(act, w2, counts)),
        }
        row = {}
        for name, (fn, _, _, ref_fn) in variants.items():
            ref = ref_fn().float()
            err = float((fn().float() - ref).norm() / ref.norm())
            row[name] = {"rel_err_vs_loop": err, "ms": float("inf")}
        for _ in range(2):       # two interleaved passes; the faster of each variant counts
            for name, (fn, _, _, _) in variants.items():
                row[name]["ms"] = min(row[name]["ms"], time_ms(fn, args.iters))
        for name, (_, base, flops, _) in variants.items():
            row[name]["tflops"] = flops / row[name]["ms"] / 1e9
            row[name]["baseline"] = base
            row[name]["x_vs_baseline"] = row[base]["ms"] / row[name]["ms"]
        out["rows"][str(n)] = row
    out["tuned_configs"] = {str(key): str(cfg) for key, cfg in
                            triton_ops.tuned_configs().items()}
    return out


def _bench_tokens(args) -> dict:
    import torch

    from expertplane.kernels import triton_ops as ops

    t, k, h = args.layer_tokens, args.top_k, args.hidden
    y = torch.randn(t * k, h, device="cuda", dtype=torch.bfloat16)
    pos = torch.randperm(t * k, device="cuda").view(t, k)
    w = torch.rand(t, k, device="cuda")
    ids = torch.randint(0, 288, (t * k,), device="cuda")
    many_ids = torch.randint(0, 288, (1 << 26,), device="cuda")
    act_in = torch.randn(t * k, 2 * args.intermediate, device="cuda", dtype=torch.bfloat16)
    elem = y.element_size()
    cases = {
        "weighted_combine": ((lambda: ops.weighted_combine(y, pos, w)),
                             (lambda: ops.weighted_combine_torch(y, pos, w)),
                             (t * k + t) * h * elem),
        "swiglu": ((lambda: ops.swiglu(act_in)), (lambda: ops.swiglu_torch(act_in)),
                   act_in.numel() * 3 // 2 * elem),
        f"histogram_{t * k}": ((lambda: ops.histogram(ids, 288)),
                               (lambda: ops.histogram_torch(ids, 288)), t * k * 8),
        "histogram_64M": ((lambda: ops.histogram(many_ids, 288)),
                          (lambda: ops.histogram_torch(many_ids, 288)), many_ids.numel() * 8),
    }
    out = {"copy_gbps": 0.0}
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(big)
    out["copy_gbps"] = 2 * big.numel() / time_ms(lambda: dst.copy_(big), args.iters) / 1e6
    del big, dst
    for name, (fast, base, nbytes) in cases.items():
        got, want = fast().float(), base().float()
        if float((got - want).norm()) > 1e-2 * float(want.norm()):
            raise RuntimeError(f"{name}: Triton and torch results differ")
        fast_ms, base_ms = time_ms(fast, args.iters), time_ms(base, args.iters)
        out[name] = {"triton_gbps": nbytes / fast_ms / 1e6, "torch_gbps": nbytes / base_ms / 1e6,
                     "x_vs_torch": base_ms / fast_ms}
    return out


def _bench_layer(args) -> dict:
    import torch
    import torch.distributed as dist

    from expertplane.kernels.dispatch import combine, dispatch, plan_dispatch
    from expertplane.kernels.moe import EPMoELayer, LayerPlacement

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            s, h, i, t = args.local_experts, args.hidden, args.intermediate, args.layer_tokens
            placement = LayerPlacement.from_phy2log(list(range(s)), s)
            layer = EPMoELayer(h, i, s, placement, group=dist.group.WORLD, top_k=args.top_k,
                               num_groups=8, topk_groups=4, scoring="sigmoid", scaling=2.5,
                               dtype=torch.bfloat16, device="cuda")
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            group = dist.group.WORLD
            step_ms = time_ms(lambda: layer(x), args.iters)
            phys, weights = layer.route_tokens(x)
            layout = plan_dispatch(phys, layer.num_slots, group)
            x_local = dispatch(x, layout, args.top_k, group)
            y_local = layer.experts(x_local, layout.tokens_per_slot, layout.slot_counts)
            stages = {
                "route_and_replica_choice": lambda: layer.route_tokens(x),
                "plan_dispatch": lambda: plan_dispatch(phys, layer.num_slots, group),
                "dispatch": lambda: dispatch(x, layout, args.top_k, group),
                "expert_gemm": lambda: layer.experts(x_local, layout.tokens_per_slot,
                                                     layout.slot_counts),
                "combine": lambda: combine(y_local, layout, weights, group),
            }
            out = {"tokens": t, "rows": int(layout.tokens_per_slot.sum()), "step_ms": step_ms}
            for name, fn in stages.items():
                out[f"{name}_ms"] = time_ms(fn, args.iters)
            out["expert_gemm_share_of_step"] = out["expert_gemm_ms"] / step_ms
        finally:
            dist.destroy_process_group()
    return out


def _bench_a2a(args) -> dict:
    import torch
    import torch.multiprocessing as mp

    world = torch.cuda.device_count()
    if world < 2:
        return {"not_run": f"needs >= 2 GPUs, this machine has {world}"}
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_a2a_rank, args=(world, tmp, args), nprocs=world, join=True)
        return json.loads(Path(tmp, "a2a.json").read_text())


def _a2a_rank(rank: int, world: int, tmp: str, args) -> None:
    import torch
    import torch.distributed as dist

    from expertplane.kernels.dispatch import combine, dispatch, plan_dispatch
    from expertplane.kernels.moe import EPMoELayer, LayerPlacement

    os.environ["NCCL_NVLS_ENABLE"] = "0"
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        s, h, t, k = args.local_experts, args.hidden, args.layer_tokens, args.top_k
        experts = s * world
        placement = LayerPlacement.from_phy2log(list(range(experts)), experts)
        layer = EPMoELayer(h, 256, experts, placement, group=dist.group.WORLD, top_k=k,
                           dtype=torch.bfloat16, device="cuda")
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        phys, weights = layer.route_tokens(x)
        layout = plan_dispatch(phys, layer.num_slots, dist.group.WORLD)

        def moe_a2a():
            combine(dispatch(x, layout, k, dist.group.WORLD), layout, weights, dist.group.WORLD)

        rows = t * k
        send = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
        recv = torch.empty_like(send)

        def raw():   # two raw all_to_all_single of the same bytes (there and back)
            dist.all_to_all_single(recv, send)
            dist.all_to_all_single(send, recv)

        sent = torch.tensor([sum(layout.send_counts) * h * 2.0], device="cuda")
        moe_ms, raw_ms = time_ms(moe_a2a, args.iters), time_ms(raw, args.iters)
        times = torch.tensor([moe_ms, raw_ms], device="cuda")
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        dist.all_reduce(sent, op=dist.ReduceOp.MAX)
        factor = (world - 1) / world
        moe_busbw = 2 * float(sent) * factor / float(times[0]) / 1e6
        raw_busbw = 2 * rows * h * 2 * factor / float(times[1]) / 1e6
        if rank == 0:
            Path(tmp, "a2a.json").write_text(json.dumps({
                "world": world, "bytes_per_rank": rows * h * 2, "dispatch_combine_ms": float(times[0]),
                "raw_a2a_ms": float(times[1]), "dispatch_combine_busbw_gbps": moe_busbw,
                "raw_busbw_gbps": raw_busbw, "x_vs_raw": moe_busbw / raw_busbw}))
    finally:
        dist.destroy_process_group()


def _bench_hotswap(args) -> dict:
    """The hot-swap benchmark (``benchmarks/hotswap.py``) with its default settings."""
    from expertplane.benchmarks import hotswap

    parser = argparse.ArgumentParser()
    hotswap.add_arguments(parser)
    return hotswap.measure(hotswap.resolve_config(parser.parse_args([])))


def _print_part(name: str, result: object) -> None:
    from expertplane.cli.output import console as rich_console
    from rich.table import Table

    console = rich_console()
    if isinstance(result, dict) and "not_run" in result:
        console.print(f"[bold]{name}[/bold]: not run: {result['not_run']}")
        return
    if name == "gemm":
        table = Table(title=f"grouped expert GEMM (dense 8192^3 bf16: "
                            f"{result['dense_8192_tflops']:.0f} TFLOP/s; weights "
                            f"{result['weight_bytes'] / 1e9:.2f} GB)")
        for col in ("rows", "variant", "ms", "TFLOP/s", "x baseline", "baseline", "target",
                    "rel err"):
            table.add_column(col)
        for rows, variants in result["rows"].items():
            for variant, r in variants.items():
                target = ISSUE_TARGETS.get(f"gemm_{rows}", "") if variant == "ffn_layer" else ""
                table.add_row(rows, variant, f"{r['ms']:.3f}", f"{r['tflops']:.0f}",
                              f"{r['x_vs_baseline']:.2f}", r["baseline"], str(target),
                              f"{r['rel_err_vs_loop']:.1e}")
        console.print(table)
    elif name == "tokens":
        table = Table(title=f"token movement (device copy {result['copy_gbps']:.0f} GB/s)")
        for col in ("op", "triton GB/s", "torch GB/s", "x torch"):
            table.add_column(col)
        for op, r in result.items():
            if isinstance(r, dict):
                table.add_row(op, f"{r['triton_gbps']:.0f}", f"{r['torch_gbps']:.0f}",
                              f"{r['x_vs_torch']:.2f}")
        console.print(table)
    elif name == "hotswap":
        from expertplane.benchmarks import hotswap

        hotswap.print_results(result)
    else:
        console.print(f"[bold]{name}[/bold]: " + json.dumps(result, indent=1))
