"""Timeline figure of a simulated step (matplotlib; the caller saves it).

Readable when fitted to a screen: the figure is at most ``WIDTH_INCHES`` wide, and a long step
is cut into consecutive panels stacked top to bottom (each covers an equal share of the step)
instead of one strip thousands of pixels wide. A rank that runs two model stages (DualPipe,
DualPipeV) shows its second stage's operations hatched, and its row label names both stages.
"""

from __future__ import annotations

import math

from expertplane.planner.pipeline.simulate import SimulationResult

COLOURS = {"F": "#4c78a8", "B": "#54a24b", "W": "#eeca3b", "FB": "#b279a2"}
WIDTH_INCHES = 14.0
OPS_PER_PANEL = 48          # operations of one rank per panel (beyond: one more panel)
MAX_PANELS = 6
LABEL_MIN_INCHES = 0.12     # a box narrower than this gets no micro-batch label


def _rank_stages(result: SimulationResult) -> dict[int, list[int]]:
    """Model stages each rank runs, in chunk order."""
    stages: dict[int, dict[int, int]] = {}
    for e in result.timeline:
        stages.setdefault(e.stage, {})[e.chunk] = e.model_stage
    return {r: [s for _, s in sorted(chunks.items())] for r, chunks in stages.items()}


def timeline_figure(result: SimulationResult, title: str = ""):
    """A ``matplotlib.figure.Figure``: one row per rank, one box per operation (seconds on x),
    coloured by kind, labelled with the micro-batch (``f/b`` for an ``F&B`` pair) where there is
    room, hatched for a rank's second stage."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ops_per_rank = len(result.timeline) / max(result.num_ranks, 1)
    panels = max(1, min(MAX_PANELS, math.ceil(ops_per_rank / OPS_PER_PANEL)))
    panel_height = 0.6 + 0.32 * result.num_ranks
    fig = Figure(figsize=(WIDTH_INCHES, 0.7 + panels * panel_height))
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    span = result.step_time / panels if result.step_time else 1.0
    stages = _rank_stages(result)
    two_stages = any(len(s) > 1 for s in stages.values())
    seconds_per_inch = span / (WIDTH_INCHES * 0.85)
    for i, ax in enumerate(axes):
        lo, hi = i * span, (i + 1) * span
        for e in result.timeline:
            if e.end <= lo or e.start >= hi:
                continue
            ax.broken_barh([(e.start, e.end - e.start)], (e.stage - 0.4, 0.8),
                           facecolors=COLOURS[e.kind], edgecolors="black", linewidth=0.3,
                           hatch="//" if e.chunk > 0 else None)
            if (e.end - e.start) / seconds_per_inch >= LABEL_MIN_INCHES:
                text = (f"{e.micro_batch}/{e.backward_micro_batch}" if e.kind == "FB"
                        else str(e.micro_batch))
                middle = (max(e.start, lo) + min(e.end, hi)) / 2
                ax.text(middle, e.stage, text, ha="center", va="center", fontsize=6)
        ax.set_yticks(range(result.num_ranks))
        ax.set_yticklabels([f"rank {r}" + (f" (stages {', '.join(map(str, stages.get(r, [])))})"
                                           if two_stages else "")
                            for r in range(result.num_ranks)], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(lo, hi)
        ax.tick_params(axis="x", labelsize=8)
    axes[-1].set_xlabel("seconds from the step start")
    axes[0].set_title(title or f"{result.schedule}: step {result.step_time:.4g} s, "
                               f"bubble {result.bubble_fraction:.1%}", loc="left", fontsize=10)
    handles = [Patch(color=c, label=k if k != "FB" else "F&B") for k, c in COLOURS.items()]
    if two_stages:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                             label="second stage of the rank"))
    axes[0].legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8,
                   ncol=len(handles), frameon=False)
    fig.tight_layout()
    return fig
