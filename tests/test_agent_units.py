"""Agent pieces without a network: durations and config errors, NVML absent/present, report building."""

import logging
import sys
import types

import pytest

from expertplane.agent.config import AgentConfig, ConfigError, parse_duration
from expertplane.agent.gpu import GpuSampler
from expertplane.agent.reports import build_report, new_agent_epoch
from expertplane.cli.main import main
from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb


@pytest.mark.parametrize("text,seconds", [("1s", 1.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0),
                                          ("0.25", 0.25), (" 1.5s ", 1.5), (".5s", 0.5)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1 day", "-1s", "s", "1.2.3s", "10us"])
def test_parse_duration_rejects_naming_the_field(text):
    with pytest.raises(ConfigError, match="^--interval: invalid duration"):
        parse_duration(text, "--interval")


@pytest.mark.parametrize("kw,field", [({"node": ""}, "node"), ({"node": "a b"}, "node"),
                                      ({"interval": 0}, "interval"), ({"buffer": 0}, "buffer"),
                                      ({"controller": ""}, "controller"), ({"lost_after": 0}, "lost_after")])
def test_config_errors_name_the_field(kw, field):
    args = {"controller": "127.0.0.1:1", "node": "n0", **kw}
    with pytest.raises(ConfigError) as exc:
        AgentConfig(**args)
    assert exc.value.field == field and str(exc.value).startswith(f"{field}:")


def test_cli_bad_duration_is_one_readable_line(capsys):
    assert main(["agent", "--controller", "127.0.0.1:1", "--node", "n", "--interval", "fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["expertplane agent: error: --interval: invalid duration 'fast' (use e.g. 500ms, 1s, 2m, 1h)"]


def test_nvml_library_missing_is_one_notice_not_a_failure(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)      # import pynvml -> ImportError
    with caplog.at_level(logging.INFO, logger="expertplane.agent.gpu"):
        sampler = GpuSampler()
        assert not sampler.available and sampler.device_count == 0
        assert [sampler.sample(r) for r in range(5)] == [None] * 5
        sampler.close()
    notices = [r for r in caplog.records if "GPU statistics disabled" in r.getMessage()]
    assert len(notices) == 1 and "nvidia-ml-py" in notices[0].getMessage()


def _fake_nvml(init_error=None):
    """A stand-in for the pynvml binding (the C library is absent here), same call shapes/units."""
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    nv.NVMLError = NVMLError
    nv.NVML_TEMPERATURE_GPU = 0
    nv.shutdowns = 0

    def init():
        if init_error:
            raise NVMLError(init_error)

    def shutdown():
        nv.shutdowns += 1

    def no_power(_h):
        raise NVMLError("Not Supported")

    nv.nvmlInit, nv.nvmlShutdown = init, shutdown
    nv.nvmlDeviceGetCount = lambda: 2
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=40 + h, memory=3)
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=(h + 1) << 30, total=80 << 30)
    nv.nvmlDeviceGetPowerUsage = lambda h: 350_500 if h == 0 else no_power(h)   # milliwatts
    nv.nvmlDeviceGetTemperature = lambda h, sensor: 61 + h
    return nv


def test_nvml_init_failure_is_one_notice(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(init_error="Driver Not Loaded"))
    with caplog.at_level(logging.INFO, logger="expertplane.agent.gpu"):
        sampler = GpuSampler()
        assert sampler.sample(0) is None and sampler.sample(1) is None
    assert sum("Driver Not Loaded" in r.getMessage() for r in caplog.records) == 1


def test_nvml_stats_units_and_rank_to_local_gpu(monkeypatch):
    nv = _fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    sampler = GpuSampler()
    assert sampler.available and sampler.device_count == 2
    g0, g3 = sampler.sample(0), sampler.sample(3)          # rank 3 -> local GPU 3 % 2 = 1
    assert g0.utilization == pytest.approx(0.40) and g0.power_watts == pytest.approx(350.5)
    assert g0.memory_used_bytes == 1 << 30 and g0.memory_total_bytes == 80 << 30
    assert g0.temperature_c == 61.0
    assert g3.utilization == pytest.approx(0.41) and g3.power_watts == 0.0   # unsupported -> 0
    assert g3.temperature_c == 62.0
    sampler.close()
    assert nv.shutdowns == 1 and sampler.sample(0) is None


def _snapshot(**kw):
    base = dict(rank=1, placement="p", plan_version=3,
                slot_counts=pb.Int64Tensor(shape=[2, 2], values=[1, 2, 3, 4]))
    base.update(kw)
    return pb.CounterSnapshot(**base)


WORKER = pb.WorkerInfo(node="n0", rank=1, placement="p", world_size=2, address="unix:/w")


def test_build_report_copies_identity_counts_and_gpu():
    gpu = pb.GpuStats(utilization=0.5)
    snap = _snapshot(dropped_tokens=pb.Int64Tensor(shape=[2, 2], values=[0, 1, 0, 0]))
    r = build_report(snap, WORKER, sequence=7, agent_epoch=99, gpu=gpu)
    assert (r.node, r.worker_rank, r.placement, r.plan_version, r.sequence, r.agent_epoch) == \
        ("n0", 1, "p", 3, 7, 99)
    assert list(r.slot_counts.values) == [1, 2, 3, 4] and list(r.dropped_tokens.values) == [0, 1, 0, 0]
    assert r.gpu.utilization == 0.5
    assert not build_report(_snapshot(), WORKER, sequence=1, agent_epoch=1).HasField("gpu")


@pytest.mark.parametrize("kw,field", [
    ({"rank": 0}, "rank"), ({"placement": "q"}, "placement"), ({"plan_version": 0}, "plan_version"),
    ({"slot_counts": pb.Int64Tensor(shape=[2, 2], values=[1])}, "slot_counts"),
    ({"slot_counts": pb.Int64Tensor(shape=[4], values=[1, 2, 3, 4])}, "slot_counts"),
    ({"slot_counts": pb.Int64Tensor(shape=[1, 2], values=[1, -2])}, "slot_counts"),
    ({"dropped_tokens": pb.Int64Tensor(shape=[2, 1], values=[1, 2])}, "dropped_tokens"),
])
def test_build_report_rejects_malformed_snapshots_naming_the_field(kw, field):
    with pytest.raises(FieldError) as exc:
        build_report(_snapshot(**kw), WORKER, sequence=1, agent_epoch=1)
    assert exc.value.field == field


def test_agent_epochs_are_unique_and_grow_within_a_process():
    epochs = [new_agent_epoch() for _ in range(1000)]
    assert all(b > a for a, b in zip(epochs, epochs[1:])) and epochs[0] > 0
