"""Benchmark 'models': ExpertPlane's expert-parallel layer inside a transformers MoE block vs
transformers' own experts kernels, on the same call. Needs CUDA.

The call is the whole ``experts.forward(hidden [T, H], top_k_index [T, k], top_k_weights
[T, k]) -> [T, H]`` of a DeepSeek-V3 MoE block (transformers' ``DeepseekV3MoE``), permutation
and weighted combine included, at world size 1. The same block's experts run under
``experts_implementation`` = ``grouped_mm`` and ``eager`` (transformers' baselines, measured in
the same run on the same weights and routing) and ``expertplane`` (our layer, after
``engines.hf.expert_parallel`` with the identity plan). Routing: top-k without replacement
over E experts with mildly skewed probabilities U(0.5, 1.5); "rows" = T * k rows through the
experts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

BASELINES = ("grouped_mm", "eager")
TARGET = 1.5         # ours vs grouped_mm, at every row count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 32768],
                        help="rows = tokens x top-k through the experts (default: 4096 32768)")
    parser.add_argument("--hidden", type=int, default=7168, help="hidden size H")
    parser.add_argument("--intermediate", type=int, default=2048,
                        help="expert FFN intermediate size I")
    parser.add_argument("--experts", type=int, default=32, help="local experts (world size 1)")
    parser.add_argument("--top-k", type=int, default=8, help="experts per token")
    parser.add_argument("--iters", type=int, default=20, help="timed repetitions (median)")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES,
                        help="transformers expert implementations to compare with")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def build_block(args, device):
    """A bf16 DeepseekV3MoE block at ``args``' sizes (hidden, intermediate, experts, top_k),
    weights ~ N(0, 1/fan_in), on ``device``."""
    import torch
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(hidden_size=args.hidden, moe_intermediate_size=args.intermediate,
                              n_routed_experts=args.experts, num_experts_per_tok=args.top_k,
                              n_group=1, topk_group=1, n_shared_experts=1)
    with torch.device(device):
        block = DeepseekV3MoE(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return block


def routing(tokens: int, args, device):
    """(hidden [T, H] bf16, top_k_index [T, k], top_k_weights [T, k] fp32) for T = ``tokens``:
    top-k without replacement over mildly skewed expert probabilities U(0.5, 1.5)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(tokens)
    probs = torch.rand(args.experts, generator=gen) + 0.5
    index = torch.multinomial(probs.expand(tokens, -1), args.top_k, generator=gen)
    weights = torch.softmax(torch.randn(tokens, args.top_k, generator=gen), dim=-1)
    hidden = torch.randn(tokens, args.hidden, generator=gen).to(torch.bfloat16)
    return hidden.to(device), index.to(device), weights.to(device)


def run(args) -> int:
    import torch

    from expertplane.benchmarks.kernels import time_ms
    from expertplane.engines.hf import ep_layers, expert_parallel

    os.environ["NCCL_NVLS_ENABLE"] = "0"
    if not torch.cuda.is_available():
        raise OSError("bench models needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    import transformers

    device = torch.device("cuda")
    base = build_block(args, device)
    ours = copy.deepcopy(base)
    expert_parallel(ours, [list(range(args.experts))])
    layer = ep_layers(ours)[0]
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__, "rows": {}}
    for rows in args.rows:
        tokens = rows // args.top_k
        layer.experts.pretune(-(-rows // args.experts))
        hidden, index, weights = routing(tokens, args, device)
        call = {"expertplane": lambda: ours.experts(hidden, index, weights)}
        for name in args.baselines:
            call[name] = lambda name=name: baseline(base, name, hidden, index, weights)
        with torch.no_grad():
            ref = call[args.baselines[0] if args.baselines else "expertplane"]().float()
            err = float((call["expertplane"]().float() - ref).norm() / ref.norm())
            ms: dict[str, float] = {}
            for _ in range(2):      # two interleaved passes, each variant's faster median
                for name, fn in call.items():
                    t = time_ms(fn, args.iters)
                    ms[name] = min(ms.get(name, t), t)
        layer.read_counters()
        entry = {"tokens": tokens, "rel_err_vs_baseline": err}
        for name, t in ms.items():
            entry[name] = {"ms": t, "tokens_per_s": tokens / t * 1e3}
            if name != "expertplane":
                entry[name]["ours_speedup"] = t / ms["expertplane"]
        results["rows"][rows] = entry
        _print_rows(rows, entry)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def baseline(block, name: str, hidden, index, weights):
    """``block``'s experts under transformers' implementation ``name`` on this call."""
    block.experts.config._experts_implementation = name
    return block.experts(hidden, index, weights)


def _print_rows(rows: int, entry: dict) -> None:
    parts = [f"rows {rows:>6} ({entry['tokens']} tokens)"]
    for name, value in entry.items():
        if isinstance(value, dict):
            extra = f" ours {value['ours_speedup']:.2f}x" if "ours_speedup" in value else ""
            parts.append(f"{name} {value['ms']:.3f} ms {value['tokens_per_s'] / 1e6:.2f} M tok/s"
                         f"{extra}")
    parts.append(f"rel err {entry['rel_err_vs_baseline']:.1e}")
    print(" | ".join(parts), flush=True)
