"""The simulator reproduces DualPipe's bubble/memory table for equal stages and is monotone."""

import numpy as np
import pytest

from expertplane.planner.pipeline import simulate
from expertplane.planner.pipeline.schedules import rank_orders, layout


def fb_time(f, b, overlap):
    return max(f, b) + (1 - overlap) * min(f, b)


@pytest.mark.parametrize("ranks", [2, 4, 8])
@pytest.mark.parametrize("f, b, w", [(1.0, 2.0, 1.0), (2.0, 3.0, 0.7), (1.0, 3.0, 1.0)])
@pytest.mark.parametrize("extra", [0, 3])
def test_1f1b_bubble_is_table_formula_on_every_rank(ranks, f, b, w, extra):
    m = 2 * ranks + extra
    res = simulate([(f, b, w)] * ranks, "1f1b", m)
    np.testing.assert_allclose(res.idle, (ranks - 1) * (f + b), atol=1e-9)
    np.testing.assert_allclose(res.step_time, (m + ranks - 1) * (f + b))
    assert res.activation_peak[0] == ranks and res.parameter_multiplicity == 1.0


@pytest.mark.parametrize("ranks", [2, 4, 8])
@pytest.mark.parametrize("f, b, w", [(1.0, 2.0, 1.0), (1.0, 2.0, 0.5), (2.0, 3.0, 0.7),
                                     (1.0, 3.0, 1.0)])
def test_zb1p_bubble_is_table_formula_on_every_rank(ranks, f, b, w):
    res = simulate([(f, b, w)] * ranks, "zb1p", 3 * ranks)
    np.testing.assert_allclose(res.idle, (ranks - 1) * (f + b - 2 * w), atol=1e-9)
    assert res.activation_peak.max() == ranks and res.parameter_multiplicity == 1.0


@pytest.mark.parametrize("ranks", [2, 4, 8, 16])
@pytest.mark.parametrize("f, w", [(1.0, 1.0), (1.0, 0.5), (2.0, 0.7), (1.5, 0.0)])
def test_dualpipe_bubble_and_memory_match_table(ranks, f, w):
    b = f + w                      # the proportions of DualPipe's figure: F = B - W
    res = simulate([(f, b, w)] * ranks, "dualpipe", 2 * ranks + 4)
    bubble = (ranks / 2 - 1) * (fb_time(f, b, 0.0) + b - 3 * w)
    np.testing.assert_allclose(res.idle[[0, -1]], bubble, atol=1e-9)
    assert res.activation_peak[0] == ranks + 1
    assert res.parameter_multiplicity == 2.0


@pytest.mark.parametrize("ranks", [2, 4, 8])
@pytest.mark.parametrize("f, w", [(1.0, 1.0), (2.0, 0.7)])
def test_dualpipev_is_dualpipe_folded(ranks, f, w):
    b = f + w
    res = simulate([(f, b, w)] * (2 * ranks), "dualpipev", 2 * ranks + 1)
    np.testing.assert_allclose(res.idle[0], (ranks - 1) * (fb_time(f, b, 0.0) + b - 3 * w),
                               atol=1e-9)
    # 2R+1 chunk activations, each half a rank's layers (DualPipe with 2R ranks: 2R+1 stages)
    assert res.activation_peak[0] == ranks + 0.5
    assert res.parameter_multiplicity == 1.0


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_timeline_respects_dependencies_and_rank_order(schedule):
    rng = np.random.default_rng(0)
    times = rng.uniform(0.5, 2.0, (4, 3))
    times[:, 1] += times[:, 2]
    res = simulate(times, schedule, 8, p2p=0.1, overlap=0.4)
    ends = {}
    for e in res.timeline:
        ends[("F" if e.kind in ("F", "FB") else e.kind, e.micro_batch, e.model_stage)] = (e.end, e.stage)
        if e.kind == "FB":
            ends[("B", e.backward_micro_batch, e.backward_model_stage)] = (e.end, e.stage)
    for e in res.timeline:
        assert e.end >= e.start
        if e.kind in ("F", "FB") and e.model_stage > 0:
            end, rank = ends[("F", e.micro_batch, e.model_stage - 1)]
            assert e.start >= end + (0.1 if rank != e.stage else 0) - 1e-9
    for r in range(res.num_ranks):
        mine = sorted((e for e in res.timeline if e.stage == r), key=lambda e: e.start)
        assert all(a.end <= b.start + 1e-9 for a, b in zip(mine, mine[1:]))
    counts = {k: sum(e.kind == k for e in res.timeline) for k in ("F", "B", "W", "FB")}
    assert counts["F"] + counts["FB"] == 8 * 4 and counts["B"] + counts["FB"] == 8 * 4
    np.testing.assert_allclose(res.busy + res.idle, res.step_time)


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_step_time_grows_with_any_stage_time(schedule):
    rng = np.random.default_rng(1)
    times = rng.uniform(0.5, 2.0, (4, 3))
    times[:, 1] += times[:, 2]
    base = simulate(times, schedule, 8, overlap=0.5).step_time
    for s in range(4):
        for k in range(2):
            more = times.copy()
            more[s, k] += 0.3
            assert simulate(more, schedule, 8, overlap=0.5).step_time >= base - 1e-12


def test_rank_orders_run_every_pass_once():
    for schedule, stages, m in [("1f1b", 4, 3), ("zb1p", 4, 6), ("dualpipe", 6, 12),
                                ("dualpipev", 6, 7)]:
        lay = layout(schedule, stages, m)
        seen = []
        for order in rank_orders(lay):
            for op in order:
                if op.kind in ("F", "FB"):
                    seen.append(("F", op.micro_batch, op.stage))
                if op.kind in ("B", "FB"):
                    seen.append(("B",) + ((op.b_micro_batch, op.b_stage) if op.kind == "FB"
                                          else (op.micro_batch, op.stage)))
        assert len(seen) == len(set(seen)) == 2 * m * stages


@pytest.mark.parametrize("call, field", [
    (lambda: simulate([(1, 2, 1)] * 4, "gpipe", 8), "schedule"),
    (lambda: simulate([(1, 2, 3)] * 4, "1f1b", 8), "stages[0].W"),
    (lambda: simulate([(1, -2, 0)] * 4, "1f1b", 8), "stages[0]"),
    (lambda: simulate([(1, 2)] * 4, "1f1b", 8), "stages"),
    (lambda: simulate([(1, 2, 1)] * 4, "1f1b", 0), "micro_batches"),
    (lambda: simulate([(1, 2, 1)] * 4, "zb1p", 3), "micro_batches"),
    (lambda: simulate([(1, 2, 1)] * 3, "dualpipe", 8), "num_stages"),
    (lambda: simulate([(1, 2, 1)] * 4, "dualpipe", 7), "micro_batches"),
    (lambda: simulate([(1, 2, 1)] * 8, "dualpipev", 7), "micro_batches"),
    (lambda: simulate([(1, 2, 1)] * 4, "1f1b", 8, p2p=-1), "p2p"),
    (lambda: simulate([(1, 2, 1)] * 4, "dualpipe", 8, overlap=1.5), "overlap"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError) as exc:
        call()
    assert exc.value.field == field and str(exc.value).startswith(field + ":")
