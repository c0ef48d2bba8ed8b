"""Plan utilities: inverse maps (log2phy, logcnt) and the migration between two placements."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertplane.errors import FieldError
from expertplane.planner.transfers import plan_transfers


def replica_ranks(phy2log) -> np.ndarray:
    """[L, R] index of each slot among its expert's slots, counted in slot order."""
    p2l = np.asarray(phy2log, dtype=np.int64)
    layers, replicas = p2l.shape
    order = np.argsort(p2l, axis=1, kind="stable")  # slots grouped by expert, slot order inside
    sorted_ids = np.take_along_axis(p2l, order, 1)
    pos = np.arange(replicas)[None, :].repeat(layers, 0)
    is_start = np.ones_like(sorted_ids, dtype=bool)
    is_start[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    start = np.maximum.accumulate(np.where(is_start, pos, 0), axis=1)
    ranks = np.empty_like(p2l)
    np.put_along_axis(ranks, order, pos - start, 1)
    return ranks


def build_log2phy(phy2log, num_logical, phyrank=None) -> tuple[np.ndarray, np.ndarray]:
    """phy2log [L, R] -> (log2phy [L, E, X] -1 padded, logcnt [L, E]); replicas ordered by phyrank
    [L, R] (replica index of each slot within its expert) when given, else by slot index.

    X is the largest replica count over all layers (as in DeepSeek's EPLB).
    """
    p2l = np.asarray(phy2log, dtype=np.int64)
    layers, replicas = p2l.shape
    num_logical = int(num_logical)
    flat_ids = (p2l + num_logical * np.arange(layers)[:, None]).ravel()
    logcnt = np.bincount(flat_ids, minlength=layers * num_logical).reshape(layers, num_logical)
    rank = replica_ranks(p2l) if phyrank is None else np.asarray(phyrank, dtype=np.int64)
    if rank.shape != p2l.shape:
        raise FieldError("phyrank", f"must have shape {list(p2l.shape)}, got {list(rank.shape)}")
    width = max(int(logcnt.max()), 1)
    if rank.size and (rank.min() < 0 or rank.max() >= width):
        raise FieldError("phyrank", f"replica indices must lie in [0, {width})")
    log2phy = np.full((layers, num_logical * width), -1, dtype=np.int64)
    np.put_along_axis(log2phy, p2l * width + rank,
                      np.broadcast_to(np.arange(replicas, dtype=np.int64), p2l.shape), 1)
    return log2phy.reshape(layers, num_logical, width), logcnt


@dataclass(frozen=True)
class Migration:
    """Change from one placement to another.

    slots_moved: physical slots whose logical expert changed (summed over layers);
    bytes_moved: bytes the hot-swap moves between GPUs for it
    (:meth:`~expertplane.planner.transfers.TransferPlan.bytes_moved`: one expert per slot
    that receives an expert its GPU did not hold); per_layer: int64 [L] slots changed per layer.
    """

    slots_moved: int
    bytes_moved: int
    per_layer: np.ndarray


def migration(previous_phy2log, phy2log, expert_bytes=0, *, num_gpus: int | None = None,
              num_nodes: int = 1) -> Migration:
    """Slots whose expert changed between ``previous_phy2log`` and ``phy2log`` (both [L, R]),
    and the bytes that change moves over ``num_gpus`` GPUs in ``num_nodes`` nodes, one expert
    being ``expert_bytes`` (``num_gpus`` is needed when slots changed and ``expert_bytes`` > 0:
    the bytes depend on which GPU holds which slot)."""
    old = np.asarray(previous_phy2log, dtype=np.int64)
    new = np.asarray(phy2log, dtype=np.int64)
    if old.shape != new.shape:
        raise FieldError("previous", f"must have the plan's shape {list(new.shape)}, got "
                                         f"{list(old.shape)}")
    if int(expert_bytes) < 0:
        raise FieldError("expert_bytes", f"must be >= 0, got {expert_bytes}")
    per_layer = (old != new).sum(axis=1).astype(np.int64)
    moved = int(per_layer.sum())
    if moved == 0 or int(expert_bytes) == 0:
        return Migration(slots_moved=moved, bytes_moved=0, per_layer=per_layer)
    if num_gpus is None:
        raise FieldError("num_gpus", "is needed to count the bytes a changed plan moves")
    if num_nodes < 1 or num_gpus % num_nodes:
        raise FieldError("num_nodes", f"must be >= 1 and divide num_gpus ({num_gpus}), "
                                      f"got {num_nodes}")
    moves = plan_transfers(old, new, num_gpus, num_gpus // num_nodes)
    return Migration(slots_moved=moved, bytes_moved=moves.bytes_moved(expert_bytes),
                     per_layer=per_layer)
