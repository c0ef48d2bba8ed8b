"""Paced hot-swap staging: the schedule keeps every rank within its byte budget per step and
covers every weight exactly once; a paced prepare spans several step boundaries while the old
plan keeps serving (no slot reads a staged row before the commit), matches the dense reference
after the commit, and an abort in the middle of the pacing frees the staging — alone on one
rank, and on every rank at one step when transfers were still to be issued (2 gloo ranks); a copy that fails on
one rank drops the version on every rank at one step."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from expertplane.kernels.experts import make_expert_weights
from expertplane.kernels.hotswap import (DUP, HotSwapEngine, SwapCoordinator, SwapError, copies,
                                         plan_transfers, schedule_chunks)
from expertplane.kernels.moe import LayerPlacement
from expertplane.worker.synthetic import ModelConfig, StreamConfig, SyntheticMoEModel, TokenStream

MODEL = ModelConfig(num_layers=2, num_experts=8, hidden=32, intermediate=16, top_k=3, seed=4)
STREAM = StreamConfig(tokens_per_step=32, drift_period=0, seed=2)
NUMELS = (MODEL.hidden * 2 * MODEL.intermediate, MODEL.intermediate * MODEL.hidden)
W13_BYTES = NUMELS[0] * 4   # fp32: 4,096 B; w2 2,048 B
BUDGET = 1024               # cuts w13 into 4 chunks and w2 into 2: one fill takes >= 6 steps


def _placements(phy2log: np.ndarray) -> list[LayerPlacement]:
    return [LayerPlacement.from_phy2log(row, MODEL.num_experts) for row in phy2log]


def _random_plan(rng: np.random.Generator, world: int, slots_per_rank: int) -> np.ndarray:
    """[L, R] phy2log holding every expert at least once (the EPLB invariant)."""
    slots = world * slots_per_rank
    rows = [rng.permutation(np.concatenate([np.arange(MODEL.num_experts),
                                            rng.integers(0, MODEL.num_experts,
                                                         slots - MODEL.num_experts)]))
            for _ in range(MODEL.num_layers)]
    return np.stack(rows)


# ---------------------------------------------------------------- the schedule (pure)

@pytest.mark.parametrize("world,seed", [(1, 0), (2, 1), (3, 2), (4, 3)])
@pytest.mark.parametrize("budget", [None, 1000, 3000, 10_000])
def test_schedule_covers_every_weight_once_within_the_budget(world, seed, budget):
    rng = np.random.default_rng(seed)
    plan = plan_transfers(_random_plan(rng, world, 8), _random_plan(rng, world, 8), world)
    assert plan.fills
    chunks = schedule_chunks(plan, NUMELS, 4, budget)
    assert [c.tag for c in chunks] == list(range(len(chunks)))
    covered: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for c in chunks:
        covered.setdefault((c.fill, c.tensor), []).append((c.start, c.stop))
    assert set(covered) == {(i, t) for i in range(len(plan.fills)) for t in (0, 1)}
    for (_, tensor), ranges in covered.items():
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == NUMELS[tensor]
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    load: dict[tuple[int, int], int] = {}   # (rank, step) -> bytes
    for c in chunks:
        f = plan.fills[c.fill]
        for r in {f.rank, f.src_rank}:
            load[r, c.step] = load.get((r, c.step), 0) + (c.stop - c.start) * 4
    if budget is None:
        assert {c.step for c in chunks} == {0} and len(chunks) == 2 * len(plan.fills)
    else:
        assert max(load.values()) <= budget
        total = max(sum(b for (r, _), b in load.items() if r == rank) for rank in range(world))
        assert max(c.step for c in chunks) + 1 >= -(-total // budget)


def test_dup_chunks_come_after_the_fill_they_copy_from():
    old = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    new = np.array([[0, 1, 2, 3, 4, 5, 0, 0]])   # rank 1 receives expert 0 once, dups it
    plan = plan_transfers(old, new, 2)
    chunks = schedule_chunks(plan, NUMELS, 4, BUDGET)
    src = {(f.rank, f.slot): i for i, f in enumerate(plan.fills)}
    for c in chunks:
        f = plan.fills[c.fill]
        if f.source == DUP:
            source_steps = [d.step for d in chunks if d.fill == src[f.rank, f.src_slot]]
            assert c.step >= max(source_steps)
    assert any(plan.fills[c.fill].source == DUP for c in chunks)


@pytest.mark.parametrize("budget", [0, -5])
def test_bad_budget_names_the_field(budget):
    plan = plan_transfers(np.array([[0, 1]]), np.array([[1, 0]]), 1)
    with pytest.raises(SwapError, match="budget_bytes"):
        schedule_chunks(plan, NUMELS, 4, budget)
    model = SyntheticMoEModel(MODEL, STREAM, _placements(np.tile(np.arange(8), (2, 1))))
    with pytest.raises(SwapError, match="step_budget_bytes"):
        HotSwapEngine(list(model.layers), step_budget_bytes=budget)


# ---------------------------------------------------------------- one rank

def _serving_state(model: SyntheticMoEModel) -> list[tuple]:
    """Per layer: the LocalExperts object, its rows and the placement the layer serves with."""
    return [(layer.experts, layer.experts.rows, layer.placement) for layer in model.layers]


def _assert_weights_match(model: SyntheticMoEModel, phy2log: np.ndarray, rank: int) -> None:
    for l, layer in enumerate(model.layers):
        slots = layer.experts.num_slots
        for s in range(slots):
            e = int(phy2log[l, rank * slots + s])
            w13, w2 = make_expert_weights(MODEL.seed, l, e, MODEL.hidden, MODEL.intermediate)
            got13, got2 = layer.experts.weights(s)
            assert torch.equal(got13, w13) and torch.equal(got2, w2), (l, s, e)


def test_paced_prepare_spans_steps_serves_old_plan_until_commit():
    rng = np.random.default_rng(7)
    a, b = _random_plan(rng, 1, 8), _random_plan(rng, 1, 8)
    model = SyntheticMoEModel(MODEL, STREAM, _placements(a))
    engine = HotSwapEngine(list(model.layers), step_budget_bytes=BUDGET)
    coord = SwapCoordinator(engine, version=1)
    stream = TokenStream(MODEL, STREAM, 0)
    before = _serving_state(model)
    result: dict[str, object] = {}
    control = threading.Thread(target=lambda: result.update(
        stats=coord.prepare(2, _placements(b), timeout=60)), daemon=True)
    control.start()
    issued, step = [], 0
    while control.is_alive() and step < 5000:
        coord.step_boundary()
        progress = engine.staging_progress()
        if progress is not None and progress[0] < progress[1]:
            issued.append(progress[0])
            assert _serving_state(model) == before   # no slot reads a staged row yet
        assert model(stream.batch(step), verify=True).max_error < 1e-4
        step += 1
    control.join(5)
    stats = result["stats"]
    assert stats is not None and stats.steps > 5 and stats.version == 2
    assert issued == list(range(1, stats.steps))  # one step's chunks per boundary
    assert _serving_state(model) == before        # staged, not committed: old plan serves
    _assert_weights_match(model, a, 0)
    threading.Thread(target=coord.commit, args=(2, 60), daemon=True).start()
    while coord.version != 2 and step < 10_000:
        coord.step_boundary()
        step += 1
    _assert_weights_match(model, b, 0)
    assert model(stream.batch(step), verify=True).max_error < 1e-4


def test_abort_mid_pacing_frees_the_staging_and_issues_nothing_more():
    rng = np.random.default_rng(8)
    a, b = _random_plan(rng, 1, 8), _random_plan(rng, 1, 8)
    model = SyntheticMoEModel(MODEL, STREAM, _placements(a))
    engine = HotSwapEngine(list(model.layers), step_budget_bytes=BUDGET)
    before = _serving_state(model)
    stats = engine.prepare(2, _placements(b))
    assert engine.pump() > 0
    issued, total = engine.staging_progress()
    assert 2 == issued < total == stats.steps
    assert not engine.ready() and not engine.has_unissued_transfers()  # local copies only
    staged = [weakref.ref(t) for stage in engine._staging.layers.values()
              for seg in stage.segments[len(model.layers[0].experts.segments):] for t in seg]
    assert staged, "the plan must need a new staging buffer"
    assert engine.abort() == 2
    gc.collect()
    assert all(ref() is None for ref in staged)
    assert engine.staged_version == 0 and engine.staging_progress() is None
    assert engine.pump() == 0
    assert _serving_state(model) == before
    engine.prepare(3, _placements(b))   # a later prepare starts cleanly and completes
    assert engine.wait(10)
    engine.commit()
    _assert_weights_match(model, b, 0)


def test_prepare_takes_a_staging_planned_ahead_unless_the_layers_changed_since():
    rng = np.random.default_rng(9)
    a, b, c = (_random_plan(rng, 1, 8) for _ in range(3))
    model = SyntheticMoEModel(MODEL, STREAM, _placements(a))
    engine = HotSwapEngine(list(model.layers), step_budget_bytes=BUDGET)
    ahead = engine.plan(2, _placements(b))
    assert engine.staged_version == 0          # planning issues nothing
    assert engine.prepare(2, _placements(b), planned=ahead) is ahead.stats
    engine.wait()
    engine.commit()
    stale = engine.plan(3, _placements(c))
    engine.prepare(4, _placements(a))          # another swap changes the layers meanwhile
    engine.wait()
    engine.commit()
    assert engine.prepare(3, _placements(c), planned=stale) is not stale.stats  # re-planned
    engine.wait()
    engine.commit()
    _assert_weights_match(model, c, 0)
    assert model(TokenStream(MODEL, STREAM, 0).batch(0), verify=True).max_error < 1e-4


# ---------------------------------------------------------------- two gloo ranks

WORLD = 2


def _rank_main(rank: int, store: str, scenario: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        {"paced": _paced_scenario, "budgets": _unequal_budgets_scenario,
         "copy_error": _copy_error_scenario}[scenario](rank)
    finally:
        dist.destroy_process_group()


def _unequal_budgets_scenario(rank: int) -> None:
    """Rank 1 paces by another budget: building the engine fails on every rank, naming it."""
    model = SyntheticMoEModel(MODEL, STREAM, _placements(_random_plan(np.random.default_rng(3),
                                                                      WORLD, 4)))
    with pytest.raises(SwapError, match=r"step_budget_bytes: ranks differ \(0 to 4096 bytes"):
        HotSwapEngine(list(model.layers), group=dist.new_group(),
                      step_budget_bytes=4096 if rank else None)


def _paced_scenario(rank: int) -> None:
    """v2 is staged paced over P2P and committed; v3 is aborted by rank 0 alone while
    transfers are still to be issued: every rank drops it at the same step."""
    rng = np.random.default_rng(11)
    a, b = _random_plan(rng, WORLD, 4), _random_plan(rng, WORLD, 4)
    c = np.roll(a, 1, axis=1)   # every slot changes: transfers on every rank
    model = SyntheticMoEModel(MODEL, STREAM, _placements(a))
    engine = HotSwapEngine(list(model.layers), group=dist.new_group(), step_budget_bytes=BUDGET)
    coord = SwapCoordinator(engine, version=1)
    stream = TokenStream(MODEL, STREAM, rank)
    mid_v3 = threading.Event()
    events: dict[str, object] = {}

    def prepare_v3() -> None:
        try:
            coord.prepare(3, _placements(c), timeout=60)
        except SwapError as exc:
            events["v3"] = str(exc)

    def control() -> None:
        events["v2"] = coord.prepare(2, _placements(b), timeout=60)
        coord.commit(2, timeout=60)
        v3 = threading.Thread(target=prepare_v3, daemon=True)
        v3.start()
        if rank == 0:   # only rank 0 is asked to abort, in the middle of the pacing
            mid_v3.wait(60)
            events["abort_returned"] = [coord.abort(3, timeout=60)]
        v3.join(60)
        if rank != 0:   # dropped by rank 0's abort: acknowledged once, then nothing to drop
            events["abort_returned"] = [coord.abort(3, timeout=60), coord.abort(3, timeout=60)]
        events["done"] = True

    threading.Thread(target=control, daemon=True).start()
    def serve(step: int) -> tuple[int, int]:
        state = _serving_state(model)
        version = coord.version
        assert coord.step_boundary()
        progress = engine.staging_progress()
        if coord.version == version and progress is not None:
            assert _serving_state(model) == state   # staging never changes what serves
        if engine.staged_version == 3 and progress[0] >= 3 and engine.has_unissued_transfers():
            mid_v3.set()
        entry = (coord.version, engine.staged_version)
        assert model(stream.batch(step), verify=True).max_error < 1e-4
        return entry

    log = _serve_until_every_rank_is_done(events, serve)
    assert events.get("done"), events
    assert events["v2"].steps > 5 and events["v2"].version == 2
    assert events["v3"] == ("version 3: aborted" if rank == 0
                            else "version 3: aborted on another rank while staging (an abort "
                                 "request, or copies that failed there)")
    assert events["abort_returned"] == ([True] if rank == 0 else [True, False])
    assert coord.version == 2 and engine.staged_version == 0
    _assert_weights_match(model, b, rank)
    assert _same_on_every_rank(log)   # switched to v2, started and dropped v3 at the same steps
    assert (2, 3) in log and log[-1] == (2, 0)


def _serve_until_every_rank_is_done(events: dict, serve) -> list:
    """Call ``serve(step)`` (one step boundary and forward; returns a log entry) until every
    rank's ``events`` has "done" (checked together by a MIN all-reduce before each step) or
    20,000 steps; returns the entries."""
    log: list = []
    while True:
        flag = torch.tensor([int("done" in events)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() or len(log) > 20_000:
            return log
        log.append(serve(len(log)))


def _same_on_every_rank(log: list) -> bool:
    """Whether every rank logged the same entries (an all-gather)."""
    logs = [None] * WORLD
    dist.all_gather_object(logs, log)
    return all(other == logs[0] for other in logs)


def _copy_error_scenario(rank: int) -> None:
    """Rank 1's copy thread fails while staging v2 with transfers still to be issued on every
    rank: both ranks drop v2 at the same step (the error rides the boundary's all_reduce) and
    keep serving v1; v3 is then staged and committed on both."""
    rng = np.random.default_rng(12)
    a, b = _random_plan(rng, WORLD, 4), _random_plan(rng, WORLD, 4)
    c = np.roll(a, 1, axis=1)   # every slot changes: transfers on every rank
    model = SyntheticMoEModel(MODEL, STREAM, _placements(a))
    engine = HotSwapEngine(list(model.layers), group=dist.new_group(), step_budget_bytes=BUDGET)
    coord = SwapCoordinator(engine, version=1)
    stream = TokenStream(MODEL, STREAM, rank)
    if rank == 1:
        copy_all = copies.copy_all

        def failing_copy_all(pairs):
            if engine.staged_version == 2:
                raise RuntimeError("injected copy failure")
            copy_all(pairs)

        copies.copy_all = failing_copy_all
    events: dict[str, object] = {}

    def control() -> None:
        try:
            coord.prepare(2, _placements(c), timeout=20)
            events["v2"] = "staged"
        except (SwapError, TimeoutError) as exc:
            events["v2"] = str(exc)
        try:
            coord.prepare(3, _placements(b), timeout=60)
            coord.commit(3, timeout=60)
        except (SwapError, TimeoutError) as exc:
            events["v3"] = str(exc)
        events["done"] = True

    threading.Thread(target=control, daemon=True).start()
    def serve(step: int) -> tuple[int, int]:
        assert coord.step_boundary()
        entry = (coord.version, engine.staged_version)
        assert model(stream.batch(step), verify=True).max_error < 1e-4
        return entry

    log = _serve_until_every_rank_is_done(events, serve)
    assert events.get("done") and "v3" not in events, events
    assert events["v2"] == ("version 2: aborted on another rank while staging (an abort request, "
                            "or copies that failed there)" if rank == 0 else
                            "staging of version 2 failed: injected copy failure")
    assert coord.version == 3 and engine.staged_version == 0
    _assert_weights_match(model, b, rank)
    assert _same_on_every_rank(log)   # started and dropped v2, then switched to v3, at the same steps
    dropped = log.index((1, 0), log.index((1, 2)))
    assert 0 < dropped < 10 and (1, 3) in log[dropped:] and log[-1][0] == 3


@pytest.mark.timeout(120)
def test_a_copy_error_on_one_rank_drops_the_version_on_every_rank_at_one_step(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), "copy_error"), nprocs=WORLD, join=True)


@pytest.mark.timeout(120)
def test_paced_swap_and_mid_pacing_abort_over_two_gloo_ranks(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), "paced"), nprocs=WORLD, join=True)


@pytest.mark.timeout(120)
def test_ranks_with_different_budgets_are_refused(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), "budgets"), nprocs=WORLD, join=True)
