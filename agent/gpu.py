"""GPU statistics through NVML (nvidia-ml-py); without the library or a GPU: one notice, no stats."""

from __future__ import annotations

import logging
import threading

from expertplane.proto import expertplane_pb2 as pb

log = logging.getLogger(__name__)


class GpuSampler:
    """Reads utilisation, memory, power and temperature of the node's GPUs.

    ``available`` is False when pynvml cannot be imported or NVML cannot start (no driver, no
    GPU); that is logged once, at INFO, and ``sample`` then returns None. A single reading a GPU
    does not support (e.g. power on some boards) is left at 0.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._nvml = None
        self._count = 0
        try:
            import pynvml
        except ImportError as exc:
            log.info("GPU statistics disabled: nvidia-ml-py is not importable (%s)", exc)
            return
        try:
            pynvml.nvmlInit()
            self._count = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            log.info("GPU statistics disabled: NVML unavailable (%s)", exc)
            return
        if self._count == 0:
            log.info("GPU statistics disabled: NVML sees no GPU")
            pynvml.nvmlShutdown()
            return
        self._nvml = pynvml

    @property
    def available(self) -> bool:
        return self._nvml is not None

    @property
    def device_count(self) -> int:
        return self._count if self.available else 0

    def sample(self, rank: int) -> pb.GpuStats | None:
        """Stats of the GPU used by global ``rank`` (local index ``rank % device_count``)."""
        nv = self._nvml
        if nv is None:
            return None
        with self._lock:
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(rank % self._count)
            except nv.NVMLError as exc:
                log.warning("NVML: no handle for GPU %d: %s", rank % self._count, exc)
                return None
            stats = pb.GpuStats()
            try:
                stats.utilization = nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
            except nv.NVMLError:
                pass
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                stats.memory_used_bytes, stats.memory_total_bytes = int(mem.used), int(mem.total)
            except nv.NVMLError:
                pass
            try:
                stats.power_watts = nv.nvmlDeviceGetPowerUsage(handle) / 1000.0
            except nv.NVMLError:
                pass
            try:
                stats.temperature_c = float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
            except nv.NVMLError:
                pass
            return stats

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError:
                    pass
                self._nvml = None
