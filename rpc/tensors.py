"""Convert numpy arrays to and from the packed tensor messages of expertplane.v1."""

from __future__ import annotations

import numpy as np

from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb


def int64_tensor(array) -> pb.Int64Tensor:
    """Pack an integer array of any shape into an ``Int64Tensor``."""
    a = np.ascontiguousarray(array, dtype=np.int64)
    return pb.Int64Tensor(shape=list(a.shape), values=a.ravel().tolist())


def double_tensor(array) -> pb.DoubleTensor:
    """Pack a float array of any shape into a ``DoubleTensor``."""
    a = np.ascontiguousarray(array, dtype=np.float64)
    return pb.DoubleTensor(shape=list(a.shape), values=a.ravel().tolist())


def to_numpy(msg, field: str, *, ndim: int | None = None, shape: tuple | None = None) -> np.ndarray:
    """Unpack an ``Int64Tensor``/``DoubleTensor``; checks element count, rank and shape.

    ``shape`` entries may be ``None`` for "any size". Raises ``FieldError`` naming ``field``.
    """
    dims = tuple(int(d) for d in msg.shape)
    n = int(np.prod(dims)) if dims else 0
    if len(msg.values) != n:
        raise FieldError(field, f"has {len(msg.values)} values but shape {list(dims)} needs {n}")
    if ndim is not None and len(dims) != ndim:
        raise FieldError(field, f"must have {ndim} dimensions, got shape {list(dims)}")
    if shape is not None:
        if len(dims) != len(shape) or any(s is not None and s != d for s, d in zip(shape, dims)):
            want = ["*" if s is None else s for s in shape]
            raise FieldError(field, f"must have shape {want}, got {list(dims)}")
    dtype = np.int64 if isinstance(msg, pb.Int64Tensor) else np.float64
    return np.asarray(msg.values, dtype=dtype).reshape(dims or (0,))  # unset tensor: empty
