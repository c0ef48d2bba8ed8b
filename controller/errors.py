"""Errors raised by the controller's plain modules; servicers map them to gRPC status codes.

Every error names the offending field first, e.g. ``"placement: unknown placement 'x'"``.
"""

from __future__ import annotations


class ControllerError(ValueError):
    """Base class; ``field`` names the offending request field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidArgument(ControllerError):
    """Malformed input (gRPC INVALID_ARGUMENT)."""


class NotFound(ControllerError):
    """An unknown placement, version or rollout (gRPC NOT_FOUND)."""


class FailedPrecondition(ControllerError):
    """Well-formed input that the current state refuses (gRPC FAILED_PRECONDITION)."""
