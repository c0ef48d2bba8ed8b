"""End to end, SGLang's load into ExpertPlane and the plan back out in SGLang's row form: a real
controller (gRPC on loopback, SQLite), a real agent with the SGLang load source and the plan-file
writer, and SGLang's own ExpertDistributionRecorder (``stat`` mode) behind SGLang's endpoint names
in a separate process (``sglang_recorder_server.py``: why it is not a whole SGLang server, and the
two CPU adjustments, are in its docstring).

Skewed traffic goes through SGLang's recorder hooks; every window the agent POSTs the dump
endpoint, reads SGLang's dump file and reports the MoE rows as load per logical expert. The
controller's load equals what SGLang wrote (the dumps, archived by the stand-in before the agent
deletes them) and the traffic itself; no dump is left behind or read twice; the plan in force
reaches the plan file with SGLang's hidden-layer rows. The failure paths: a dump that never
appears in the agent's directory, an unreachable server, a server without a recorder mode.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from expertplane.agent.agent import Agent
from expertplane.cli.agent import config_from_args, sidecars_from_args
from expertplane.cli.main import build_parser
from expertplane.controller.config import ControllerConfig
from expertplane.controller.server import ControllerServer
from expertplane.engines.plan_file import read_plan_file
from expertplane.engines.sglang import TESTED_VERSIONS, PlanSource
from expertplane.engines.sglang_http import HttpPolicy, SglangHttp, SglangHttpError
from expertplane.engines.sglang_layout import HiddenLayout
from expertplane.engines.sglang_load import SglangLoadSource, SglangSourceConfig, check_server
from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.tensors import to_numpy

sys.path.insert(0, str(Path(__file__).parent))
import sglang_recorder_server  # noqa: E402

pytestmark = pytest.mark.timeout(600)
H, DENSE, E, RED = 4, 1, 8, 2            # hidden layers (the first dense), experts, redundant
R = E + RED
MOE = list(range(DENSE, H))
PLACEMENT = "sgl"


@pytest.fixture(scope="module")
def sglang(tmp_path_factory):
    """The stand-in server: (url, its recorder directory, the archive of its dumps)."""
    with sglang_recorder_server.running(tmp_path_factory.mktemp("sglang"), H, E, DENSE,
                                        RED) as served:
        yield served


def forward(url: str, topk_ids: dict[int, np.ndarray]) -> None:
    """One forward pass: physical expert ids ``[tokens, topk]`` per hidden MoE layer."""
    body = json.dumps({"topk_ids": {str(layer): ids.tolist()
                                    for layer, ids in topk_ids.items()}}).encode()
    urllib.request.urlopen(urllib.request.Request(f"{url}/forward", data=body, method="POST"),
                           timeout=60).read()


def _wait(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _placement() -> pb.Placement:
    return pb.Placement(
        name=PLACEMENT, model=pb.ModelSpec(num_layers=len(MOE), num_experts=E, num_groups=1),
        topology=pb.Topology(num_nodes=1, gpus_per_node=2), num_replicas=R, algorithm="deepseek",
        policy=pb.RebalancePolicy(mode=pb.RebalancePolicy.MANUAL, window_seconds=3600))


def test_dumps_reach_the_controller_and_the_plan_file_has_sglang_rows(sglang, tmp_path):
    url, recorder, archive = sglang
    server = ControllerServer(ControllerConfig(
        listen="127.0.0.1:0", db_url=f"sqlite:///{tmp_path / 'c.db'}", tick_seconds=0.02,
        policy_interval_seconds=3600.0, snapshot_interval_seconds=3600.0))
    port = server.start()
    channel = make_channel(f"127.0.0.1:{port}")
    plans = pb_grpc.PlanServiceStub(channel)
    plans.ApplyPlacement(_placement(), timeout=120)
    plan_path = tmp_path / "plan.json"
    args = build_parser().parse_args([       # the sidecars exactly as `expertplane agent` makes them
        "agent", "--controller", f"127.0.0.1:{port}", "--node", "n0", "--interval", "100ms",
        "--placement", PLACEMENT, "--plan-file", str(plan_path), "--plan-poll", "50ms",
        "--sglang-url", url, "--sglang-recorder-dir", str(recorder), "--sglang-interval", "200ms"])
    agent = Agent(config_from_args(args), sidecars_from_args(args))
    rng = np.random.default_rng(7)
    sent = np.zeros((H, E))                  # logical tokens per hidden layer, from the traffic
    try:
        earlier = set(archive.iterdir())        # dumps of other tests on this server
        agent.start()
        source = agent.sidecars[0]
        _wait(lambda: source.counts.dumped >= 1)     # recording (the first window dumped)
        for burst in range(1, 4):            # three bursts, reported in three windows or more
            for _ in range(4):
                # 16 tokens, top-2 of 10 physical slots; slots 0 and 8 (logical 0) take most
                ids = {layer: rng.choice(R, size=(16, 2), p=_skew()) for layer in MOE}
                forward(url, ids)
                for layer, chosen in ids.items():
                    np.add.at(sent[layer], chosen.ravel() % E, 1)   # SGLang's trivial map
            _wait(lambda: source.counts.reported >= burst)
        want = sent[MOE]

        def stored():
            return to_numpy(plans.GetLoad(pb.GetLoadRequest(placement=PLACEMENT), timeout=10)
                            .load, "load")
        _wait(lambda: stored().sum() == want.sum())
        window = plans.GetLoad(pb.GetLoadRequest(placement=PLACEMENT), timeout=10)
        np.testing.assert_array_equal(to_numpy(window.load, "load"), want)
        assert window.reports == source.counts.reported >= 3
        assert agent.metrics.registry.get_sample_value(          # on the agent's --metrics
            "expertplane_agent_sglang_events_total", {"event": "reported"}) == window.reports

        dumps = sorted(set(archive.glob("expert_distribution_recorder_*.pt")) - earlier)
        written = sum(torch.load(p, weights_only=True)["logical_count"].sum(0).numpy()
                      for p in dumps)
        assert not written[:DENSE].any()                       # dense rows: all zero
        np.testing.assert_array_equal(written[MOE], want)      # the controller holds the dumps
        assert source.counts.failed == 0 and source.counts.no_file == 0
        assert source.layout.num_hidden_layers == H and list(source.layout.moe_layers) == MOE

        decision = pb_grpc.PlanningServiceStub(channel).TriggerRebalance(
            pb.TriggerRebalanceRequest(placement=PLACEMENT, force=True), timeout=120)
        assert decision.rebalance and decision.new_version, decision.reason
        _wait(lambda: (p := read_plan_file(plan_path)) is not None
              and p.version == decision.new_version and p.moe_layers is not None)
        plan = read_plan_file(plan_path)
        in_force = plans.GetPlan(pb.GetPlanRequest(placement=PLACEMENT, in_force=True),
                                 timeout=10)
        assert in_force.summary.version == plan.version
        phy2log = to_numpy(in_force.phy2log, "phy2log", ndim=2)
        assert (plan.num_hidden_layers, list(plan.moe_layers)) == (H, MOE)
        rows = np.asarray(plan.document["physical_to_logical_map"])
        assert rows.shape == (H, R)
        np.testing.assert_array_equal(rows[MOE], phy2log)
        np.testing.assert_array_equal(rows[0], np.arange(R) % E)   # the dense row covers all
        assert (phy2log == 0).sum(axis=1).min() >= 2              # the hot expert replicated
        # our SGLang plugin's rank 0 takes this file: from SGLang's trivial map it moves to
        # exactly the file's hidden-layer rows
        reader = PlanSource()
        reader.path = str(plan_path)
        choice = reader.choose(np.tile(np.arange(R) % E, (H, 1)), MOE, E)
        assert choice.version == plan.version
        np.testing.assert_array_equal(choice.phy2log, rows)
        agent.stop(flush_timeout=2.0)        # its last window dumped and read too
        assert not list(recorder.glob("expert_distribution_recorder_*.pt"))   # all consumed
    finally:
        agent.stop(flush_timeout=2.0)
        channel.close()
        server.stop(0.5)


def _skew() -> np.ndarray:
    p = np.ones(R)
    p[[0, 8]] = 12.0
    return p / p.sum()


def test_a_restarted_server_is_recorded_again(sglang):
    url, recorder, _ = sglang
    reported = []
    source = SglangLoadSource(SglangSourceConfig(url=url, recorder_dir=str(recorder),
                                                 placement=PLACEMENT, interval=0.1,
                                                 moe_layers=tuple(MOE)), TESTED_VERSIONS)
    source.reporting_to(lambda msg: reported.append(msg) or True).start()
    try:
        _wait(lambda: source.layout is not None)     # given MoE layers: known from a first,
        assert source.layout == HiddenLayout(H, tuple(MOE)) and not reported   # idle dump
        urllib.request.urlopen(urllib.request.Request(f"{url}/restart", data=b"",
                                                      method="POST"), timeout=60).read()
        _wait(lambda: source.counts.started == 2)   # an idle window, a new startup_time
        forward(url, {layer: np.array([[layer, 9]]) for layer in MOE})
        _wait(lambda: source.counts.reported == 1)
    finally:
        source.stop()
    load = to_numpy(reported[0].expert_load, "expert_load")
    want = np.zeros((len(MOE), E))
    for row, layer in enumerate(MOE):
        np.add.at(want[row], [layer % E, 9 % E], 1)   # physical -> logical: slot % E
    np.testing.assert_array_equal(load, want)


def test_a_dump_that_never_appears_does_not_hang_the_agent(sglang, tmp_path):
    url, _, _ = sglang
    reported = []
    source = SglangLoadSource(SglangSourceConfig(url=url, recorder_dir=str(tmp_path / "elsewhere"),
                                                 placement=PLACEMENT, interval=0.1,
                                                 dump_wait=0.3), TESTED_VERSIONS)
    source.reporting_to(reported.append).start()
    try:
        _wait(lambda: source.counts.no_file >= 2, timeout=60)
    finally:
        began = time.monotonic()
        source.stop()
    assert time.monotonic() - began < 5.0
    assert not reported and source.counts.reported == 0


def test_unreachable_server_is_retried_without_blocking_stop():
    stopping = threading.Event()
    http = SglangHttp("http://127.0.0.1:9", policy=HttpPolicy(timeout=1.0, attempts=2,
                                                              backoff_initial=0.01),
                      stopping=stopping)
    with pytest.raises(SglangHttpError) as err:
        http.server_info()
    assert err.value.unreachable and "127.0.0.1:9/server_info" in str(err.value)
    source = SglangLoadSource(SglangSourceConfig(url="http://127.0.0.1:9", recorder_dir="/tmp",
                                                 placement=PLACEMENT, reconnect_max=0.2),
                              TESTED_VERSIONS)
    source.reporting_to(lambda msg: True).start()
    time.sleep(0.5)
    began = time.monotonic()
    source.stop()
    assert time.monotonic() - began < 5.0 and source.counts.dumped == 0


def test_refusals_name_the_field(sglang):
    url, _, _ = sglang
    with pytest.raises(SglangHttpError) as err:      # an HTTP refusal is not retried
        SglangHttp(f"{url}/no-such-prefix").start_record()
    assert not err.value.unreachable and "HTTP 404" in str(err.value)
    with pytest.raises(FieldError, match="expert_distribution_recorder_mode"):
        check_server({"version": TESTED_VERSIONS[0], "expert_distribution_recorder_mode": None},
                     TESTED_VERSIONS)
    with pytest.raises(FieldError, match="SGLang 9.9 is not supported"):
        check_server({"version": "9.9", "expert_distribution_recorder_mode": "stat"},
                     TESTED_VERSIONS)
    assert check_server(SglangHttp(url).server_info(), TESTED_VERSIONS) == "stat"
    for bad, field in (({"url": "ftp://x"}, "sglang_url"), ({"placement": ""}, "placement"),
                       ({"interval": 0}, "sglang_interval"),
                       ({"moe_layers": (3, 1)}, "sglang_moe_layers")):
        with pytest.raises(FieldError, match=field):
            SglangSourceConfig(**{"url": url, "recorder_dir": "/tmp", "placement": "p", **bad})


@pytest.mark.parametrize("extra, message", [
    ([], "--placement: required with --sglang-url"),
    (["--placement", "p", "--sglang-interval", "0"], "--sglang-interval: must be > 0"),
    (["--placement", "p", "--sglang-url", "ftp://x"], "--sglang-url: must be http"),
    (["--placement", "p", "--sglang-moe-layers", "3-a"], "--sglang-moe-layers: must be layer"),
    (["--placement", "p", "--sglang-api-key-file", "/nonexistent/key"],
     "--sglang-api-key-file: cannot read"),
])
def test_agent_options_name_the_option(extra, message):
    args = build_parser().parse_args(["agent", "--controller", "127.0.0.1:1", "--node", "n0",
                                      "--sglang-url", "http://127.0.0.1:30000", *extra])
    with pytest.raises(ValueError, match=message):
        sidecars_from_args(args)
