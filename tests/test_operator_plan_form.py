"""The plan ConfigMap's forms (controller/operator/plan_form.py): the spec fields that choose
them, each rule refused naming its field, and every form read back as the plan it was written
from (SGLang's: hidden-layer rows, dense rows dropped on the way back)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expertplane.controller.operator.crd import SpecError
from expertplane.controller.operator.plan_form import (
    DEFAULT_FORM,
    PlanForm,
    parse_annotation,
    plan_form_from_spec,
)


def spec(engine=None, **model):
    out = {"model": {"layers": 3, "experts": 8, **model}, "topology": {"nodes": 1, "gpusPerNode": 4}}
    if engine is not None:
        out["engine"] = engine
    return out


def plan(layers=3, slots=12, experts=8, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.arange(slots) % experts) for _ in range(layers)])


def test_spec_chooses_the_form():
    assert plan_form_from_spec(spec()) == DEFAULT_FORM == PlanForm("expertplane", 0, ())
    assert plan_form_from_spec(spec("expertplane", hiddenLayers=4)) == DEFAULT_FORM
    # Dense layers first by default (DeepSeek-V3: 61 hidden layers, MoE layers 3..60).
    assert plan_form_from_spec(spec("sglang", hiddenLayers=4)) == PlanForm("sglang", 4, (1, 2, 3))
    assert plan_form_from_spec(spec("sglang", hiddenLayers=6, moeLayers=[1, 3, 5])) == \
        PlanForm("sglang", 6, (1, 3, 5))
    assert plan_form_from_spec({"engine": "sglang", "model": {"layers": 58, "experts": 256,
                                                              "hiddenLayers": 61}}).moe_layers \
        == tuple(range(3, 61))


@pytest.mark.parametrize("bad, field, message", [
    (spec("tgi"), "spec.engine", "must be one of ['expertplane', 'sglang'], got 'tgi'"),
    (spec("sglang"), "spec.model.hiddenLayers", "required with engine sglang: SGLang's map has "
                                                "one row per hidden layer"),
    (spec(moeLayers=[0, 1, 2]), "spec.model.hiddenLayers", "required with spec.model.moeLayers"),
    (spec("sglang", hiddenLayers=2), "spec.model.hiddenLayers",
     "must be >= spec.model.layers (3, the MoE layers), got 2"),
    (spec("sglang", hiddenLayers=6, moeLayers=[1, 2]), "spec.model.moeLayers",
     "must list one hidden-layer id per MoE layer (spec.model.layers: 3), got 2"),
    (spec("sglang", hiddenLayers=6, moeLayers=[1, 3, 3]), "spec.model.moeLayers",
     "must be increasing hidden-layer ids in [0, 6), got [1, 3, 3]"),
    (spec("sglang", hiddenLayers=6, moeLayers=[3, 1, 5]), "spec.model.moeLayers",
     "must be increasing"),
    (spec("sglang", hiddenLayers=6, moeLayers=[1, 3, 6]), "spec.model.moeLayers",
     "in [0, 6), got [1, 3, 6]"),
    # The default form checks the layer fields too: a wrong list is a mistake whoever reads it.
    (spec(hiddenLayers=6, moeLayers=[1, 3, 6]), "spec.model.moeLayers", "in [0, 6)"),
])
def test_bad_fields_are_refused_by_name(bad, field, message):
    with pytest.raises(SpecError) as info:
        plan_form_from_spec(bad)
    assert info.value.field == field
    assert message in info.value.message
    assert str(info.value).startswith(f"{field}: ")


def test_sglang_form_has_hidden_layer_rows_and_reads_back_its_plan():
    phy2log = plan()
    form = PlanForm("sglang", 6, (1, 3, 5))
    doc = form.document(phy2log, 8)
    assert list(doc) == ["physical_to_logical_map"]          # SGLang refuses any other key
    rows = np.array(doc["physical_to_logical_map"])
    assert rows.shape == (6, 12)
    assert np.array_equal(rows[[1, 3, 5]], phy2log)
    for dense in (0, 2, 4):                                  # every expert has a slot
        assert np.array_equal(rows[dense], np.arange(12) % 8)
    text = json.dumps(doc)
    assert np.array_equal(form.plan_rows(text), phy2log)
    # Read back as written: the annotation names the form.
    assert parse_annotation(form.annotation()) == form
    # A map with another hidden-layer count is not this plan (no restore from it).
    assert PlanForm("sglang", 7, (1, 3, 5)).plan_rows(text) is None
    assert DEFAULT_FORM.plan_rows(text).shape == (6, 12)


def test_default_form_is_the_plan_as_is():
    phy2log = plan()
    text = json.dumps(DEFAULT_FORM.document(phy2log, 8))
    assert np.array_equal(json.loads(text)["physical_to_logical_map"], phy2log)
    assert np.array_equal(DEFAULT_FORM.plan_rows(text), phy2log)
    # ConfigMaps published before forms existed carry no annotation: the default form.
    assert parse_annotation(None) == parse_annotation("") == DEFAULT_FORM
    assert parse_annotation(DEFAULT_FORM.annotation()) == DEFAULT_FORM


@pytest.mark.parametrize("text", ['{"engine": "vllm"}', "[1]", "not json",
                                  '{"engine": "sglang", "hiddenLayers": 4}',
                                  '{"engine": "sglang", "hiddenLayers": 4, "moeLayers": "x"}'])
def test_malformed_annotations_are_unreadable(text):
    assert parse_annotation(text) is None


@pytest.mark.parametrize("document", ["", "{}", '{"physical_to_logical_map": [1, 2]}',
                                      '{"physical_to_logical_map": [[1, 2], [3]]}'])
def test_unreadable_documents_give_no_plan(document):
    assert PlanForm("sglang", 2, (1,)).plan_rows(document) is None
    assert DEFAULT_FORM.plan_rows(document) is None
