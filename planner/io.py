"""File loaders and writers for loads and plans (the planner's only I/O, used by the CLI).

Loads ``[L, E]`` come from .npy, .pt (tensor or dict), .json (nested list or dict) or .csv
(one row per layer). SGLang's expert-distribution dump (a dict with ``logical_count``, shape
``[..., L, E]``) is accepted and its leading window dimensions are summed.
Plans are written as JSON or YAML documents (``plan_document``) or in SGLang's
``--init-expert-location`` format (``{"physical_to_logical_map": [[...], ...]}``).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expertplane.errors import FieldError, one_line
from expertplane.planner.plan import Migration
from expertplane.planner.validation import as_array

log = logging.getLogger(__name__)
LOAD_KEYS = ("logical_count", "weight", "loads")
PLAN_KEYS = ("phy2log", "physical_to_logical_map")
FORMATS = ("json", "yaml", "sglang", "trtllm")


def _read_container(path: Path, field: str):
    """Raw content of a .npy/.pt/.json/.csv/.yaml file."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"{field}: no such file: {path}")
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:  # empty, truncated or pickled files
            raise FieldError(field, f"cannot read {path} as a .npy array: {one_line(exc)}") from None
    if suffix == ".pt":
        import torch
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
            raise FieldError(field, f"cannot read {path} as a torch file: {one_line(exc)}") from None
    if suffix == ".json":
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise FieldError(field, f"{path} is not valid JSON: {one_line(exc)}") from None
    if suffix in (".yaml", ".yml"):
        import yaml
        try:
            return yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise FieldError(field, f"{path} is not valid YAML: {one_line(exc)}") from None
    if suffix == ".csv":
        try:
            with warnings.catch_warnings():   # an empty file: the caller's shape check says so
                warnings.simplefilter("ignore", UserWarning)
                return np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError as exc:
            raise FieldError(field, f"{path} is not a numeric CSV: {one_line(exc)}") from None
    raise FieldError(field, f"unsupported file type {suffix!r} for {path} "
                                "(use .npy, .pt, .json, .csv, .yaml)")


def _pick(content, keys: tuple[str, ...], field: str, path: Path):
    if isinstance(content, dict):
        for key in keys:
            if key in content:
                return content[key]
        raise FieldError(field, f"{path} holds a mapping without any of the keys {list(keys)}")
    return content


def load_loads(path) -> np.ndarray:
    """Read a load matrix: float64 ``[L, E]``; leading dims of an SGLang dump are summed."""
    path = Path(path)
    a = as_array(_pick(_read_container(path, "loads"), LOAD_KEYS, "loads", path), "loads")
    if a.dtype == object:
        raise FieldError("loads", f"{path} holds ragged rows")
    if a.ndim < 2:
        raise FieldError("loads", f"{path} must hold a [layers, experts] array, got shape "
                                      f"{list(a.shape)}")
    if a.ndim > 2:  # SGLang: [window..., layers, experts]
        log.warning("loads: %s holds a %d-D array %s: summed over its first %d dimension(s) "
                    "(windows of an expert-distribution dump) into [layers, experts] %s", path,
                    a.ndim, list(a.shape), a.ndim - 2, list(a.shape[-2:]))
        a = a.reshape(-1, *a.shape[-2:]).sum(axis=0)
    if not np.issubdtype(a.dtype, np.number):
        raise FieldError("loads", f"{path} must hold numbers, got dtype {a.dtype}")
    return a.astype(np.float64)


def load_phy2log(path, field: str = "previous") -> np.ndarray:
    """Read a placement ``[L, R]`` from a plan document, an SGLang file or a bare array."""
    path = Path(path)
    a = as_array(_pick(_read_container(path, field), PLAN_KEYS, field, path), field)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
        raise FieldError(field, f"{path} must hold an integer [layers, replicas] array, got "
                                    f"shape {list(a.shape)} dtype {a.dtype}")
    return a.astype(np.int64)


@dataclass(frozen=True)
class PlanSetup:
    """How a plan was asked for: the problem shape and algorithm."""

    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int
    algorithm: str
    policy: str  # "hierarchical" or "global"


def plan_document(setup: PlanSetup, phy2log, log2phy, logcnt, balance,
                  migration: Migration | None, *, placement: str = "", version: int = 0,
                  moe_layers: list[int] | None = None,
                  num_hidden_layers: int | None = None) -> dict:
    """The JSON/YAML-serialisable plan: maps, per-layer predicted balance, migration summary.

    ``placement``/``version`` name the plan (the plan-delivery file needs them; the CLI writes ""
    and 0); ``moe_layers`` (hidden-layer index of each row) and ``num_hidden_layers`` are None
    when unknown.
    """
    bal = np.asarray(balance, dtype=np.float64)
    doc = {
        "placement": placement,
        "version": int(version),
        "algorithm": setup.algorithm,
        "policy": setup.policy,
        "num_layers": int(np.asarray(phy2log).shape[0]),
        "num_logical_experts": int(np.asarray(logcnt).shape[1]),
        "num_hidden_layers": num_hidden_layers,
        "moe_layers": None if moe_layers is None else [int(x) for x in moe_layers],
        "num_replicas": setup.num_replicas,
        "num_groups": setup.num_groups,
        "num_nodes": setup.num_nodes,
        "num_gpus": setup.num_gpus,
        "balance": {"per_layer": [round(float(b), 6) for b in bal],
                    "mean": round(float(bal.mean()), 6), "max": round(float(bal.max()), 6)},
        "migration": None if migration is None else {
            "slots_moved": migration.slots_moved, "bytes_moved": migration.bytes_moved,
            "per_layer": [int(x) for x in migration.per_layer]},
        "phy2log": np.asarray(phy2log).tolist(),
        "log2phy": np.asarray(log2phy).tolist(),
        "logcnt": np.asarray(logcnt).tolist(),
    }
    return doc


def sglang_rows(phy2log, moe_layers=None, num_hidden_layers: int | None = None,
                num_logical_experts: int | None = None) -> np.ndarray:
    """SGLang's expert-location map: one row per *hidden* layer, int64 ``[H, R]``.

    ``phy2log`` ``[L, R]`` holds the MoE layers ``moe_layers`` (hidden-layer indices; default the
    last ``L`` of ``num_hidden_layers``). The other (dense) rows get the trivial layout
    ``slot % E``, so that every row covers every logical expert as SGLang's static dispatch
    needs. Without ``num_hidden_layers`` the rows are returned as they are.
    """
    phy2log = np.asarray(phy2log, dtype=np.int64)
    if num_hidden_layers is None:
        return phy2log
    layers, slots = phy2log.shape
    if moe_layers is None:
        if layers > num_hidden_layers:
            raise FieldError("num_hidden_layers", f"{num_hidden_layers} is fewer than the plan's "
                                                  f"{layers} MoE layers")
        moe_layers = range(num_hidden_layers - layers, num_hidden_layers)
    moe_layers = [int(x) for x in moe_layers]
    if len(moe_layers) != layers or len(set(moe_layers)) != layers or \
            min(moe_layers) < 0 or max(moe_layers) >= num_hidden_layers:
        raise FieldError("moe_layers", f"must name {layers} distinct hidden layers in "
                                       f"[0, {num_hidden_layers}), got {moe_layers}")
    experts = int(num_logical_experts or phy2log.max() + 1)
    if slots < experts:
        raise FieldError("num_replicas", f"{slots} slots cannot hold all {experts} experts in "
                                         "a dense layer's row")
    rows = np.tile(np.arange(slots, dtype=np.int64) % experts, (num_hidden_layers, 1))
    rows[moe_layers] = phy2log
    return rows


def sglang_document(phy2log, moe_layers=None, num_hidden_layers: int | None = None,
                    num_logical_experts: int | None = None) -> dict:
    """SGLang ``--init-expert-location`` content: ``physical_to_logical_map`` ``[H][R]``, one
    row per hidden layer (``sglang_rows``)."""
    rows = sglang_rows(phy2log, moe_layers, num_hidden_layers, num_logical_experts)
    return {"physical_to_logical_map": rows.tolist()}


def format_for(path, fmt: str | None) -> str:
    """Output format: ``fmt`` if given, else from the file suffix (.yaml/.yml -> yaml, else json)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise FieldError("format", f"must be one of {list(FORMATS)}, got {fmt!r}")
        return fmt
    return "yaml" if path is not None and Path(path).suffix.lower() in (".yaml", ".yml") else "json"


def dump_document(doc: dict, fmt: str) -> str:
    """Serialise a document: YAML for ``yaml``, compact-row JSON otherwise."""
    if fmt == "yaml":
        import yaml
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=1 << 16)
    return json.dumps(doc) + "\n"
