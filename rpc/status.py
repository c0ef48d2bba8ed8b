"""The one mapping of errors to gRPC status codes, used by every servicer.

The classes of ``expertplane.errors`` are the client's fault or a refusal and keep their message.
Anything else escaping a handler is a bug of the server: INTERNAL, logged with its traceback.
"""

from __future__ import annotations

import logging

import grpc

from expertplane.errors import FailedPrecondition, FieldError, NotFound

log = logging.getLogger(__name__)

_CODES = ((NotFound, grpc.StatusCode.NOT_FOUND),
          (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
          (FieldError, grpc.StatusCode.INVALID_ARGUMENT))


def status_of(exc: Exception, method: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and details that answer ``exc`` raised by handler ``method``."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    log.error("%s failed", method or "handler", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
