"""Paced compaction after a hot-swap: a swap leaves a layer's experts in several segments (or
rows out of slot order), and the step boundaries then bring each such layer back to one stacked
segment, one layer at a time, within the step budget, while the outputs keep matching the dense
reference; layers already stacked are untouched; a prepare cancels the compaction in progress
(and frees its buffer), the swap commits correctly and the compaction resumes after it; a
compaction switch while a staging is planned makes the prepare re-plan. One rank, and two real
gloo ranks each compacting on its own."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from expertplane.kernels.experts import LocalExperts, make_expert_weights
from expertplane.kernels.hotswap import HotSwapEngine, SwapCoordinator, copies
from expertplane.kernels.moe import LayerPlacement
from expertplane.worker.synthetic import ModelConfig, StreamConfig, SyntheticMoEModel, TokenStream

MODEL = ModelConfig(num_layers=2, num_experts=8, hidden=32, intermediate=16, top_k=3, seed=4)
STREAM = StreamConfig(tokens_per_step=32, drift_period=0, seed=2)
EXPERT_BYTES = (MODEL.hidden * 2 * MODEL.intermediate + MODEL.intermediate * MODEL.hidden) * 4
BUDGET = 1024               # fp32 w13 4,096 B in 4 pieces, w2 2,048 B in 2: 6 steps per expert
SLOTS = 8                   # per rank


def _placements(phy2log: np.ndarray) -> list[LayerPlacement]:
    return [LayerPlacement.from_phy2log(row, MODEL.num_experts) for row in phy2log]


def _plan(seed: int, world: int = 1) -> np.ndarray:
    """[L, R] phy2log holding every expert at least once."""
    rng = np.random.default_rng(seed)
    slots = world * SLOTS
    return np.stack([rng.permutation(np.concatenate([
        np.arange(MODEL.num_experts), rng.integers(0, MODEL.num_experts, slots - 8)]))
        for _ in range(MODEL.num_layers)])


def _assert_weights_match(model: SyntheticMoEModel, phy2log: np.ndarray, rank: int) -> None:
    for l, layer in enumerate(model.layers):
        assert torch.equal(layer.placement.phy2log, torch.as_tensor(phy2log[l]))
        for s in range(SLOTS):
            e = int(phy2log[l, rank * SLOTS + s])
            w13, w2 = make_expert_weights(MODEL.seed, l, e, MODEL.hidden, MODEL.intermediate)
            got13, got2 = layer.experts.weights(s)
            assert torch.equal(got13, w13) and torch.equal(got2, w2), (l, s, e)


class _Server:
    """The serving loop of one rank: a step boundary, then a forward pass checked against the
    dense reference; records the bytes each boundary's compaction issued."""

    def __init__(self, model: SyntheticMoEModel, coord: SwapCoordinator, rank: int = 0) -> None:
        self.model, self.coord, self.engine = model, coord, coord.engine
        self.stream = TokenStream(MODEL, STREAM, rank)
        self.step = 0
        self.compact_bytes: list[int] = []   # per boundary (0: none issued)
        compact = self.engine.compact

        def counted() -> int:
            self.compact_bytes[-1] = compact()
            return self.compact_bytes[-1]

        self.engine.compact = counted

    def boundary(self) -> None:
        self.compact_bytes.append(0)
        assert self.coord.step_boundary()
        assert self.model(self.stream.batch(self.step), verify=True).max_error < 1e-4
        self.step += 1

    def swap(self, version: int, phy2log: np.ndarray) -> None:
        """Prepare and commit ``version`` from a request thread while serving."""
        done = threading.Event()
        errors: list[BaseException] = []

        def control() -> None:
            try:
                self.coord.prepare(version, _placements(phy2log), timeout=60)
                self.coord.commit(version, timeout=60)
            except BaseException as exc:
                errors.append(exc)
            done.set()

        threading.Thread(target=control, daemon=True).start()
        while not done.is_set() and self.step < 20_000:
            self.boundary()
        assert not errors and self.coord.version == version, errors

    def compact_all(self) -> int:
        """Serve until every layer is stacked; returns the boundaries it took."""
        start = self.step
        while self.engine.compacting is not None and self.step < start + 2_000:
            self.boundary()
        assert self.engine.compacting is None
        return self.step - start


def _rotated(a: np.ndarray, layers: list[int], first: int, world: int = 1) -> np.ndarray:
    """``a`` with, on every rank and each of ``layers``, the experts of 3 of the rank's slots
    that hold different ones rotated (the slots of experts ``first`` .. ``first + 2`` where the
    rank holds them, else its first slots of distinct experts)."""
    b = a.copy()
    for layer in layers:
        for rank in range(world):
            row = a[layer, rank * SLOTS:(rank + 1) * SLOTS]
            experts = list(dict.fromkeys(
                [e for e in range(first, first + 3) if e in row] + row.tolist()))[:3]
            slots = [rank * SLOTS + row.tolist().index(e) for e in experts]
            b[layer, slots] = np.roll(a[layer, slots], 1)
    return b


def _split_swap(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): b moves 3 experts of layer 0 to other slots and leaves layer 1 as in a."""
    a = _plan(seed)
    return a, _rotated(a, [0], 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paced_compaction_restores_stacked_layers_within_the_budget(seed, monkeypatch):
    a, b = _split_swap(seed)
    model = SyntheticMoEModel(MODEL, STREAM, _placements(a))
    engine = HotSwapEngine(list(model.layers), step_budget_bytes=BUDGET)
    server = _Server(model, SwapCoordinator(engine, version=1))
    copied: list[int] = []
    copy_all = copies.copy_all
    monkeypatch.setattr(copies, "copy_all", lambda pairs: (
        copied.append(sum(d.numel() * d.element_size() for d, _ in pairs)), copy_all(pairs)))
    assert engine.compacting is None
    server.swap(2, b)
    untouched = model.layers[1].experts
    assert model.layers[0].experts.stacked is None and untouched.stacked is not None
    assert engine.compacting == 1
    copied.clear()
    start = len(server.compact_bytes)
    boundaries = server.compact_all()
    per_step = server.compact_bytes[start:]
    moved = int((a[0] != b[0]).sum())   # misplaced slots: rows free in the old buffer
    assert moved == 3
    assert 0 < max(per_step) <= BUDGET
    assert sum(per_step) == sum(copied) == moved * EXPERT_BYTES   # compacted in place
    assert boundaries > moved * EXPERT_BYTES // BUDGET
    assert model.layers[1].experts is untouched
    assert engine.compacted_layers == 1 and len(model.layers[0].experts.segments) == 1
    _assert_weights_match(model, b, 0)
    for _ in range(3):   # nothing left to do
        server.boundary()
    assert server.compact_bytes[-3:] == [0, 0, 0]
    server.swap(3, a)   # the next swap's stats (logged by the worker) count the compaction
    assert server.coord.last_stats.compacted_layers == 1


@pytest.mark.parametrize("seeds", [(3, 4, 5), (6, 7, 8)])
def test_unpaced_compaction_issues_each_layer_in_one_step(seeds):
    """Two swaps in a row (no compaction between them: the engine alone) leave both layers
    split or out of order; unpaced, each layer's copies are issued at one boundary."""
    a, b, c = (_plan(s) for s in seeds)
    model = SyntheticMoEModel(MODEL, STREAM, _placements(a))
    engine = HotSwapEngine(list(model.layers), step_budget_bytes=None)
    for version, target in ((2, b), (3, c)):
        engine.prepare(version, _placements(target))
        assert engine.wait(10)
        engine.commit()
    assert engine.compacting == 2
    server = _Server(model, SwapCoordinator(engine, version=3))
    server.compact_all()
    issued = [n for n in server.compact_bytes if n]
    assert len(issued) == 2 and all(n % EXPERT_BYTES == 0 for n in issued)
    assert engine.compacted_layers == 2
    assert all(layer.experts.stacked is not None for layer in model.layers)
    _assert_weights_match(model, c, 0)


def _permuted_layer0(model: SyntheticMoEModel) -> np.ndarray:
    """Exchange slots 0 and 1 of layer 0 by their rows alone (slot 0 reads row 1 and slot 1
    row 0 of the one buffer): compacting it needs a new buffer. Returns the new phy2log."""
    layer = model.layers[0]
    live = layer.experts
    rows = [(0, 1), (0, 0)] + [(0, s) for s in range(2, SLOTS)]
    phy = layer.placement.phy2log.clone()
    phy[[0, 1]] = phy[[1, 0]]
    layer.swap(LayerPlacement.from_phy2log(phy, MODEL.num_experts),
               LocalExperts.from_segments(live.segments, rows))
    return torch.stack([l.placement.phy2log for l in model.layers]).numpy()


def test_a_prepare_cancels_the_compaction_frees_its_buffer_and_it_resumes_after_the_commit():
    a = _plan(9)
    model = SyntheticMoEModel(MODEL, STREAM, _placements(a))
    engine = HotSwapEngine(list(model.layers), step_budget_bytes=BUDGET)
    coord = SwapCoordinator(engine, version=1)
    server = _Server(model, coord)
    permuted = _permuted_layer0(model)
    assert engine.compacting == 1
    for _ in range(4):
        server.boundary()
    assert server.compact_bytes == [BUDGET] * 4 and engine.compacting == 1   # in progress
    target = engine.compactor.current.result.segments[0]
    assert target[0] is not model.layers[0].experts.segments[0][0]   # a new buffer
    buffer = [weakref.ref(t) for t in target]
    del target
    c = permuted.copy()
    c[:, [2, 3]] = c[:, [3, 2]]   # both layers change (rows of layer 0 stay out of order)
    assert (c != permuted).any(axis=1).all()
    done = threading.Event()
    threading.Thread(target=lambda: (coord.prepare(2, _placements(c), 60),
                                     coord.commit(2, 60), done.set()), daemon=True).start()
    while engine.staged_version == 0:
        server.boundary()
    gc.collect()
    assert all(ref() is None for ref in buffer)   # cancelled: its buffer is freed
    marker = len(server.compact_bytes)
    while coord.version != 2:
        server.boundary()
    assert server.compact_bytes[marker:] == [0] * (len(server.compact_bytes) - marker)
    done.wait(10)
    _assert_weights_match(model, c, 0)
    assert engine.compacting is not None
    server.compact_all()
    assert max(server.compact_bytes) <= BUDGET
    assert all(layer.experts.stacked is not None for layer in model.layers)
    _assert_weights_match(model, c, 0)


def test_a_compaction_switch_while_planning_makes_the_prepare_replan():
    """plan() reads each layer's experts once: a layer that switches to its compacted experts
    right after that read gets a staging built from the old experts alone, which prepare()
    then sees is stale (its base) and re-plans; the committed weights are right."""
    a, b = _split_swap(10)
    c = _plan(11)
    model = SyntheticMoEModel(MODEL, STREAM, _placements(a))
    engine = HotSwapEngine(list(model.layers), step_budget_bytes=None)
    engine.prepare(2, _placements(b))
    engine.wait(10)
    engine.commit()
    layer = model.layers[0]
    assert layer.experts.stacked is None
    compacted = LocalExperts.from_logical(layer.local_logical_ids(), layer.expert_weights)
    reads = [0]

    class SwitchesAfterOneRead(type(layer)):
        @property
        def experts(self):
            reads[0] += 1
            live = self.__dict__["experts"]
            self.__dict__["experts"] = compacted   # the serving thread's compaction switch
            return live

        @experts.setter
        def experts(self, value):
            self.__dict__["experts"] = value

    layer.__class__ = SwitchesAfterOneRead
    try:
        planned = engine.plan(3, _placements(c))
    finally:
        layer.__class__ = SwitchesAfterOneRead.__base__
    assert reads[0] == 1 and layer.experts is compacted
    assert engine.prepare(3, _placements(c), planned=planned) is not planned.stats  # re-planned
    assert engine.wait(10)
    engine.commit()
    _assert_weights_match(model, c, 0)
    assert model(TokenStream(MODEL, STREAM, 0).batch(0), verify=True).max_error < 1e-4


# ---------------------------------------------------------------- two gloo ranks

WORLD = 2


def _rank_main(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        _two_rank_scenario(rank)
    finally:
        dist.destroy_process_group()


def _two_rank_scenario(rank: int) -> None:
    """v2 leaves split layers on both ranks; each compacts on its own; v3 is prepared while
    they compact (cancelling it), committed at one step, and compaction resumes after it."""
    a = _plan(12, WORLD)
    b = _rotated(a, [0, 1], 0, WORLD)
    c = _rotated(b, [0, 1], 4, WORLD)
    model = SyntheticMoEModel(MODEL, STREAM, _placements(a))
    engine = HotSwapEngine(list(model.layers), group=dist.new_group(), step_budget_bytes=BUDGET)
    coord = SwapCoordinator(engine, version=1)
    server = _Server(model, coord, rank)
    events: dict[str, object] = {}
    compacting = threading.Event()

    def control() -> None:
        try:
            coord.prepare(2, _placements(b), timeout=60)
            coord.commit(2, timeout=60)
            if not compacting.wait(60):
                raise TimeoutError("no compaction under way after v2")
            coord.prepare(3, _placements(c), timeout=60)
            coord.commit(3, timeout=60)
        except BaseException as exc:
            events["error"] = exc
        events["done"] = True

    threading.Thread(target=control, daemon=True).start()
    swapped_at, left_at_v3, done = None, None, False
    while not done and server.step < 20_000:
        flag = torch.tensor([int("done" in events)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        done = bool(flag.item())
        server.boundary()
        if coord.version == 2 and swapped_at is None:
            swapped_at = server.step
        if engine.staged_version == 3 and left_at_v3 is None:
            left_at_v3 = engine.compacting
        if swapped_at is not None and sum(server.compact_bytes[swapped_at:]) >= 4 * BUDGET:
            compacting.set()
    assert "error" not in events, events
    assert coord.version == 3 and left_at_v3 is not None   # v3 took over from a compaction
    _assert_weights_match(model, c, rank)
    while True:   # every rank serves (the boundary is collective) until every rank is stacked
        flag = torch.tensor([int(engine.compacting is None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() or server.step > 5_000:
            break
        server.boundary()
    assert max(server.compact_bytes) <= BUDGET and engine.compacted_layers >= 1
    assert all(layer.experts.stacked is not None for layer in model.layers)
    _assert_weights_match(model, c, rank)


@pytest.mark.timeout(120)
def test_two_gloo_ranks_compact_on_their_own_and_a_prepare_cancels_it(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)


def test_stacked_weight_tables_equal_the_tables_of_the_slots_rows():
    """A compacted layer's tables are made on the device (no host copy): the same offsets as
    :func:`weight_table` over its slots' rows."""
    from expertplane.kernels.triton_ops import weight_table

    w13, w2 = torch.randn(5, 32, 64), torch.randn(5, 32, 32)
    tables = LocalExperts(w13, w2).weight_tables()
    for (base, offsets), w in zip(tables, (w13, w2)):
        ref_base, ref_offsets = weight_table([w[s] for s in range(5)])
        assert base.data_ptr() == ref_base.data_ptr() and torch.equal(offsets, ref_offsets)


def test_a_failed_compaction_stops_until_the_next_commit_and_serving_goes_on(monkeypatch):
    """No memory for a compaction buffer, or a compaction copy that raises (CPU helper
    thread), leaves the layers split and serving correct; nothing more is compacted until
    the next commit."""
    a, b = _split_swap(15)
    c = _rotated(b, [1], 0)   # layer 1 splits too, layer 0 stays split
    d = _rotated(c, [0], 4)
    model = SyntheticMoEModel(MODEL, STREAM, _placements(a))
    engine = HotSwapEngine(list(model.layers), step_budget_bytes=BUDGET)
    server = _Server(model, SwapCoordinator(engine, version=1))
    server.swap(2, b)

    def out_of_memory(index, live, budget_bytes):
        raise torch.cuda.OutOfMemoryError("injected")

    monkeypatch.setattr(engine.compactor, "plan", out_of_memory)
    server.boundary()
    assert engine.compaction_error == "layer 0: no memory for a compaction buffer: injected"
    for _ in range(3):
        server.boundary()
    assert server.compact_bytes[-4:] == [0] * 4 and engine.compacting == 1
    monkeypatch.undo()
    copy_all = copies.copy_all

    def failing(pairs):
        if engine.compactor.current is not None:
            raise RuntimeError("injected copy failure")
        copy_all(pairs)

    monkeypatch.setattr(copies, "copy_all", failing)
    server.swap(3, c)   # the commit clears the error: compaction starts again, and fails
    assert engine.compacting == 2
    while engine.compaction_error is None and server.step < 2_000:
        server.boundary()
    assert engine.compaction_error == "layer 0: compaction copy failed: injected copy failure"
    for _ in range(3):
        server.boundary()
    assert server.compact_bytes[-3:] == [0] * 3 and engine.compacting == 2
    monkeypatch.undo()
    server.swap(4, d)
    server.compact_all()
    assert engine.compacted_layers == 2
    _assert_weights_match(model, d, 0)
