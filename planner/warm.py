"""Compile every placement kernel of the planner into numba's on-disk cache.

``python -m expertplane.planner.warm`` is the background build that ``planner.compiled`` starts
when the cache lacks a kernel; ``expertplane warm`` runs the same steps (plus the pipeline
partitioner) in the foreground. Kernels compile per argument type (and parallel ones per array
layout), not per size, so small plans of every algorithm, under both policies (hierarchical:
groups on nodes; global), fresh and movement-aware, go through every kernel the real plans use.
Only one build runs per cache folder at a time: a second one waits for the first (a file lock),
then finds everything cached.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ALGORITHMS = ("deepseek", "balanced", "topology")


def step_label(algorithm: str, hierarchical: bool) -> str:
    """The label of the step that compiles the kernels of ``algorithm`` under one policy (its
    line in the build's output is ``i/n <label>: seconds``)."""
    return f"planner {'hierarchical' if hierarchical else 'global'}-{algorithm}"


def placement_cases() -> list[tuple[str, str, int]]:
    """(label, algorithm, nodes) of each small plan: 4 groups of 8 experts, 48 slots on 4 GPUs
    per node; 2 nodes give the hierarchical policy, 3 the global one (topology is hierarchical
    only)."""
    return [(step_label(algorithm, nodes == 2), algorithm, nodes)
            for algorithm in ALGORITHMS
            for nodes in (2, 3)
            if (algorithm, nodes) != ("topology", 3)]


def plan_twice(algorithm: str, num_experts: int, num_replicas: int, num_groups: int,
               num_nodes: int, num_gpus: int) -> None:
    """One layer planned fresh, then movement-aware on the reversed load (so that every stage of
    the re-planning has work), as ``rebalance_experts`` plans them."""
    from expertplane.planner.eplb import rebalance_experts

    load = (1.0 + np.random.default_rng(0).permutation(num_experts))[None, :] ** -1.0
    phy2log, _, _ = rebalance_experts(load, num_replicas, num_groups, num_nodes, num_gpus,
                                      algorithm=algorithm)
    rebalance_experts(load[:, ::-1].copy(), num_replicas, num_groups, num_nodes, num_gpus,
                      algorithm=algorithm, previous=phy2log.numpy())


def _sizing_and_bounds() -> None:
    from expertplane.planner.sizing import recommend_redundancy

    load = (1.0 + np.random.default_rng(0).permutation(32))[None, :] ** -1.0
    for nodes, redundant in ((2, 8), (3, 4)):      # 40 slots on 8 GPUs, 36 on 12 GPUs
        recommend_redundancy(load, 4, nodes, 4 * nodes, 1.05, [redundant], "deepseek")


def _transfers() -> None:
    from expertplane.planner.transfers import plan_transfers

    # 2 ranks of 2 slots: rank 0 copies expert 1 locally, rank 1 receives 0 once and dups it
    plan_transfers(np.array([[0, 1, 2, 3]]), np.array([[1, 1, 0, 0]]), 2)


def steps() -> list[tuple[str, Callable[[], None]]]:
    """(label, callable) of every step."""
    out: list[tuple[str, Callable[[], None]]] = [
        (label, lambda a=algorithm, n=nodes: plan_twice(a, 32, 48, 4, n, 4 * n))
        for label, algorithm, nodes in placement_cases()]
    return out + [("sizing and bounds", _sizing_and_bounds), ("transfers", _transfers)]


@contextmanager
def one_build_at_a_time() -> Iterator[None]:
    """Hold an exclusive lock on ``expertplane-warm.lock`` in numba's cache folder (or the
    planner's ``__pycache__``) while building; where neither is writable, build unlocked."""
    from numba.core import config

    folder = Path(config.CACHE_DIR or Path(__file__).parent / "__pycache__")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / "expertplane-warm.lock", "a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def run(report: Callable[[str], None] = lambda text: None) -> float:
    """Run every step with the compiled kernels (compiling what the cache lacks); ``report``
    gets one line per step (``i/n label: seconds``). Returns the seconds taken."""
    from expertplane.planner.compiled import forced_mode

    start = time.perf_counter()
    with one_build_at_a_time(), forced_mode("numba"):
        todo = steps()
        for i, (label, step) in enumerate(todo, 1):
            t = time.perf_counter()
            step()
            report(f"{i}/{len(todo)} {label}: {time.perf_counter() - t:.1f} s")
    return time.perf_counter() - start


if __name__ == "__main__":
    run(lambda line: print(line, flush=True))
