"""Prometheus metrics of the controller (one registry per controller, so several can run in one
process); served over HTTP by ``serve`` when ``--metrics HOST:PORT`` is given."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# GpuStats field -> help of its gauge expertplane_controller_gpu_<field>{placement,rank}
GPU_GAUGES = {"utilization": "GPU utilization 0..1 (latest report of the rank)",
              "memory_used_bytes": "GPU memory in use (latest report of the rank)",
              "memory_total_bytes": "GPU memory in total (latest report of the rank)",
              "power_watts": "GPU power draw (latest report of the rank)",
              "temperature_c": "GPU temperature, degrees Celsius (latest report of the rank)"}
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ControllerMetrics:
    """All controller metrics, prefixed ``expertplane_controller_``."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, p = self.registry, "expertplane_controller_"
        self.reports = Counter(p + "reports", "load reports by outcome", ["placement", "status"],
                               registry=r)
        self.report_lag = Histogram(p + "report_lag_seconds", "receive time - report window end",
                                    buckets=_LATENCY + (10, 30, 60, 300), registry=r)
        self.ingest_seconds = Histogram(p + "ingest_seconds", "time to ingest one report",
                                        buckets=_LATENCY, registry=r)
        self.ingest_inflight = Gauge(p + "ingest_inflight", "reports waiting or being ingested",
                                     registry=r)
        self.current_balance = Gauge(p + "current_balance",
                                     "observed max/mean GPU load under the plan in force",
                                     ["placement", "layer"], registry=r)
        self.predicted_balance = Gauge(p + "predicted_balance",
                                       "max/mean GPU load of a fresh plan on the window",
                                       ["placement", "layer"], registry=r)
        self.plan_version = Gauge(p + "plan_version", "plan versions", ["placement", "kind"],
                                  registry=r)
        self.decisions = Counter(p + "decisions", "policy decisions", ["placement", "rebalance"],
                                 registry=r)
        self.rollouts = Counter(p + "rollouts", "finished rollouts", ["placement", "state"],
                                registry=r)
        self.rollout_seconds = Histogram(p + "rollout_seconds", "rollout phase durations",
                                         ["phase"], buckets=_LATENCY + (10, 30, 60), registry=r)
        self.store_seconds = Histogram(p + "store_seconds", "plan store operation latency", ["op"],
                                       buckets=_LATENCY, registry=r)
        self.agents = Gauge(p + "agents", "connected agent streams", registry=r)
        self.gpu = {name: Gauge(p + "gpu_" + name, text, ["placement", "rank"], registry=r)
                    for name, text in GPU_GAUGES.items()}

    def observe_store(self, op: str, seconds: float) -> None:
        self.store_seconds.labels(op).observe(seconds)

    def set_balance(self, gauge: Gauge, placement: str, values) -> None:
        for layer, value in enumerate(values):
            gauge.labels(placement, str(layer)).set(float(value))

    def set_gpu(self, placement: str, rank: int, stats) -> None:
        """The latest ``GpuStats`` a rank of ``placement`` reported."""
        for name, gauge in self.gpu.items():
            gauge.labels(placement, str(rank)).set(float(getattr(stats, name)))

    def forget(self, placement: str) -> None:
        """Drop the per-placement series of a deleted placement."""
        for metric in (self.current_balance, self.predicted_balance, self.plan_version,
                       self.reports, self.decisions, self.rollouts, *self.gpu.values()):
            for labels in [k for k in list(metric._metrics) if k[0] == placement]:
                metric.remove(*labels)


def serve(metrics: ControllerMetrics, address: str):
    """Serve ``/metrics`` on ``HOST:PORT``; returns (server, thread)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"--metrics: expected HOST:PORT, got {address!r}")
    return start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=metrics.registry)
