"""Balance metrics of a placement: load per GPU and max/mean GPU load per layer."""

from __future__ import annotations

import numpy as np


def replica_loads(weight, phy2log, logcnt) -> np.ndarray:
    """Load of each physical slot ``[L, R]`` float64: its expert's load / the expert's replicas.

    weight [L, E] float, phy2log [L, R] int, logcnt [L, E] int.
    """
    w = np.asarray(weight, dtype=np.float64)
    p2l = np.asarray(phy2log, dtype=np.int64)
    cnt = np.asarray(logcnt, dtype=np.int64)
    return np.take_along_axis(w / np.maximum(cnt, 1), p2l, axis=1)


def gpu_loads(weight, phy2log, logcnt, num_gpus) -> np.ndarray:
    """weight [L, E] float, phy2log [L, R] int, logcnt [L, E] -> [L, num_gpus] load per GPU,
    an expert's load split evenly over its replicas (GPU g holds slots g*R/P .. (g+1)*R/P - 1)."""
    loads = replica_loads(weight, phy2log, logcnt)
    layers, replicas = loads.shape
    return loads.reshape(layers, int(num_gpus), replicas // int(num_gpus)).sum(-1)


def balance_of_gpu_loads(loads) -> np.ndarray:
    """[L, P] GPU loads -> [L] max / mean (1.0 where a layer has no load)."""
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean(-1)
    out = np.ones(loads.shape[0])
    nz = mean > 0
    out[nz] = loads.max(-1)[nz] / mean[nz]
    return out


def balance(weight, phy2log, logcnt, num_gpus) -> np.ndarray:
    """[L] max GPU load / mean GPU load per layer (1.0 if mean == 0)."""
    return balance_of_gpu_loads(gpu_loads(weight, phy2log, logcnt, num_gpus))
