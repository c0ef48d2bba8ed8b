"""The timeline PNG: screen-sized (a long step is cut into stacked panels, not one wide strip),
and a DualPipeV rank's two stages told apart (hatched second stage, both named on the row)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from expertplane.planner.pipeline import simulate  # noqa: E402
from expertplane.cli.pipeline_plot import MAX_PANELS, WIDTH_INCHES, timeline_figure  # noqa: E402


def _bars(fig):
    return [c for ax in fig.axes for c in ax.collections]


def test_dualpipev_panels_and_stage_labels():
    result = simulate([(1.0, 2.0, 1.0)] * 8, "dualpipev", 32)
    fig = timeline_figure(result)
    width, height = fig.get_size_inches()
    assert width == WIDTH_INCHES and 1 < len(fig.axes) <= MAX_PANELS
    assert width / height < 4                  # was 3962 x 450 px (8.8 : 1)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["rank 0 (stages 0, 7)", "rank 1 (stages 1, 6)", "rank 2 (stages 2, 5)",
                      "rank 3 (stages 3, 4)"]
    hatches = {bar.get_hatch() for bar in _bars(fig)}
    assert hatches == {None, "//"}
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "second stage of the rank" in legend
    covered = sorted(ax.get_xlim() for ax in fig.axes)
    assert covered[0][0] == 0 and abs(covered[-1][1] - result.step_time) < 1e-9


def test_one_stage_per_rank_needs_no_hatch_and_short_steps_one_panel():
    result = simulate([(1.0, 2.0, 0.0)] * 4, "1f1b", 4)
    fig = timeline_figure(result)
    assert len(fig.axes) == 1
    assert {bar.get_hatch() for bar in _bars(fig)} == {None}
    assert fig.axes[0].get_yticklabels()[0].get_text() == "rank 0"
