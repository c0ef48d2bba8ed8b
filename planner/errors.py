"""Errors raised by the planner for bad input."""

from __future__ import annotations


class PlanInputError(ValueError):
    """An argument or array given to the planner is invalid.

    ``field`` names the offending argument; the message starts with it, e.g.
    ``"num_replicas: must be a multiple of num_gpus (8), got 30"``.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def one_line(exc: BaseException) -> str:
    """A parser's message on one line (PyYAML's, for one, spans lines with a caret diagram)."""
    return " ".join(str(exc).split())
