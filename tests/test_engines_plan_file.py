"""The plan-delivery file: atomic write, read back, missing file, malformed fields named."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from expertplane.engines.plan_file import (PlanFileError, plan_file_path, read_plan_file,
                                           write_plan_file)
from expertplane.planner import rebalance_experts
from expertplane.planner.io import PlanSetup, plan_document


def _doc(version=3):
    weight = np.random.default_rng(0).integers(1, 100, size=(4, 16))
    phy2log, log2phy, logcnt = rebalance_experts(weight, 20, 4, 1, 4)
    doc = plan_document(PlanSetup(20, 4, 1, 4, "deepseek", "global"), phy2log.numpy(),
                        log2phy.numpy(), logcnt.numpy(), np.ones(4), None,
                        placement="dsv3", version=version, moe_layers=[1, 2, 3, 4],
                        num_hidden_layers=5)
    return doc


def test_round_trip_and_missing(tmp_path):
    path = tmp_path / "sub" / "plan.json"
    assert read_plan_file(path) is None
    doc = _doc()
    write_plan_file(path, doc)
    plan = read_plan_file(path)
    assert (plan.placement, plan.version, plan.num_logical_experts) == ("dsv3", 3, 16)
    assert plan.phy2log.dtype == np.int64 and plan.phy2log.shape == (4, 20)
    assert np.array_equal(plan.phy2log, np.asarray(doc["phy2log"]))
    assert plan.moe_layers == (1, 2, 3, 4) and plan.num_hidden_layers == 5
    assert plan.num_physical == 20
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temporary left over
    assert plan_file_path({"EXPERTPLANE_PLAN_FILE": str(path)}) == path
    assert plan_file_path({}) is None


def test_write_replaces_atomically(tmp_path):
    """A reader holding the old file keeps reading the old version; the path shows the new."""
    path = tmp_path / "plan.json"
    write_plan_file(path, _doc(version=1))
    with open(path) as held:
        write_plan_file(path, _doc(version=2))
        assert json.load(held)["version"] == 1
    assert read_plan_file(path).version == 2


@pytest.mark.parametrize("change, field", [
    ({"version": -1}, "plan_file.version"),
    ({"version": "7"}, "plan_file.version"),
    ({"placement": 5}, "plan_file.placement"),
    ({"phy2log": [[0, 1], [2]]}, "plan_file.phy2log"),
    ({"phy2log": [[0.5, 1.0]]}, "plan_file.phy2log"),
    ({"phy2log": [[0, -1]]}, "plan_file.phy2log"),
    ({"num_logical_experts": 4}, "plan_file.phy2log"),
    ({"moe_layers": [1, 2]}, "plan_file.moe_layers"),
    ({"moe_layers": [1, 2, 3, 9]}, "plan_file.moe_layers"),
])
def test_malformed_fields_are_named(tmp_path, change, field):
    path = tmp_path / "plan.json"
    doc = {**_doc(), **change}
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanFileError) as err:
        read_plan_file(path)
    assert err.value.field == field and str(err.value).startswith(field)
    with pytest.raises(PlanFileError):
        write_plan_file(tmp_path / "other.json", doc)
    assert not (tmp_path / "other.json").exists()


@pytest.mark.parametrize("text, field", [
    ('{"placement": "x", "version": 1', "plan_file"),  # truncated
    ("[1, 2]", "plan_file"),
    ('{"placement": "x", "version": 1}', "plan_file.phy2log"),
])
def test_bad_documents(tmp_path, text, field):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(PlanFileError) as err:
        read_plan_file(path)
    assert err.value.field == field


def test_unreadable_path_is_an_error_not_missing(tmp_path):
    os.mkdir(tmp_path / "dir.json")
    with pytest.raises(PlanFileError, match="cannot read"):
        read_plan_file(tmp_path / "dir.json")
