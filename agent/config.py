"""Typed configuration of a node agent and the duration parser its CLI uses."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from expertplane.rpc.security import SecurityConfig

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ConfigError(ValueError):
    """An agent setting is invalid; ``field`` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def parse_duration(text: str, field_name: str = "duration") -> float:
    """Seconds in ``text``: "1s", "500ms", "2m", "1h" or a bare number of seconds ("0.5").

    Raises ``ConfigError`` naming ``field_name`` for anything else (negative, empty, "1 day").
    """
    m = _DURATION.match(str(text))
    if not m:
        raise ConfigError(field_name, f"invalid duration {text!r} (use e.g. 500ms, 1s, 2m, 1h)")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


@dataclass(frozen=True)
class Deadlines:
    """Per-RPC deadlines in seconds for calls from the agent to its local workers.

    ``pull``: PullCounters (short: a slow worker is skipped that round). ``prepare``: Prepare
    blocks until the new weights are staged, so it is generous. ``commit``/``abort``/``bias``:
    Commit, Abort and SetBias.
    """

    pull: float = 0.5
    prepare: float = 60.0
    commit: float = 30.0
    abort: float = 10.0
    bias: float = 5.0


@dataclass(frozen=True)
class AgentConfig:
    """Everything an ``Agent`` needs.

    ``controller``: the controller's gRPC target (host:port). ``node``: this node's name.
    ``listen``: where AgentService is served for the node's workers, ``unix:/path`` or
    ``host:port`` (port 0 picks a free one). ``interval``: seconds between counter pulls.
    ``buffer``: the most LoadReports held while waiting for ACKs (oldest dropped first).
    ``lost_after``: consecutive missed pulls after which a worker is reported WORKER_LOST.
    ``max_in_flight``: reports sent but not yet acknowledged on the load stream.
    ``ack_timeout``: seconds an in-flight report may wait for its ACK before the stream is
    re-opened. ``backoff_initial``/``backoff_max``: reconnect backoff bounds in seconds
    (exponential with jitter). ``flush_timeout``: the most seconds ``stop`` waits for the buffer
    to drain. ``hello_timeout``: seconds the controller may take to register this agent (answer
    its HELLO) before an error is logged; also how long the CLI waits before saying it is not
    registered. ``metrics``: ``host:port`` for the Prometheus endpoint, or None.
    ``security``: TLS / bearer token for the controller connection. ``local_security``: TLS / mTLS
    / bearer token of the node-local side, both the AgentService server (``tls_cert``/``tls_key``
    serve it, ``tls_ca`` requires client certs, ``token`` is required from workers) and the
    agent's calls to its workers (``tls_ca`` verifies them, the same cert/key is presented as the
    client certificate, ``token`` is sent).
    """

    controller: str
    node: str
    listen: str = "127.0.0.1:0"
    interval: float = 1.0
    buffer: int = 1024
    lost_after: int = 3
    max_in_flight: int = 64
    ack_timeout: float = 10.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    flush_timeout: float = 5.0
    hello_timeout: float = 10.0
    metrics: str | None = None
    deadlines: Deadlines = field(default_factory=Deadlines)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    local_security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        if not self.controller:
            raise ConfigError("controller", "required (host:port of the controller)")
        if not self.node or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.node):
            raise ConfigError("node", f"invalid node name {self.node!r}")
        if not self.listen:
            raise ConfigError("listen", "required (unix:/path or host:port)")
        for name in ("interval", "ack_timeout", "backoff_initial", "backoff_max", "hello_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.flush_timeout < 0:
            raise ConfigError("flush_timeout", f"must be >= 0, got {self.flush_timeout}")
        for name in ("buffer", "lost_after", "max_in_flight"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("pull", "prepare", "commit", "abort", "bias"):
            if getattr(self.deadlines, name) <= 0:
                raise ConfigError(f"deadlines.{name}", "must be > 0")
