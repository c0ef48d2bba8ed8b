"""A container's environment and arguments as the kubelet gives them: ``valueFrom.fieldRef``
values filled in from the pod's fields, ``$(VAR)`` references to variables defined earlier
expanded (``$$`` is a literal ``$``; an undefined reference stays as written)."""

from __future__ import annotations

import re
from typing import Mapping

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """``text`` with ``$(VAR)`` replaced from ``env``."""
    def one(match):
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _REFERENCE.sub(one, text)


def container_env(container: Mapping, fields: Mapping[str, str]) -> dict[str, str]:
    """The container's variables; ``fields`` maps a fieldRef path (``metadata.namespace``) to
    its value."""
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        else:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def container_args(container: Mapping, fields: Mapping[str, str]) -> list[str]:
    """The container's ``args`` after expansion."""
    env = container_env(container, fields)
    return [expand(arg, env) for arg in container.get("args") or []]
