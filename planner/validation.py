"""Input checks for the planner: every failure raises ``FieldError`` naming the argument."""

from __future__ import annotations

import numbers

import numpy as np

from expertplane.errors import FieldError


def as_int(value, field: str, *, minimum: int = 1) -> int:
    """Return ``value`` as a Python int; rejects bools, floats with a fraction and values < minimum."""
    if isinstance(value, (bool, np.bool_)):
        raise FieldError(field, f"must be an integer, got {value!r}")
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # 0-d numpy / torch scalar
        value = value.item()
    if isinstance(value, numbers.Integral):
        out = int(value)
    elif isinstance(value, float) and value.is_integer():
        out = int(value)
    else:
        raise FieldError(field, f"must be an integer, got {value!r}")
    if out < minimum:
        raise FieldError(field, f"must be >= {minimum}, got {out}")
    return out


def as_array(value, field: str) -> np.ndarray:
    """Convert a torch tensor, numpy array or nested list to a numpy array (no copy if possible)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor without importing torch
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise FieldError(field, f"cannot be read as an array: {exc}") from None


# The largest total load of one layer: "deepseek" adds loads in float32 (bit-exact with
# DeepSeek's EPLB), so a layer's sum must stay below float32's largest value.
MAX_LAYER_LOAD = float(np.finfo(np.float32).max)


def check_loads(weight, field: str = "weight") -> np.ndarray:
    """Check a load matrix ``[L, E]``: 2-D, numeric, finite, non-negative, non-empty.

    Returns it as a new float64 array.
    """
    a = as_array(weight, field)
    if a.ndim != 2:
        raise FieldError(field, f"must be 2-D [layers, experts], got shape {list(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise FieldError(field, f"must not be empty, got shape {list(a.shape)}")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.number)):
        raise FieldError(field, f"must be numeric, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.complexfloating):
        raise FieldError(field, "must be real, got complex values")
    a = a.astype(np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        layer, expert = np.argwhere(bad)[0]
        raise FieldError(field, f"must be finite, got {a[layer, expert]} at layer {layer}, "
                                    f"expert {expert}")
    if (a < 0).any():
        layer, expert = np.argwhere(a < 0)[0]
        raise FieldError(field, f"must be non-negative, got {a[layer, expert]} at layer "
                                    f"{layer}, expert {expert}")
    totals = a.sum(axis=1)
    if (totals >= MAX_LAYER_LOAD).any():
        layer = int(np.argmax(totals >= MAX_LAYER_LOAD))
        raise FieldError(field, f"layer {layer} sums to {totals[layer]:.3g}, beyond "
                                    f"{MAX_LAYER_LOAD:.3g} (the planner adds loads in float32, as "
                                    "DeepSeek's EPLB does): scale the loads down")
    return a


def check_rebalance_args(weight, num_replicas, num_groups, num_nodes, num_gpus) -> np.ndarray:
    """Validate the arguments of ``rebalance_experts``; returns ``weight`` as float64 ``[L, E]``.

    Rules: weight 2-D finite non-negative; num_replicas >= experts and a multiple of num_gpus;
    num_groups divides the expert count; num_gpus a multiple of num_nodes.
    """
    w = check_loads(weight)
    num_experts = w.shape[1]
    num_replicas = as_int(num_replicas, "num_replicas")
    num_groups = as_int(num_groups, "num_groups")
    num_nodes = as_int(num_nodes, "num_nodes")
    num_gpus = as_int(num_gpus, "num_gpus")
    if num_replicas < num_experts:
        raise FieldError("num_replicas", f"must be >= the number of experts ({num_experts}), "
                                             f"got {num_replicas}")
    if num_replicas % num_gpus:
        raise FieldError("num_replicas", f"must be a multiple of num_gpus ({num_gpus}), "
                                             f"got {num_replicas}")
    if num_experts % num_groups:
        hint = ""
        if w.shape[0] % num_groups == 0 and w.shape[0] > num_experts:
            hint = (f"; the loads' shape {list(w.shape)} looks transposed: they must be "
                    f"[layers, experts], i.e. [{w.shape[1]}, {w.shape[0]}]")
        raise FieldError("num_groups", f"must divide the number of experts ({num_experts}), "
                                       f"got {num_groups}{hint}")
    if num_gpus % num_nodes:
        raise FieldError("num_gpus", f"must be a multiple of num_nodes ({num_nodes}), "
                                         f"got {num_gpus}")
    return w


def check_phy2log(phy2log, num_logical: int, field: str = "phy2log") -> np.ndarray:
    """Check a placement ``[L, R]`` of logical ids in ``[0, num_logical)``; returns int64 copy."""
    a = as_array(phy2log, field)
    if a.ndim != 2:
        raise FieldError(field, f"must be 2-D [layers, replicas], got shape {list(a.shape)}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.floating) or not np.all(np.mod(a, 1) == 0):
            raise FieldError(field, f"must hold integer expert ids, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= num_logical):
        raise FieldError(field, f"expert ids must lie in [0, {num_logical}), got range "
                                    f"[{a.min()}, {a.max()}]")
    return a


def check_plan(phy2log, logcnt, log2phy, num_logical, num_gpus, num_nodes=None, num_groups=None,
               hierarchical=False) -> None:
    """Check that a plan is valid and self-consistent; raises ``FieldError`` otherwise.

    phy2log [L, R], logcnt [L, E], log2phy [L, E, X] (-1 padded). Checks: every logical expert
    has >= 1 replica; logcnt counts phy2log; R divisible by num_gpus; log2phy lists exactly the
    slots of each expert (each once) and phy2log agrees; with ``hierarchical`` all replicas of
    each expert group lie on a single node (nodes own equal contiguous slot ranges).
    """
    num_logical = as_int(num_logical, "num_logical")
    num_gpus = as_int(num_gpus, "num_gpus")
    p2l = check_phy2log(phy2log, num_logical)
    layers, replicas = p2l.shape
    if replicas % num_gpus:
        raise FieldError("phy2log", f"replica count {replicas} is not a multiple of "
                                        f"num_gpus ({num_gpus})")
    cnt = as_array(logcnt, "logcnt").astype(np.int64)
    if cnt.shape != (layers, num_logical):
        raise FieldError("logcnt", f"must have shape {[layers, num_logical]}, got "
                                       f"{list(cnt.shape)}")
    counted = np.zeros((layers, num_logical), dtype=np.int64)
    np.add.at(counted, (np.arange(layers)[:, None], p2l), 1)
    if (counted == 0).any():
        layer, expert = np.argwhere(counted == 0)[0]
        raise FieldError("phy2log", f"logical expert {expert} has no replica in layer {layer}")
    if not np.array_equal(counted, cnt):
        layer, expert = np.argwhere(counted != cnt)[0]
        raise FieldError("logcnt", f"layer {layer} expert {expert}: logcnt says "
                                       f"{cnt[layer, expert]}, phy2log holds {counted[layer, expert]}")
    l2p = as_array(log2phy, "log2phy").astype(np.int64)
    if l2p.ndim != 3 or l2p.shape[:2] != (layers, num_logical) or l2p.shape[2] < cnt.max():
        raise FieldError("log2phy", f"must have shape [{layers}, {num_logical}, >= "
                                        f"{cnt.max()}], got {list(l2p.shape)}")
    valid = l2p >= 0
    if not np.array_equal(valid.sum(-1), cnt):
        raise FieldError("log2phy", "number of listed slots differs from logcnt")
    if (l2p >= replicas).any():
        raise FieldError("log2phy", f"slot ids must lie in [-1, {replicas})")
    lay, exp, _ = np.nonzero(valid)
    if not np.array_equal(p2l[lay, l2p[valid]], exp):
        raise FieldError("log2phy", "lists a slot whose phy2log expert differs")
    seen = np.zeros((layers, replicas), dtype=np.int64)
    np.add.at(seen, (lay, l2p[valid]), 1)
    if (seen != 1).any():
        raise FieldError("log2phy", "must list every physical slot exactly once per layer")
    if hierarchical:
        if num_nodes is None or num_groups is None:
            raise FieldError("hierarchical", "needs num_nodes and num_groups")
        num_nodes = as_int(num_nodes, "num_nodes")
        num_groups = as_int(num_groups, "num_groups")
        group_size = num_logical // num_groups
        slot_node = np.arange(replicas) // (replicas // num_nodes)
        group = p2l // group_size
        node_of = np.full((layers, num_groups), -1, dtype=np.int64)
        node_of[np.arange(layers)[:, None], group] = slot_node[None, :]
        if (node_of[np.arange(layers)[:, None], group] != slot_node[None, :]).any():
            raise FieldError("phy2log", "hierarchical plan puts one expert group on several "
                                            "nodes")
