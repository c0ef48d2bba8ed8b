"""Read an engine's load file or directory for ``expertplane plan --loads``.

* a directory with ``meta_info.json``: TensorRT-LLM statistics (rows = the decoder layers found);
* another directory: SGLang dumps (``expert_distribution_recorder_*.pt``), summed;
* an SGLang dump file (a ``.pt`` dict with ``logical_count`` or ``records``);
* anything else: the planner's own formats (``planner.io.load_loads``).

SGLang's rows are hidden layers; its MoE layers are the rows that carry load (dense layers are
all-zero rows) unless the caller names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expertplane.engines import sglang_dumps, trtllm
from expertplane.errors import FieldError
from expertplane.planner.io import load_loads


@dataclass(frozen=True)
class EngineLoads:
    """Loads float64 ``[L, E]`` of the MoE layers ``layers`` (hidden/decoder-layer index of each
    row; None when the source does not say) of a model with ``num_hidden_layers`` (or None)."""

    loads: np.ndarray
    layers: tuple[int, ...] | None
    num_hidden_layers: int | None
    source: str


def _is_sglang_dump(path: Path) -> bool:
    if path.suffix.lower() != ".pt" or not path.is_file():
        return False
    return bool(sglang_dumps._NAME.search(path.name)) or _dump_keys(path)


def _dump_keys(path: Path) -> bool:
    try:
        content = sglang_dumps._load(path, "loads")
    except FieldError:
        return False
    return isinstance(content, dict) and ("logical_count" in content or "records" in content)


def read_loads(path, moe_layers: tuple[int, ...] | None = None) -> EngineLoads:
    """The loads at ``path``; ``moe_layers`` picks the MoE rows of an SGLang dump (default: the
    rows with load)."""
    path = Path(path)
    if trtllm.is_statistic_dir(path):
        loads, layers = trtllm.statistic_loads(path)
        return EngineLoads(loads, layers, None, "trtllm")
    if path.is_dir() or _is_sglang_dump(path):
        hidden = (sglang_dumps.directory_loads(path) if path.is_dir()
                  else sglang_dumps.dump_loads(path))
        rows = moe_layers if moe_layers is not None else sglang_dumps.moe_rows(hidden)
        if not rows:
            raise FieldError("loads", f"{path}: every layer's count is zero (no traffic recorded)")
        if max(rows) >= hidden.shape[0]:
            raise FieldError("moe_layers", f"layer {max(rows)} is beyond the dump's "
                                           f"{hidden.shape[0]} hidden layers")
        return EngineLoads(hidden[list(rows)], tuple(rows), int(hidden.shape[0]), "sglang")
    return EngineLoads(load_loads(path), None, None, "file")


def parse_layers(text: str, field: str = "--moe-layers") -> tuple[int, ...]:
    """``"3-60"`` / ``"1,3,5-7"`` -> sorted distinct layer indices."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            a, b = int(lo), int(hi or lo)
            if a < 0 or b < a:
                raise ValueError
            out.update(range(a, b + 1))
    except ValueError:
        raise FieldError(field, f"must be layer indices like 3-60 or 1,3,5-7, got {text!r}") from None
    return tuple(sorted(out))
