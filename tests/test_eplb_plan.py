"""Plan utilities and metrics on hand-made cases with known answers."""

import numpy as np
import pytest

from expertplane.errors import FieldError
from expertplane.planner import balance, build_log2phy, gpu_loads, migration
from expertplane.planner.plan import replica_ranks


def test_gpu_loads_split_over_replicas():
    weight = np.array([[6.0, 2.0, 4.0]])
    phy2log = np.array([[0, 1, 0, 2]])  # expert 0 has two replicas, 3 per replica
    logcnt = np.array([[2, 1, 1]])
    assert gpu_loads(weight, phy2log, logcnt, 2).tolist() == [[5.0, 7.0]]
    assert balance(weight, phy2log, logcnt, 2).tolist() == [pytest.approx(7.0 / 6.0)]
    assert balance(np.zeros((1, 3)), phy2log, logcnt, 2).tolist() == [1.0]


def test_build_log2phy_orders_by_slot_or_rank():
    phy2log = np.array([[2, 0, 2, 1, 0, 2]])
    assert replica_ranks(phy2log).tolist() == [[0, 0, 1, 0, 1, 2]]
    log2phy, logcnt = build_log2phy(phy2log, 4)
    assert logcnt.tolist() == [[2, 1, 3, 0]]
    assert log2phy.tolist() == [[[1, 4, -1], [3, -1, -1], [0, 2, 5], [-1, -1, -1]]]
    rank = np.array([[2, 1, 0, 0, 0, 1]])
    log2phy, _ = build_log2phy(phy2log, 4, rank)
    assert log2phy[0, 2].tolist() == [2, 5, 0] and log2phy[0, 0].tolist() == [4, 1, -1]
    with pytest.raises(FieldError, match="^phyrank:"):
        build_log2phy(phy2log, 4, rank[:, :3])


def test_migration_counts_changed_slots_and_bytes():
    old = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    new = np.array([[0, 1, 3, 2], [0, 1, 2, 3]])
    m = migration(old, new, expert_bytes=1000, num_gpus=4)   # one slot per GPU: both slots receive
    assert (m.slots_moved, m.bytes_moved, m.per_layer.tolist()) == (2, 2000, [2, 0])
    with pytest.raises(FieldError, match="^previous:"):
        migration(old[:, :3], new)
    with pytest.raises(FieldError, match="^expert_bytes:"):
        migration(old, new, -1)
