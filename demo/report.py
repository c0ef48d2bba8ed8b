"""The demo's end products: a PNG report and a one-screen text summary."""

from __future__ import annotations

import pathlib

import numpy as np

from expertplane.demo.timeline import Timeline


def write_png(timeline: Timeline, path: pathlib.Path, title: str) -> pathlib.Path:
    """Balance over time (rebalances marked) and per-GPU load heatmaps before and after.

    Heatmaps show ``gpu_load`` [L, G] of the first and last sample, each normalised by its
    layer's mean GPU load, so 1.0 is perfect balance.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = timeline.samples
    if not samples:
        raise ValueError("timeline: no samples were collected; nothing to plot")
    fig = plt.figure(figsize=(13, 8), constrained_layout=True)
    grid = fig.add_gridspec(2, 2, height_ratios=[1.1, 1])
    ax = fig.add_subplot(grid[0, :])
    t = [s.t for s in samples]
    ax.plot(t, [float(np.mean(s.balance)) for s in samples], label="observed (ExpertPlane)", lw=2)
    ax.plot(t, [float(np.mean(s.control)) for s in samples], label="control: initial plan kept",
            lw=2, ls="--")
    ax.plot(t, [float(np.mean(s.predicted)) for s in samples], label="predicted by a fresh plan",
            lw=1, ls=":")
    for i, r in enumerate(e for e in timeline.rollouts if e.state == "committed"):
        ax.axvline(r.t, color="tab:green", alpha=0.5, label="rebalance committed" if i == 0 else None)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("max / mean GPU load (mean over layers)")
    ax.set_title(title)
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    first, last = samples[0], samples[-1]
    vmax = max(_normalised(first.gpu_load).max(), _normalised(last.gpu_load).max(), 1.0)
    for col, (name, s) in enumerate((("first window", first), ("last window", last))):
        hax = fig.add_subplot(grid[1, col])
        im = hax.imshow(_normalised(s.gpu_load), aspect="auto", cmap="magma", vmin=0, vmax=vmax)
        hax.set_title(f"per-GPU load / layer mean, {name} (t={s.t:.0f}s, plan v{s.plan_version})")
        hax.set_xlabel("GPU")
        hax.set_xticks(range(s.gpu_load.shape[1]))
        hax.set_ylabel("MoE layer")
        fig.colorbar(im, ax=hax)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _normalised(gpu_load: np.ndarray) -> np.ndarray:
    """[L, G] -> [L, G] divided by each layer's mean (layers with no load stay 0)."""
    mean = gpu_load.mean(axis=1, keepdims=True)
    return np.divide(gpu_load, mean, out=np.zeros_like(gpu_load, dtype=float), where=mean > 0)


def summary_lines(timeline: Timeline, settle: float) -> list[str]:
    """One screen of results. ``settle``: seconds after the first load sample ignored when
    averaging (the plan in force at the start has not seen any load yet)."""
    committed = [r for r in timeline.rollouts if r.state == "committed"]
    lines = [
        f"steps: {timeline.steps}, failed steps: {timeline.failed_steps}",
        f"tokens routed: {timeline.tokens:,}",
        f"rollouts committed: {len(committed)}, aborted: "
        f"{sum(r.state == 'aborted' for r in timeline.rollouts)}",
        f"slots moved: {sum(r.slots_moved for r in committed)}, "
        f"bytes moved: {sum(r.bytes_moved for r in committed) / 2**20:.1f} MiB",
        f"mean balance from {settle:.0f}s after the first load: observed {timeline.mean_balance('balance', settle):.3f}, "
        f"initial plan on the same load {timeline.mean_balance('control', settle):.3f}",
    ]
    if committed:
        prep = [r.prepare_seconds for r in committed]
        comm = [r.commit_seconds for r in committed]
        lines.append(f"rollout prepare: median {np.median(prep) * 1e3:.0f} ms, "
                     f"commit: median {np.median(comm) * 1e3:.0f} ms")
    return lines
