"""TensorRT-LLM: expert statistics in, ``MoeLoadBalancerConfig`` out.

Statistics (``EXPERT_STATISTIC_PATH`` with ``EXPERT_STATISTIC_ITER_RANGE``): ``meta_info.json``
(``num_experts``, ``num_experts_per_token``) and ``rank{N}.safetensors`` holding one int64
bincount ``[num_experts]`` per key ``"{iter}_{layer}"``, ``layer`` the *decoder* layer index
(DeepSeek-V3: 3..60). Newer versions also write ``rank{N}_raw.safetensors``, skipped here as by
TensorRT-LLM's own reader. With its load balancer on, the counts are per slot, not per expert.

Placement: the YAML of ``moe_config.load_balancer``: ``num_slots``,
``initial_global_assignments: {decoder layer: [expert of each slot]}``,
``layer_updates_per_iter: 0`` (static).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from expertplane.errors import FieldError, one_line

_RANK_FILE = re.compile(r"rank(\d+)\.safetensors$")
_KEY = re.compile(r"(\d+)_(\d+)$")


def is_statistic_dir(path) -> bool:
    """A directory holding TensorRT-LLM's ``meta_info.json``."""
    return Path(path).is_dir() and (Path(path) / "meta_info.json").is_file()


def statistic_loads(directory) -> tuple[np.ndarray, tuple[int, ...]]:
    """Counts summed over ranks and iterations: (float64 ``[moe_layers, num_experts]``, the
    decoder-layer index of each row, increasing)."""
    from safetensors import safe_open

    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta_info.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FieldError("loads", f"cannot read {directory}/meta_info.json: {one_line(exc)}") from None
    experts = meta.get("num_experts") if isinstance(meta, dict) else None
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise FieldError("loads", f"{directory}/meta_info.json: num_experts must be a positive "
                                  f"integer, got {experts!r}")
    files = sorted(p for p in directory.iterdir() if _RANK_FILE.fullmatch(p.name))
    if not files:
        raise FieldError("loads", f"{directory} holds no rank{{N}}.safetensors")
    per_layer: dict[int, np.ndarray] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="np") as f:
                for key in f.keys():
                    m = _KEY.fullmatch(key)
                    if not m:
                        raise FieldError("loads", f"{path.name}: key {key!r} is not "
                                                  "'{iter}_{layer}'")
                    counts = f.get_tensor(key)
                    if counts.shape != (experts,) or not np.issubdtype(counts.dtype, np.integer):
                        raise FieldError("loads", f"{path.name}[{key}] must be {experts} integer "
                                                  f"counts, got {counts.dtype} {list(counts.shape)}")
                    layer = int(m[2])
                    per_layer[layer] = per_layer.get(layer, 0) + counts.astype(np.int64)
        except FieldError:
            raise
        except Exception as exc:  # safetensors raises its own error types on corrupt files
            raise FieldError("loads", f"cannot read {path}: {one_line(exc)}") from None
    if not per_layer:
        raise FieldError("loads", f"{directory} holds no counts")
    layers = tuple(sorted(per_layer))
    return np.stack([per_layer[l] for l in layers]).astype(np.float64), layers


def load_balancer_config(phy2log, layers) -> dict:
    """``MoeLoadBalancerConfig`` content for ``phy2log`` int ``[moe_layers, slots]`` whose rows
    are the decoder layers ``layers``."""
    phy2log = np.asarray(phy2log, dtype=np.int64)
    layers = [int(l) for l in layers]
    if len(layers) != phy2log.shape[0]:
        raise FieldError("moe_layers", f"names {len(layers)} layers for a plan of "
                                       f"{phy2log.shape[0]} rows")
    return {"num_slots": int(phy2log.shape[1]),
            "initial_global_assignments": {l: row.tolist() for l, row in zip(layers, phy2log)},
            "layer_updates_per_iter": 0}
