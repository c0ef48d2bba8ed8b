"""Hypothesis strategies shared by the planner's property tests (test_balanced_plans,
test_eplb_properties, test_movement_plans): placement shapes and loads.

Imported as ``import strategies`` after putting this folder on ``sys.path`` (pytest runs with
``--import-mode=importlib``, see tests/reliability_support.py for the same pattern).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

LOAD_KINDS = ("zipf", "int", "float", "zeros", "hot")


@dataclass(frozen=True)
class Shape:
    """A valid ``rebalance_experts`` shape: ``experts`` divisible by ``groups``, ``gpus`` by
    ``nodes``, ``replicas`` a multiple of ``gpus`` and >= ``experts``."""

    experts: int
    replicas: int
    groups: int
    nodes: int
    gpus: int

    @property
    def args(self) -> tuple[int, int, int, int]:
        """(num_replicas, num_groups, num_nodes, num_gpus) as ``rebalance_experts`` takes them."""
        return self.replicas, self.groups, self.nodes, self.gpus


@st.composite
def shapes(draw) -> Shape:
    """Groups in {1, 2, 4, 8} of 1-8 experts, nodes in {1, 2, 3, 4} of 1-4 GPUs (3 nodes make the
    policy global), the fewest replicas that give every expert one plus 0-3 per GPU."""
    groups = draw(st.sampled_from([1, 2, 4, 8]))
    experts = groups * draw(st.integers(1, 8))
    nodes = draw(st.sampled_from([1, 2, 3, 4]))
    gpus = nodes * draw(st.integers(1, 4))
    replicas = gpus * -(-experts // gpus) + gpus * draw(st.integers(0, 3))
    return Shape(experts, replicas, groups, nodes, gpus)


def make_load(kind: str, layers: int, experts: int, rng: np.random.Generator) -> np.ndarray:
    """Token counts float64 [layers, experts] of one ``LOAD_KINDS`` kind: heavy-tailed Zipf
    (capped at 1e5), small integers with ties and zeros, uniform floats, all zero, or one hot
    expert at ~100x."""
    if kind == "zipf":
        return np.minimum(rng.zipf(1.3, size=(layers, experts)), 1e5).astype(np.float64)
    if kind == "int":
        return rng.integers(0, 5, size=(layers, experts)).astype(np.float64)
    if kind == "float":
        return rng.random((layers, experts)) * 100
    if kind == "hot":
        w = rng.random((layers, experts))
        w[:, rng.integers(0, experts)] *= 100
        return w
    if kind == "zeros":
        return np.zeros((layers, experts))
    raise ValueError(f"kind: unknown load kind {kind!r} (choose from {LOAD_KINDS})")


@st.composite
def problems(draw) -> tuple[np.ndarray, Shape]:
    """(load [layers, experts] float64 with 1-3 layers of one of ``LOAD_KINDS``, its shape)."""
    shape = draw(shapes())
    layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    return make_load(draw(st.sampled_from(LOAD_KINDS)), layers, shape.experts, rng), shape
