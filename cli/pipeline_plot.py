"""Timeline figure of a simulated step (matplotlib; the caller saves it)."""

from __future__ import annotations

from expertplane.planner.pipeline.simulate import SimulationResult

COLOURS = {"F": "#4c78a8", "B": "#54a24b", "W": "#eeca3b", "FB": "#b279a2"}


def timeline_figure(result: SimulationResult, title: str = ""):
    """A ``matplotlib.figure.Figure``: one row per rank, one box per operation (seconds on x),
    coloured by kind and labelled with the micro-batch (``f/b`` for an ``F&B`` pair)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(max(8.0, min(40.0, len(result.timeline) / 12)), 1 + 0.5 * result.num_ranks))
    ax = fig.add_subplot()
    label_ok = len(result.timeline) <= 600
    for e in result.timeline:
        ax.broken_barh([(e.start, e.end - e.start)], (e.stage - 0.4, 0.8),
                       facecolors=COLOURS[e.kind], edgecolors="black", linewidth=0.3)
        if label_ok:
            text = f"{e.micro_batch}/{e.backward_micro_batch}" if e.kind == "FB" else str(e.micro_batch)
            ax.text((e.start + e.end) / 2, e.stage, text, ha="center", va="center", fontsize=5)
    ax.set_yticks(range(result.num_ranks))
    ax.set_yticklabels([f"rank {r}" for r in range(result.num_ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_xlim(0, result.step_time)
    ax.set_title(title or f"{result.schedule}: step {result.step_time:.4g} s, "
                          f"bubble {result.bubble_fraction:.1%}", loc="left")
    ax.legend(handles=[Patch(color=c, label=k if k != "FB" else "F&B") for k, c in COLOURS.items()],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncol=4, frameon=False)
    fig.tight_layout()
    return fig
