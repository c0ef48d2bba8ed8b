"""Layer profiles: per-layer times and memory, loaded from YAML/JSON or built in Python.

File format (YAML or JSON)::

    name: my-model            # optional
    layers:                   # in model order
      - name: embed           # optional
        kind: embedding       # optional: embedding | dense | moe | head
        F: 0.4e-3             # forward seconds per micro-batch
        B: 0.8e-3             # full backward seconds (input + weight gradients)
        W: 0.4e-3             # weight-gradient part of B (<= B), deferred by ZB-style schedules
        activation_bytes: 1.2e9   # activations kept per micro-batch until the backward
        param_bytes: 6.0e9        # parameters + gradients + optimizer state
        ep_imbalance: 1.25        # MoE only: max/mean GPU load of its EP plan (>= 1), scales F/B/W
        repeat: 58                # optional: this entry stands for 58 identical layers

Errors name the entry (``layers[3].W``) and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expertplane.errors import FieldError, one_line

KINDS = ("embedding", "dense", "moe", "head")
_FIELDS = {"name", "kind", "F", "B", "W", "activation_bytes", "param_bytes", "ep_imbalance",
           "repeat"}


@dataclass(frozen=True)
class Layer:
    """One layer. Times in seconds per micro-batch, memory in bytes.

    ``ep_imbalance`` (MoE layers, >= 1) multiplies the times: the slowest GPU of the expert-
    parallel group sets the layer's pace. ``times`` gives the scaled ``(F, B, W)``.
    """

    F: float
    B: float
    W: float = 0.0
    activation_bytes: float = 0.0
    param_bytes: float = 0.0
    kind: str = "dense"
    name: str = ""
    ep_imbalance: float = 1.0

    @property
    def times(self) -> tuple[float, float, float]:
        k = self.ep_imbalance
        return (self.F * k, self.B * k, self.W * k)


@dataclass(frozen=True)
class Profile:
    """A model's layers in order, with their per-layer arrays (shape ``[L]``)."""

    layers: tuple[Layer, ...]
    name: str = ""

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def times(self) -> np.ndarray:
        """``[L, 3]`` scaled ``(F, B, W)`` seconds."""
        return np.array([layer.times for layer in self.layers], dtype=float)

    @property
    def activation_bytes(self) -> np.ndarray:
        return np.array([layer.activation_bytes for layer in self.layers], dtype=float)

    @property
    def param_bytes(self) -> np.ndarray:
        return np.array([layer.param_bytes for layer in self.layers], dtype=float)


def _number(entry: Mapping, key: str, where: str, default: float | None = None,
            minimum: float = 0.0) -> float:
    if key not in entry:
        if default is None:
            raise FieldError(f"{where}.{key}", "is required")
        return default
    value = entry[key]
    if isinstance(value, str):  # PyYAML (YAML 1.1) reads exponents without a dot/sign, e.g. 1e9, as str
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < minimum:
        raise FieldError(f"{where}.{key}", f"must be a finite number >= {minimum:g}, "
                                               f"got {value!r}")
    return float(value)


def layer_from_mapping(entry: Mapping, where: str = "layers[0]") -> Layer:
    """Validate one layer mapping (keys as in the file format, without ``repeat``)."""
    if isinstance(entry, Layer):
        return entry
    if not isinstance(entry, Mapping):
        raise FieldError(where, f"must be a mapping with keys F, B, W, got {type(entry).__name__}")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise FieldError(f"{where}.{sorted(unknown)[0]}",
                             f"unknown field (known: {', '.join(sorted(_FIELDS))})")
    f, b = _number(entry, "F", where), _number(entry, "B", where)
    w = _number(entry, "W", where, 0.0)
    if w > b:
        raise FieldError(f"{where}.W", f"must be <= B ({b:g}), got {w:g}")
    kind = entry.get("kind", "dense")
    if kind not in KINDS:
        raise FieldError(f"{where}.kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    imbalance = _number(entry, "ep_imbalance", where, 1.0, minimum=1.0)
    if imbalance != 1.0 and kind != "moe":
        raise FieldError(f"{where}.ep_imbalance", f"only applies to kind moe, not {kind}")
    name = entry.get("name", "")
    if not isinstance(name, str):
        raise FieldError(f"{where}.name", f"must be a string, got {name!r}")
    return Layer(f, b, w, _number(entry, "activation_bytes", where, 0.0),
                 _number(entry, "param_bytes", where, 0.0), kind, name, imbalance)


def profile_from_layers(layers, name: str = "", field: str = "layers") -> Profile:
    """A ``Profile`` from a profile, or a sequence of ``Layer``s or mappings (``repeat`` allowed)."""
    if isinstance(layers, Profile):
        return layers
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise FieldError(field, "must be a sequence of layer mappings")
    out: list[Layer] = []
    for i, entry in enumerate(layers):
        where = f"{field}[{i}]"
        repeat = 1
        if isinstance(entry, Mapping) and "repeat" in entry:
            repeat = entry["repeat"]
            if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
                raise FieldError(f"{where}.repeat", f"must be an integer >= 1, got {repeat!r}")
            entry = {k: v for k, v in entry.items() if k != "repeat"}
        out.extend([layer_from_mapping(entry, where)] * repeat)
    if not out:
        raise FieldError(field, "must hold at least one layer")
    return Profile(tuple(out), name)


def load_profile(path: str | Path) -> Profile:
    """Read a profile from a ``.yaml``/``.yml``/``.json`` file (format in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile: no such file: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FieldError("profile", f"{path} is not valid JSON: {one_line(exc)}") from None
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise FieldError("profile", f"{path} is not valid YAML: {one_line(exc)}") from None
    else:
        raise FieldError("profile", f"unsupported file type {path.suffix!r} (use .yaml or .json)")
    if not isinstance(doc, Mapping) or "layers" not in doc:
        raise FieldError("profile", f"{path} must be a mapping with a 'layers' list")
    name = doc.get("name", path.stem)
    return profile_from_layers(doc["layers"], str(name))


def shipped_profiles() -> dict[str, Path]:
    """The example profiles shipped in ``expertplane/planner/profiles`` by name."""
    folder = Path(__file__).resolve().parent.parent / "profiles"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}
