"""The rows of the plan ConfigMap's ``physical_to_logical_map``, by the engine that reads it.

``expertplane`` (the default): one row per MoE layer, the controller's plan ``[L, R]`` as is.
``sglang``: the file SGLang's ``--init-expert-location`` reads: one row per *hidden* layer
``[H, R]``; the MoE layers' rows (``moe_layers``, hidden-layer ids) hold the plan, the dense rows
the layout ``slot % E`` (``planner.io.sglang_rows``), so that every row covers every expert.

The form a ConfigMap was written in is recorded in its ``expertplane.io/plan-form`` annotation,
so that a restore reads the rows back the way they were written, whatever the spec says now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from expertplane.controller.operator.crd import SpecError
from expertplane.planner.io import sglang_document

ENGINES = ("expertplane", "sglang")


@dataclass(frozen=True)
class PlanForm:
    """How a plan ``[L, R]`` (L MoE layers x R slots) is written: ``engine`` (one of
    ``ENGINES``); for ``sglang``, ``hidden_layers`` H and ``moe_layers`` (L increasing
    hidden-layer ids in [0, H)), else 0 and ()."""

    engine: str = "expertplane"
    hidden_layers: int = 0
    moe_layers: tuple[int, ...] = ()

    def document(self, phy2log: np.ndarray, num_experts: int) -> dict:
        """``{"physical_to_logical_map": rows}``: ``phy2log`` int ``[L, R]`` as is, or (sglang)
        as ``[H, R]`` with dense rows ``slot % num_experts``."""
        if self.engine == "sglang":
            return sglang_document(phy2log, self.moe_layers, self.hidden_layers, num_experts)
        return sglang_document(phy2log)

    def plan_rows(self, document: str) -> np.ndarray | None:
        """The plan int64 ``[L, R]`` in a published ``document`` (JSON text) written in this
        form: the MoE rows only. None when unreadable or, for sglang, when it does not have
        ``hidden_layers`` rows."""
        try:
            rows = np.asarray(json.loads(document)["physical_to_logical_map"], dtype=np.int64)
        except (ValueError, KeyError, TypeError):
            return None
        if rows.ndim != 2:
            return None
        if self.engine != "sglang":
            return rows
        if rows.shape[0] != self.hidden_layers:
            return None
        return rows[list(self.moe_layers)]

    def annotation(self) -> str:
        """This form as the ConfigMap annotation value (compact JSON)."""
        if self.engine != "sglang":
            return json.dumps({"engine": self.engine})
        return json.dumps({"engine": self.engine, "hiddenLayers": self.hidden_layers,
                           "moeLayers": list(self.moe_layers)}, separators=(",", ":"))


DEFAULT_FORM = PlanForm()


def parse_annotation(text: str | None) -> PlanForm | None:
    """The form an ``expertplane.io/plan-form`` annotation names; an absent annotation (a
    ConfigMap published before forms existed) is the default form; None when malformed."""
    if not text:
        return DEFAULT_FORM
    try:
        doc = json.loads(text)
        if doc.get("engine") == "sglang":
            moe = tuple(int(x) for x in doc["moeLayers"])
            return PlanForm("sglang", int(doc["hiddenLayers"]), moe)
        return DEFAULT_FORM if doc.get("engine") == "expertplane" else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def plan_form_from_spec(spec: Mapping) -> PlanForm:
    """The form an ExpertPlacement ``spec`` asks for: ``spec.engine`` with
    ``spec.model.hiddenLayers`` and ``spec.model.moeLayers`` (default: the last
    ``spec.model.layers`` hidden layers). Raises ``SpecError`` naming the CR field."""
    engine = spec.get("engine", DEFAULT_FORM.engine)
    if engine not in ENGINES:
        raise SpecError("spec.engine", f"must be one of {list(ENGINES)}, got {engine!r}")
    model = spec["model"]
    layers, hidden, moe = int(model["layers"]), model.get("hiddenLayers"), model.get("moeLayers")
    if hidden is None:
        if moe is not None:
            raise SpecError("spec.model.hiddenLayers", "required with spec.model.moeLayers")
        if engine == "sglang":
            raise SpecError("spec.model.hiddenLayers",
                             "required with engine sglang: SGLang's map has one row per hidden "
                             "layer (DeepSeek-V3: 61, of which the first 3 are dense)")
        return DEFAULT_FORM
    hidden = int(hidden)
    if hidden < layers:
        raise SpecError("spec.model.hiddenLayers", f"must be >= spec.model.layers ({layers}, "
                                                    f"the MoE layers), got {hidden}")
    moe = tuple(range(hidden - layers, hidden)) if moe is None else tuple(int(x) for x in moe)
    if len(moe) != layers:
        raise SpecError("spec.model.moeLayers", f"must list one hidden-layer id per MoE layer "
                                                 f"(spec.model.layers: {layers}), got {len(moe)}")
    if any(b <= a for a, b in zip(moe, moe[1:])) or moe[0] < 0 or moe[-1] >= hidden:
        raise SpecError("spec.model.moeLayers", f"must be increasing hidden-layer ids in "
                                                 f"[0, {hidden}), got {list(moe)}")
    if engine != "sglang":
        return DEFAULT_FORM
    return PlanForm(engine, hidden, moe)
