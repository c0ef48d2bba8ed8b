"""SGLang's expert-distribution dumps (``/dump_expert_distribution_record``) as logical loads.

SGLang writes ``expert_distribution_recorder_{time}.pt`` (``stat`` mode, rank 0 only) or
``expert_distribution_recorder_{time}_{rank}.pt`` (``per_pass``/``per_token`` modes, one per
rank) into ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``:

* ``stat``: ``{"rank", "logical_count": int [buffer, num_hidden_layers, E], ...}``, summed over
  all ranks already; dense layers are all-zero rows.
* ``per_pass``: ``{"records": [{"forward_pass_id", "rank", "gatherer_key",
  "global_physical_count": int [num_hidden_layers, R], ...}], "last_physical_to_logical_map":
  int [num_hidden_layers, R]}``: physical-slot counts of one rank, converted to logical counts
  through the map and summed over records (and over the ranks' files).

Every reader returns float64 ``[num_hidden_layers, E]`` (rows indexed by hidden layer).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from expertplane.errors import FieldError, one_line

DUMP_GLOB = "expert_distribution_recorder_*.pt"
_NAME = re.compile(r"expert_distribution_recorder_(?P<time>\d+(?:\.\d+)?)(?:_(?P<rank>\d+))?\.pt$")


def _load(path: Path, field: str):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or unsafe pickles
        raise FieldError(field, f"cannot read {path} as an SGLang dump: {one_line(exc)}") from None


def _matrix(value, field: str, ndim: tuple[int, ...]) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor) or value.dim() not in ndim:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise FieldError(field, f"must be a tensor of {' or '.join(map(str, ndim))} dimensions, "
                                f"got {shape}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise FieldError(field, f"must hold integer counts, got {value.dtype}")
    a = value.numpy().astype(np.int64)
    if a.size and a.min() < 0:
        raise FieldError(field, "holds negative counts")
    return a


def stat_loads(dump: dict, where: str) -> np.ndarray:
    """``logical_count`` of a ``stat`` dump summed over its buffer: ``[num_hidden_layers, E]``."""
    a = _matrix(dump["logical_count"], f"{where}: logical_count", (2, 3))
    return (a.sum(axis=0) if a.ndim == 3 else a).astype(np.float64)


def per_pass_loads(dump: dict, where: str, num_logical: int | None = None) -> np.ndarray:
    """Logical counts ``[num_hidden_layers, E]`` of one rank's ``per_pass`` dump."""
    if "last_physical_to_logical_map" not in dump:
        raise FieldError(f"{where}: last_physical_to_logical_map", "missing")
    phy2log = _matrix(dump["last_physical_to_logical_map"],
                      f"{where}: last_physical_to_logical_map", (2,))
    records = dump["records"]
    if not isinstance(records, list):
        raise FieldError(f"{where}: records", f"must be a list, got {type(records).__name__}")
    layers, slots = phy2log.shape
    e = int(num_logical if num_logical is not None else phy2log.max() + 1)
    if phy2log.max() >= e:
        raise FieldError(f"{where}: last_physical_to_logical_map",
                         f"names expert {int(phy2log.max())} of {e}")
    physical = np.zeros((layers, slots), dtype=np.int64)
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "global_physical_count" not in record:
            raise FieldError(f"{where}: records[{i}].global_physical_count", "missing")
        count = _matrix(record["global_physical_count"],
                        f"{where}: records[{i}].global_physical_count", (2,))
        if count.shape != (layers, slots):
            raise FieldError(f"{where}: records[{i}].global_physical_count",
                             f"must have shape {[layers, slots]} like "
                             f"last_physical_to_logical_map, got {list(count.shape)}")
        physical += count
    out = np.zeros((layers, e), dtype=np.float64)
    np.add.at(out, (np.arange(layers)[:, None], phy2log), physical)
    return out


def dump_loads(path, num_logical: int | None = None) -> np.ndarray:
    """One SGLang dump file (``stat`` or ``per_pass``/``per_token``): ``[num_hidden_layers, E]``."""
    path = Path(path)
    dump = _load(path, "loads")
    where = f"loads: {path.name}"
    if not isinstance(dump, dict):
        raise FieldError("loads", f"{path} is not an SGLang dump (a dict), got "
                                  f"{type(dump).__name__}")
    if "logical_count" in dump:
        return stat_loads(dump, where)
    if "records" in dump:
        return per_pass_loads(dump, where, num_logical)
    raise FieldError("loads", f"{path} holds neither logical_count (stat mode) nor records "
                              f"(per_pass mode), keys {sorted(map(str, dump))}")


def dump_files(directory) -> list[Path]:
    """The SGLang dump files in ``directory``, oldest first (by the time in their name)."""
    found = []
    for p in Path(directory).glob(DUMP_GLOB):
        m = _NAME.search(p.name)
        if m:
            found.append((float(m["time"]), int(m["rank"] or 0), p))
    return [p for _, _, p in sorted(found)]


def directory_loads(directory) -> np.ndarray:
    """All dumps of a directory summed: ``[num_hidden_layers, E]`` (per_pass: every rank's file;
    stat: every window). Raises ``FieldError`` when there is none or their shapes differ."""
    files = dump_files(directory)
    if not files:
        raise FieldError("loads", f"{directory} holds no SGLang dump ({DUMP_GLOB})")
    total = None
    for path in files:
        loads = dump_loads(path)
        if total is not None and loads.shape != total.shape:
            raise FieldError("loads", f"{path.name} has shape {list(loads.shape)}, the other "
                                      f"dumps {list(total.shape)}")
        total = loads if total is None else total + loads
    return total


def moe_rows(loads: np.ndarray) -> tuple[int, ...]:
    """Rows of a dump that carry load (SGLang leaves dense layers all zero)."""
    return tuple(int(i) for i in np.flatnonzero(np.asarray(loads).sum(axis=1) > 0))
