"""expertplane.agent: the node agent (one per GPU node).

``Agent`` (agent.py) ties together: ``WorkerRegistry`` (registry.py, who registered through the
``AgentService`` of service.py), ``Collector`` (collector.py, counter pulls -> LoadReports via
reports.py, GPU stats from gpu.py), ``ReportBuffer`` (buffer.py, bounded, ACK-driven),
``LoadUplink`` (uplink.py, the ReportLoad stream), ``RolloutRelay`` (rollout.py, the Connect
stream), both kept open by reconnect.py; metrics.py holds its Prometheus metrics and config.py
its typed configuration. See docs/agent.md.
"""

from expertplane.agent.agent import Agent
from expertplane.agent.config import AgentConfig, ConfigError, Deadlines, parse_duration

__all__ = ["Agent", "AgentConfig", "ConfigError", "Deadlines", "parse_duration"]
