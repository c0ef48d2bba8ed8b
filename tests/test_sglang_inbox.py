"""The SGLang recorder directory as the agent reads it: each dump once, in order; files older than
the agent are not read; a file still being written is read at the next window; a file that
stays unreadable is given up (left in place); a file that cannot be deleted is still read once."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from expertplane.engines.sglang_inbox import DumpInbox
from expertplane.engines.sglang_layout import HiddenLayout, learn_layout, moe_load
from expertplane.errors import FieldError


def _dump(directory, stamp: float, counts) -> str:
    """A ``stat`` dump as SGLang's _StatAccumulator.dump writes it (rank 0, torch.save)."""
    path = directory / f"expert_distribution_recorder_{stamp}.pt"
    torch.save({"rank": 0, "logical_count": torch.tensor(counts, dtype=torch.int32)[None],
                "average_utilization_rate_over_window": None}, path)
    return path


def test_each_new_dump_is_read_once_and_removed(tmp_path):
    _dump(tmp_path, 1.0, [[9, 9]])                     # older than the agent: never read
    inbox = DumpInbox(tmp_path)
    assert inbox.pending() == []
    _dump(tmp_path, 3.5, [[0, 0], [1, 2]])
    _dump(tmp_path, 2.5, [[0, 0], [3, 0]])
    files = inbox.wait(1.0, threading.Event())
    assert [p.name for p in files] == ["expert_distribution_recorder_2.5.pt",
                                       "expert_distribution_recorder_3.5.pt"]
    np.testing.assert_array_equal(inbox.read(files), [[0, 0], [4, 2]])
    assert inbox.pending() == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "expert_distribution_recorder_1.0.pt"]
    assert inbox.wait(0.1, threading.Event()) == []    # nothing new: returns after the wait


def test_a_truncated_dump_is_retried_then_given_up(tmp_path):
    inbox = DumpInbox(tmp_path, read_attempts=2)
    path = _dump(tmp_path, 5.0, [[1, 1]])
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])         # SGLang still writing it
    assert inbox.read(inbox.pending()) is None
    assert inbox.pending() == [path]                   # read again at the next window
    path.write_bytes(whole)
    np.testing.assert_array_equal(inbox.read(inbox.pending()), [[1, 1]])
    bad = _dump(tmp_path, 6.0, [[1, 1]])
    bad.write_bytes(b"not a torch file")
    for _ in range(2):
        assert inbox.read(inbox.pending()) is None
    assert inbox.pending() == [] and bad.exists()      # given up, left in place


def test_a_dump_that_cannot_be_deleted_is_read_once(tmp_path, monkeypatch):
    inbox = DumpInbox(tmp_path)
    path = _dump(tmp_path, 7.0, [[2, 5]])

    def read_only_mount(self, missing_ok=False):     # what unlink raises on a read-only volume
        raise OSError(30, "Read-only file system", str(self))

    monkeypatch.setattr(type(path), "unlink", read_only_mount)
    np.testing.assert_array_equal(inbox.read(inbox.pending()), [[2, 5]])
    assert path.exists() and inbox.pending() == []


def test_moe_rows_learned_from_traffic_and_checked():
    hidden = np.array([[0, 0], [3, 1], [0, 0], [2, 2]], dtype=float)
    assert learn_layout(np.zeros((4, 2)), None) is None            # no traffic: not known yet
    layout = learn_layout(hidden, None)
    assert layout == HiddenLayout(4, (1, 3))
    np.testing.assert_array_equal(moe_load(hidden, layout), [[3, 1], [2, 2]])
    assert learn_layout(np.zeros((4, 2)), (1, 2, 3)) == HiddenLayout(4, (1, 2, 3))
    with pytest.raises(FieldError, match="sglang_moe_layers: hidden layers \\[2\\]"):
        moe_load(np.array([[0, 0], [1, 1], [1, 0], [1, 1]]), layout)
    with pytest.raises(FieldError, match="5 hidden layers, earlier dumps 4"):
        moe_load(np.zeros((5, 2)), layout)
    with pytest.raises(FieldError, match="sglang_moe_layers: layer 4 is beyond"):
        learn_layout(hidden, (1, 4))
