"""Prometheus metrics of one agent, in a registry of its own (several agents may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class AgentMetrics:
    """Counters, gauges and histograms of one agent; ``serve`` exposes them over HTTP."""

    def __init__(self, node: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        labels = {"registry": self.registry}
        self.reports_sent = Counter("expertplane_agent_reports_sent",
                                    "LoadReports written to the controller stream (resends included)",
                                    **labels)
        self.reports_acked = Counter("expertplane_agent_reports_acked",
                                     "LoadAcks received, by status", ["status"], **labels)
        self.reports_dropped = Counter("expertplane_agent_reports_dropped",
                                       "LoadReports dropped because the send buffer was full", **labels)
        self.buffer_depth = Gauge("expertplane_agent_buffer_depth",
                                  "LoadReports held waiting for an ACK", **labels)
        self.workers = Gauge("expertplane_agent_workers", "registered local workers", **labels)
        self.reconnects = Counter("expertplane_agent_reconnects",
                                  "controller streams re-opened, by stream", ["stream"], **labels)
        self.pull_latency = Histogram("expertplane_agent_pull_latency_seconds",
                                      "PullCounters round trip to a local worker",
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                               0.5, 1.0, 2.5), **labels)
        self.pull_failures = Counter("expertplane_agent_pull_failures",
                                     "PullCounters calls that failed or timed out", **labels)
        self.snapshots_duplicate = Counter(
            "expertplane_agent_snapshots_duplicate",
            "counter snapshots a worker sent again that were already counted (not reported twice)",
            **labels)
        self.workers_lost = Counter("expertplane_agent_workers_lost",
                                    "workers reported WORKER_LOST", **labels)
        self.rollout_calls = Counter("expertplane_agent_rollout_calls",
                                     "rollout commands relayed to workers, by command and outcome",
                                     ["command", "outcome"], **labels)
        self.info = Gauge("expertplane_agent_info", "constant 1, labelled with the node", ["node"],
                          **labels)
        self.info.labels(node=node).set(1)
        self._http = None

    def serve(self, address: str) -> int:
        """Serve /metrics on ``address`` ("host:port", port 0 = any); returns the bound port."""
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"metrics: expected HOST:PORT, got {address!r}")
        server, _thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
