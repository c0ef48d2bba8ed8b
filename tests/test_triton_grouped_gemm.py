"""The persistent Triton grouped GEMM (``triton_ops.grouped_gemm``) against a float64
reference: plain and with the fused SwiGLU epilogue, groups of 0, 1, < BM, > BM rows, weights
in separate buffers found through the table of offsets, every output element written.

On CPU it runs in Triton's interpreter (``TRITON_INTERPRET=1``, set in a child process: the
variable must be set before Triton compiles the kernel; needs Triton installed); on a GPU
(``-m gpu``) for every tile config and through the autotuner. Run as a script, this file is
that child process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def check_grouped_gemm(device: str, swiglu: bool, config: dict | None, seed: int,
                       hidden: int = 128, n_out: int = 128) -> float:
    """Relative error of ``grouped_gemm`` vs float64 on random inputs; the output starts as
    NaN, so an element left unwritten raises."""
    from expertplane.kernels.triton_ops import grouped_gemm, swiglu_torch, weight_table

    gen = torch.Generator().manual_seed(seed)
    counts = [70, 0, 5, 130, 1, 64]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cols = 2 * n_out if swiglu else n_out
    x = torch.randn(sum(counts), hidden, generator=gen).to(device, dtype)
    weights = [(torch.randn(hidden, cols, generator=gen) / hidden ** 0.5).to(device, dtype)
               for _ in counts]                                     # separate buffers
    base, table = weight_table(weights)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(device, torch.int32)
    out = torch.full((x.shape[0], n_out), float("nan"), dtype=dtype, device=device)
    grouped_gemm(x, base, table, offsets, n_out, cols, swiglu=swiglu, config=config, out=out)
    if out.isnan().any():
        raise AssertionError("output elements left unwritten (still NaN)")
    parts = []
    for w, xs in zip(weights, x.double().split(counts)):
        h = xs @ w.double()
        parts.append(swiglu_torch(h) if swiglu else h)
    ref = torch.cat(parts)
    return float((out.double() - ref).norm() / ref.norm())


def _interpreter_main() -> None:
    for swiglu in (False, True):
        err = check_grouped_gemm("cpu", swiglu, {"BM": 64, "BN": 128, "BK": 64}, seed=int(swiglu))
        assert err < 1e-5, (swiglu, err)
    print("ok")


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (CPU-only environment)")
@pytest.mark.timeout(300)
def test_grouped_gemm_in_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                         timeout=280)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("swiglu", [False, True])
def test_grouped_gemm_every_tile_config_on_gpu(swiglu):
    from expertplane.kernels.triton_ops import _TILE_CONFIGS, tile_fits

    smem = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    tried = 0
    for bm, bn, bk, stages, warps in _TILE_CONFIGS:
        if not tile_fits(bm, bn, bk, stages, n_out=256, k_dim=512, fused=swiglu,
                         smem_bytes=smem):
            continue
        config = {"BM": bm, "BN": bn, "BK": bk, "num_stages": stages, "num_warps": warps}
        assert check_grouped_gemm("cuda", swiglu, config, seed=bm + bn + stages,
                                  hidden=512, n_out=256) < 1e-2
        tried += 1
    assert tried >= 5


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("swiglu", [False, True])
def test_grouped_gemm_autotuned_on_gpu(swiglu):
    assert check_grouped_gemm("cuda", swiglu, None, seed=3, hidden=1024, n_out=384) < 1e-2

if __name__ == "__main__":
    _interpreter_main()
