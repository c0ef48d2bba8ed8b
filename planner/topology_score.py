"""The arithmetic of the topology placement's score (``planner.topology``), as plain functions
of scalars or numpy arrays: the compiled kernel uses their ``njit`` versions, the numpy path
calls them on arrays, so both round every operation alike (only +, -, *, / and sqrt: IEEE
exact, unlike ``pow``/``expm1``/``log1p``, whose numpy versions may differ in the last bit).

The score uses the q-norm with q = 16 (``Q``): ``(x / mu) ** 16`` by four squarings, and the
change of a q-norm by square roots.
"""

from __future__ import annotations

import numpy as np

Q = 16   # the q of the q-norm; power_q and norm_change are written for 16 = 2 ** 4


def replica_load(w, f, count, absent, total_count):
    """Predicted load of one replica among ``count`` local ones (see ``planner.topology``)."""
    return w * f / count + w * absent / total_count


def power_q(x):
    """``x ** 16`` as four squarings."""
    x2 = x * x
    x4 = x2 * x2
    x8 = x4 * x4
    return x8 * x8


def norm_change(base, ratio):
    """``base ** (1/16) * ((1 + ratio) ** (1/16) - 1)``: the change of the q-norm when its
    16th power ``base`` changes by ``ratio * base`` (ratio > -1), without cancellation:
    ``a - 1 = (sqrt(a) - 1) (sqrt(a) + 1)`` applied four times."""
    s1 = np.sqrt(1.0 + ratio)
    s2 = np.sqrt(s1)
    s3 = np.sqrt(s2)
    s4 = np.sqrt(s3)
    root = np.sqrt(np.sqrt(np.sqrt(np.sqrt(base))))
    return root * (ratio / ((s1 + 1.0) * (s2 + 1.0) * (s3 + 1.0) * (s4 + 1.0)))
