"""A numba kernel run by the Python interpreter: its own source, no compile.

``interpreted(kernel)`` is the kernel's Python function with every kernel it calls replaced by
that kernel's interpreted twin, so calling it compiles nothing. It computes what the compiled
kernel computes (same source; numpy scalars keep float32 arithmetic in float32), 10-1000x
slower, which suits loops with data-dependent control flow on the numpy paths of
``planner.compiled``. ``substitutes`` swaps named kernels anywhere in the call tree for faster
Python or numpy functions of the same result (``planner.numpy_paths``).
"""

from __future__ import annotations

import types
from functools import lru_cache

__all__ = ["interpreted"]


def interpreted(kernel, **substitutes):
    """The plain-Python twin of numba dispatcher ``kernel``; kernels it calls are interpreted
    too, except those named in ``substitutes`` (name -> function), which are used instead."""
    return _twin(kernel, tuple(sorted(substitutes.items())))


@lru_cache(maxsize=None)
def _twin(kernel, substitutes: tuple):
    from numba.core.dispatcher import Dispatcher

    func = kernel.py_func
    chosen = dict(substitutes)
    names = dict(func.__globals__)
    for name in func.__code__.co_names:
        if name in chosen:
            names[name] = chosen[name]
        elif isinstance(names.get(name), Dispatcher):
            names[name] = _twin(names[name], substitutes)
    return types.FunctionType(func.__code__, names, func.__name__, func.__defaults__,
                              func.__closure__)
