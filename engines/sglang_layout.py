"""Which of SGLang's rows are MoE layers: SGLang's dumps and maps have one row per *hidden*
layer (DeepSeek-V3: 61, the first 3 dense and all-zero in a dump); the controller's placement
has one row per MoE layer (58)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertplane.engines.sglang_dumps import moe_rows
from expertplane.errors import FieldError


@dataclass(frozen=True)
class HiddenLayout:
    """``num_hidden_layers`` rows in SGLang; ``moe_layers``: the hidden-layer index of each MoE
    layer, increasing (row ``i`` of a placement's ``[L, ...]`` is hidden layer ``moe_layers[i]``)."""

    num_hidden_layers: int
    moe_layers: tuple[int, ...]

    def __post_init__(self) -> None:
        layers = list(self.moe_layers)
        if not layers or layers != sorted(set(layers)) or layers[0] < 0 \
                or layers[-1] >= self.num_hidden_layers:
            raise FieldError("moe_layers", f"must be increasing hidden-layer indices in "
                                           f"[0, {self.num_hidden_layers}), got {layers}")


def learn_layout(hidden: np.ndarray, moe_layers: tuple[int, ...] | None) -> HiddenLayout | None:
    """The layout of a dump's logical counts ``hidden`` ``[num_hidden_layers, E]``: the given
    ``moe_layers``, else the rows that carry load (every token passes every MoE layer, dense
    layers stay zero). None when neither is known (a window without traffic)."""
    rows = moe_layers if moe_layers is not None else moe_rows(hidden)
    if not rows:
        return None
    if max(rows) >= hidden.shape[0]:
        raise FieldError("sglang_moe_layers", f"layer {max(rows)} is beyond the dump's "
                                              f"{hidden.shape[0]} hidden layers")
    return HiddenLayout(int(hidden.shape[0]), tuple(rows))


def moe_load(hidden: np.ndarray, layout: HiddenLayout) -> np.ndarray:
    """The MoE rows of ``hidden`` ``[num_hidden_layers, E]``: ``[len(moe_layers), E]``.

    Raises ``FieldError`` when the dump has another number of hidden layers, or load on a row
    that is not a MoE layer (the layout learned or given is wrong)."""
    if hidden.shape[0] != layout.num_hidden_layers:
        raise FieldError("loads", f"the dump has {hidden.shape[0]} hidden layers, earlier dumps "
                                  f"{layout.num_hidden_layers}")
    stray = sorted(set(moe_rows(hidden)) - set(layout.moe_layers))
    if stray:
        raise FieldError("sglang_moe_layers", f"hidden layers {stray} carry load but are not "
                                              f"among the MoE layers {list(layout.moe_layers)}")
    return hidden[list(layout.moe_layers)]
