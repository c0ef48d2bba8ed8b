"""What an engine plugin reports when the engine loads it: in effect or not, in one line.

Engines load plugins from entry points and only log their exceptions (SGLang) or carry on
(vLLM), so a plugin that is not in effect would go unnoticed: each plugin's ``install()``
returns an :class:`InstallResult`, and ``register()`` announces it with :func:`announce`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass


@dataclass(frozen=True)
class InstallResult:
    """Whether the plugin is in effect, and the one line that says so (or why not)."""

    in_effect: bool
    message: str


def announce(result: InstallResult, log: logging.Logger) -> InstallResult:
    """Log ``result.message`` on ``log``: INFO when in effect, ERROR when not. Returns it."""
    (log.info if result.in_effect else log.error)("%s", result.message)
    return result
