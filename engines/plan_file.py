"""The plan-delivery file: the plan in force, as the JSON document ``expertplane plan`` writes.

The node agent writes it (atomically: temporary file, fsync, ``os.replace``) whenever the plan in
force changes; an engine plugin reads it when the engine rebalances. Its path is the env var
``EXPERTPLANE_PLAN_FILE``. Fields read here (others, like ``balance``, are carried along):

* ``placement`` (str) and ``version`` (int >= 0): which plan this is; engines apply a version once.
* ``phy2log``: int ``[moe_layers, num_physical]``, the logical expert of every physical slot of
  every MoE layer (one row per MoE layer, in model order).
* ``num_logical_experts`` (int, optional; default ``max(phy2log) + 1``).
* ``moe_layers`` (optional): the hidden-layer index of each row; ``num_hidden_layers`` (optional).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expertplane.errors import FieldError, one_line

PLAN_FILE_ENV = "EXPERTPLANE_PLAN_FILE"


class PlanFileError(FieldError):
    """A plan file that cannot be used; ``field`` names the offending field (``plan_file.<key>``)."""


@dataclass(frozen=True)
class PlanFile:
    """One plan, as read from a plan file.

    ``phy2log``: int64 ``[moe_layers, num_physical]``. ``moe_layers``: hidden-layer index of each
    row, or None when the file does not say. ``document``: the whole JSON document.
    """

    placement: str
    version: int
    phy2log: np.ndarray
    num_logical_experts: int
    moe_layers: tuple[int, ...] | None
    num_hidden_layers: int | None
    document: dict

    @property
    def num_physical(self) -> int:
        return int(self.phy2log.shape[1])


def plan_file_path(environ=os.environ) -> Path | None:
    """The path in ``EXPERTPLANE_PLAN_FILE``, or None when unset or empty."""
    value = environ.get(PLAN_FILE_ENV, "").strip()
    return Path(value) if value else None


def write_plan_file(path, doc: dict) -> None:
    """Write ``doc`` as JSON to ``path`` atomically: readers see the old file or the new, whole.

    ``doc`` must pass the same checks ``read_plan_file`` makes (raises ``PlanFileError`` first).
    """
    _parse(doc, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_plan_file(path) -> PlanFile | None:
    """Read the plan file at ``path``; None when there is no such file.

    Raises ``PlanFileError`` naming the field for anything malformed (bad JSON included).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PlanFileError("plan_file", f"cannot read {path}: {one_line(exc)}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanFileError("plan_file", f"{path} is not valid JSON: {one_line(exc)}") from None
    return _parse(doc, str(path))


def _int(doc: dict, key: str, where: str, minimum: int) -> int:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PlanFileError(f"plan_file.{key}", f"must be an integer >= {minimum} in {where}, "
                                                f"got {value!r}")
    return value


def _parse(doc, where: str) -> PlanFile:
    if not isinstance(doc, dict):
        raise PlanFileError("plan_file", f"{where} must hold a JSON object, got "
                                         f"{type(doc).__name__}")
    for key in ("placement", "version", "phy2log"):
        if key not in doc:
            raise PlanFileError(f"plan_file.{key}", f"missing in {where}")
    if not isinstance(doc["placement"], str):
        raise PlanFileError("plan_file.placement", f"must be a string in {where}")
    version = _int(doc, "version", where, 0)
    try:
        phy2log = np.asarray(doc["phy2log"])
    except ValueError:
        phy2log = np.asarray([], dtype=object)
    if phy2log.ndim != 2 or phy2log.size == 0 or not np.issubdtype(phy2log.dtype, np.integer):
        raise PlanFileError("plan_file.phy2log", f"must be a non-empty integer [layers, slots] "
                                                 f"array in {where}")
    phy2log = phy2log.astype(np.int64)
    if phy2log.min() < 0:
        raise PlanFileError("plan_file.phy2log", f"holds a negative expert id in {where}")
    num_logical = (_int(doc, "num_logical_experts", where, 1)
                   if doc.get("num_logical_experts") is not None else int(phy2log.max()) + 1)
    if phy2log.max() >= num_logical:
        raise PlanFileError("plan_file.phy2log", f"holds expert {int(phy2log.max())} but "
                                                 f"num_logical_experts is {num_logical} in {where}")
    hidden = (_int(doc, "num_hidden_layers", where, 1)
              if doc.get("num_hidden_layers") is not None else None)
    moe_layers = None
    if doc.get("moe_layers") is not None:
        raw = doc["moe_layers"]
        if (not isinstance(raw, list) or len(raw) != phy2log.shape[0]
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in raw)
                or sorted(set(raw)) != raw or (hidden is not None and raw[-1] >= hidden)):
            raise PlanFileError("plan_file.moe_layers",
                                f"must list {phy2log.shape[0]} increasing hidden-layer indices "
                                f"(one per phy2log row, each < num_hidden_layers) in {where}")
        moe_layers = tuple(raw)
    return PlanFile(doc["placement"], version, phy2log, num_logical, moe_layers, hidden, doc)
