"""Errors for bad input and refused requests, each naming the offending field.

This module imports nothing, so every package (the planner included) raises these. The message
starts with the field, e.g. ``"num_replicas: must be a multiple of num_gpus (8), got 30"``;
``field`` and ``message`` are kept apart so that a caller can re-address an error (``at``)
without parsing its text. ``rpc.status.status_code`` is the one mapping of these classes to gRPC
status codes.
"""

from __future__ import annotations


class FieldError(ValueError):
    """Malformed input (gRPC INVALID_ARGUMENT); ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def at(self, field: str) -> FieldError:
        """The same error (same class) about ``field``, e.g. a planner argument named as the
        request field that carried it."""
        err = type(self).__new__(type(self))
        err.__dict__.update(self.__dict__)       # a subclass's own attributes stay
        FieldError.__init__(err, field, self.message)
        return err


class NotFound(FieldError):
    """An unknown placement, version or rollout (gRPC NOT_FOUND)."""


class FailedPrecondition(FieldError):
    """Well-formed input that the current state refuses (gRPC FAILED_PRECONDITION)."""


def one_line(exc: BaseException) -> str:
    """A parser's message on one line (PyYAML's, for one, spans lines with a caret diagram)."""
    return " ".join(str(exc).split())
