"""Property-based fuzzing (hypothesis) of every controller gRPC method over real loopback gRPC.

One ControllerServer (SQLite store) serves the whole module with one registered placement "m".
Every generated request is malformed or hostile in some way (wrong shapes, negative/huge
numbers, unknown placements, versions from the future, wrong tensor sizes, empty names,
oversized repeated fields). Each test asserts that every answer is OK or a refusal
(INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION / OUT_OF_RANGE / RESOURCE_EXHAUSTED, or a
REJECTED/STALE/OVERLOADED ack) whose message names a field of the request, and that afterwards
the server is still SERVING and the stored plans of "m" are byte-for-byte unchanged.
Streaming RPCs carry many messages per example; each test asserts how many it sent, and the
per-test minimums add up to more than 10,000 messages.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import reliability_support as rs  # noqa: E402

from expertplane.controller.config import ControllerConfig  # noqa: E402
from expertplane.controller.server import ControllerServer  # noqa: E402
from expertplane.proto import expertplane_pb2 as pb  # noqa: E402
from expertplane.proto import expertplane_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = pytest.mark.timeout(300)
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
MIN_MESSAGES = {"ReportLoad": 6000, "Connect": 2000, "PlanService": 1200, "PlanningService": 800}
assert sum(MIN_MESSAGES.values()) >= 10_000
Ack = pb.LoadAck
U32, U64 = 2 ** 32 - 1, 2 ** 64 - 1

# ------------------------------------------------------------------ strategies
names = st.one_of(st.sampled_from(["", "m", "zzz", "M", "-m", "m-", "a" * 64, "m\x00", "é"]),
                  st.text(max_size=70))
u32 = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 12, 99, U32]), st.integers(0, U32))
u64 = st.one_of(st.sampled_from([0, 1, 2, 99, 2 ** 63, U64]), st.integers(0, U64))
floats = st.floats(allow_nan=True, allow_infinity=True)
shapes = st.lists(st.one_of(st.sampled_from([0, 1, 2, 3, 8, 12]), u32), max_size=4)


@st.composite
def int64_tensors(draw):
    shape = draw(st.one_of(shapes, st.just([2, 3])))
    n = draw(st.one_of(st.just(6), st.integers(0, 40)))
    values = draw(st.lists(st.integers(-2 ** 63, 2 ** 63 - 1), min_size=n, max_size=n))
    return pb.Int64Tensor(shape=shape, values=values)


@st.composite
def double_tensors(draw, good=(2, 8)):
    shape = draw(st.one_of(shapes, st.just(list(good))))
    n = draw(st.one_of(st.just(good[0] * good[1]), st.integers(0, 40)))
    return pb.DoubleTensor(shape=shape, values=draw(st.lists(floats, min_size=n, max_size=n)))


@st.composite
def placements(draw):
    msg = pb.Placement(name=draw(names), num_replicas=draw(u32),
                       algorithm=draw(st.sampled_from(["", "deepseek", "balanced", "topology",
                                                       "nope", "DEEPSEEK"])),
                       generation=draw(u64))
    if draw(st.booleans()):
        msg.model.CopyFrom(pb.ModelSpec(num_layers=draw(u32), num_experts=draw(u32),
                                        num_groups=draw(u32), expert_bytes=draw(u64)))
    if draw(st.booleans()):
        msg.topology.CopyFrom(pb.Topology(num_nodes=draw(u32), gpus_per_node=draw(u32)))
    if draw(st.booleans()):
        msg.policy.CopyFrom(pb.RebalancePolicy(
            mode=draw(st.integers(0, 7)), window_seconds=draw(floats),
            half_life_seconds=draw(floats), threshold=draw(floats), hysteresis=draw(floats),
            cooldown_seconds=draw(floats), move_budget_bytes=draw(u64),
            min_gain_per_gib=draw(floats), dry_run=draw(st.booleans())))
    if draw(st.booleans()):
        msg.initial_load.CopyFrom(draw(double_tensors()))
    return msg


def timestamp(draw):
    from google.protobuf.timestamp_pb2 import Timestamp
    # full int64 range is not a valid Timestamp: keep to what protobuf can hold
    return Timestamp(seconds=draw(st.integers(-62135596800, 253402300799)),
                     nanos=draw(st.integers(0, 999_999_999)))


@st.composite
def load_reports(draw):
    msg = pb.LoadReport(node=draw(names), worker_rank=draw(u32),
                        placement=draw(st.sampled_from(["m", "m", "", "zzz"])),
                        plan_version=draw(st.sampled_from([0, 1, 1, 2, 99, U64])),
                        sequence=draw(u64), dropped_windows=draw(u64), agent_epoch=draw(u64))
    if draw(st.booleans()):
        msg.window_start.CopyFrom(timestamp(draw))
        msg.window_end.CopyFrom(timestamp(draw))
    msg.slot_counts.CopyFrom(draw(int64_tensors()))
    if draw(st.booleans()):
        msg.dropped_tokens.CopyFrom(draw(int64_tensors()))
    if draw(st.booleans()):
        msg.gpu.CopyFrom(pb.GpuStats(utilization=draw(floats), memory_used_bytes=draw(u64),
                                     memory_total_bytes=draw(u64), power_watts=draw(floats),
                                     temperature_c=draw(floats)))
    return msg


@st.composite
def worker_infos(draw):
    return pb.WorkerInfo(node=draw(names), rank=draw(u32), placement=draw(names),
                         plan_version=draw(u64), prepared_version=draw(u64),
                         address=draw(st.text(max_size=20)), world_size=draw(u32))


@st.composite
def rollout_events(draw):
    return pb.RolloutEvent(kind=draw(st.integers(0, 9)), node=draw(names),
                           rollout_id=draw(st.text(max_size=40)), placement=draw(names),
                           version=draw(u64), message=draw(st.text(max_size=40)),
                           workers=draw(st.lists(worker_infos(), max_size=6)))


# ------------------------------------------------------------------ the server under test
class Fuzzed:
    """The module's controller, a client channel, the baseline of stored plans and counters."""

    def __init__(self, tmp: Path):
        self.server = ControllerServer(ControllerConfig(
            listen="127.0.0.1:0", db_url=f"sqlite:///{tmp / 'store.db'}", tick_seconds=0.02,
            policy_interval_seconds=3600, rollout_timeout_seconds=2.0))
        self.port = self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}",
                                             options=[("grpc.max_send_message_length", 1 << 26)])
        self.plans = pb_grpc.PlanServiceStub(self.channel)
        self.planning = pb_grpc.PlanningServiceStub(self.channel)
        self.load = pb_grpc.LoadServiceStub(self.channel)
        self.rollout = pb_grpc.RolloutServiceStub(self.channel)
        self.plans.ApplyPlacement(rs.small_placement("m", mode=pb.RebalancePolicy.MANUAL),
                                  timeout=60)
        self.baseline = rs.stored_plans(self.channel, "m")
        self.sent: dict[str, int] = {k: 0 for k in MIN_MESSAGES}

    def unary(self, group: str, method, request, descriptor=None):
        """Call ``method``; returns the response or the refused RpcError after checking it."""
        self.sent[group] += 1
        try:
            return method(request, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() in rs.REFUSALS, (exc.code(), exc.details(), request)
            assert rs.names_a_field(exc.details(), descriptor or request.DESCRIPTOR), \
                (exc.details(), request)
            return exc

    def check_intact(self) -> None:
        assert rs.serving(self.channel), "controller no longer SERVING"
        assert rs.stored_plans(self.channel, "m") == self.baseline, "stored plans changed"


@pytest.fixture(scope="module")
def fz(tmp_path_factory):
    f = Fuzzed(tmp_path_factory.mktemp("fuzz"))
    yield f
    f.channel.close()
    f.server.stop(0.5)


# ------------------------------------------------------------------ LoadService
def expand(messages, rnd, copies: int, mutate) -> list:
    """``copies`` variants of each drawn message, each mutated by ``mutate(msg, rnd)``: many
    messages per example without asking hypothesis for huge structures."""
    out = []
    for msg in messages:
        for _ in range(copies):
            variant = type(msg)()
            variant.CopyFrom(msg)
            mutate(variant, rnd)
            out.append(variant)
    return out


def _mutate_report(r: pb.LoadReport, rnd) -> None:
    r.sequence = rnd.choice([r.sequence, rnd.randrange(U64 + 1), rnd.randrange(1, 50)])
    r.worker_rank = rnd.choice([r.worker_rank, rnd.randrange(5), rnd.randrange(U32 + 1)])
    values = list(r.slot_counts.values)
    rnd.shuffle(values)
    r.slot_counts.values[:] = values


def _mutate_event(e: pb.RolloutEvent, rnd) -> None:
    e.version = rnd.choice([e.version, 1, 2, rnd.randrange(U64 + 1)])
    e.kind = rnd.choice([e.kind, rnd.randrange(10)])


def test_fuzz_report_load(fz):
    @settings(FUZZ, max_examples=60)
    @given(st.lists(load_reports(), min_size=10, max_size=12), st.randoms(use_true_random=False))
    def run(drawn, rnd):
        reports = expand(drawn, rnd, 10, _mutate_report)
        acks = list(fz.load.ReportLoad(iter(reports), timeout=60))
        fz.sent["ReportLoad"] += len(reports)
        assert len(acks) == len(reports)
        for report, ack in zip(reports, acks):
            assert (ack.worker_rank, ack.sequence) == (report.worker_rank, report.sequence)
            assert ack.status in (Ack.ACCEPTED, Ack.DUPLICATE, Ack.STALE, Ack.REJECTED,
                                  Ack.OVERLOADED), ack
            if ack.status in (Ack.REJECTED, Ack.STALE):
                assert rs.names_a_field(ack.message, pb.LoadReport.DESCRIPTOR), (ack, report)

    run()
    assert fz.sent["ReportLoad"] >= MIN_MESSAGES["ReportLoad"]
    fz.check_intact()


# ------------------------------------------------------------------ RolloutService
def test_fuzz_rollout_connect(fz):
    @settings(FUZZ, max_examples=50)
    @given(st.lists(rollout_events(), min_size=5, max_size=8), st.randoms(use_true_random=False))
    def run(drawn, rnd):
        events = expand(drawn, rnd, 8, _mutate_event)
        call = fz.rollout.Connect(iter(events), timeout=5)
        try:
            for _ in call:          # the controller may answer with commands; none are required
                pass
        except grpc.RpcError as exc:
            assert exc.code() in rs.REFUSALS | {grpc.StatusCode.DEADLINE_EXCEEDED}, exc
        fz.sent["Connect"] += len(events)

    run()
    assert fz.sent["Connect"] >= MIN_MESSAGES["Connect"]
    fz.check_intact()
    # the fuzzed agents left no phantom workers that would block a real rollout
    rs.wait_until(lambda: not fz.server.controller.rollouts.workers("m"), 10,
                  "fuzzed agents' workers forgotten")


# ------------------------------------------------------------------ PlanService
plan_requests = st.one_of(
    st.builds(lambda p, v: ("GetPlan", pb.GetPlanRequest(placement=p, version=v)), names, u64),
    st.builds(lambda p, n, t: ("ListPlans", pb.ListPlansRequest(placement=p, page_size=n,
                                                                page_token=t)),
              names, u32, st.one_of(st.text(max_size=30), st.binary(max_size=20).map(
                  lambda b: b.hex()))),
    st.just(("ListPlacements", pb.ListPlacementsRequest())),
    st.builds(lambda p: ("GetLoad", pb.GetLoadRequest(placement=p)), names),
    st.builds(lambda p: ("ApplyPlacement", p), placements()),
    st.builds(lambda n: ("DeletePlacement", pb.DeletePlacementRequest(placement=n)),
              names.filter(lambda n: n != "m")),
    st.builds(lambda p, n: ("ListRollouts", pb.ListRolloutsRequest(placement=p, limit=n)),
              names, u32),
    st.builds(lambda p, v: ("WatchPlans", pb.WatchPlansRequest(placement=p, after_version=v)),
              names, u64),
)


def test_fuzz_plan_service(fz):
    @settings(FUZZ, max_examples=1250)
    @given(plan_requests)
    def run(item):
        method, request = item
        if method == "ApplyPlacement" and request.name == "m":
            request.model.num_layers = 0          # never a valid update of the baseline
        if method == "WatchPlans":
            call = fz.plans.WatchPlans(request, timeout=0.3)
            fz.sent["PlanService"] += 1
            try:
                for summary in call:
                    assert summary.version >= 1
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:   # a live watch times out
                    assert exc.code() in rs.REFUSALS, exc
                    assert rs.names_a_field(exc.details(), request.DESCRIPTOR), exc.details()
            return
        got = fz.unary("PlanService", getattr(fz.plans, method), request)
        if method == "ApplyPlacement" and not isinstance(got, grpc.RpcError):
            fz.plans.DeletePlacement(pb.DeletePlacementRequest(placement=request.placement), timeout=10)

    run()
    assert fz.sent["PlanService"] >= MIN_MESSAGES["PlanService"]
    fz.check_intact()
    assert [s.spec.name for s in fz.plans.ListPlacements(pb.ListPlacementsRequest(),
                                                         timeout=10).placements] == ["m"]


# ------------------------------------------------------------------ PlanningService
@st.composite
def compute_plan_requests(draw):
    msg = pb.ComputePlanRequest(placement=draw(names), store=draw(st.booleans()),
                                rollout=draw(st.booleans()))
    if draw(st.booleans()):
        msg.spec.CopyFrom(draw(placements()))
    if draw(st.booleans()):
        msg.load.CopyFrom(draw(double_tensors()))
    if draw(st.booleans()):
        msg.previous_phy2log.CopyFrom(draw(int64_tensors()))
    if msg.placement == "m":       # a well-formed store on "m" is legitimate: keep "m" as it is
        msg.store = msg.rollout = False
    return msg


@st.composite
def layer_profiles(draw):
    return pb.LayerProfile(forward=draw(floats), backward=draw(floats), weight_grad=draw(floats),
                           activation_bytes=draw(u64), param_bytes=draw(u64),
                           kind=draw(st.sampled_from(["", "moe", "dense", "embedding", "head",
                                                      "x"])),
                           ep_imbalance=draw(floats))


@st.composite
def compute_pipeline_requests(draw):
    return pb.ComputePipelineRequest(
        layers=draw(st.lists(layer_profiles(), max_size=8)),
        profile_yaml=draw(st.one_of(st.just(""), st.text(max_size=80),
                                    st.just("layers:\n  - {F: -1, B: 2}\n"),
                                    st.just("layers: [1, 2"))),
        num_stages=draw(u32), schedule=draw(st.sampled_from(["", "1f1b", "zb1p", "dualpipe",
                                                             "dualpipev", "gpipe"])),
        micro_batches=draw(u32), memory_limit_bytes=draw(u64), p2p_seconds=draw(floats))


planning_requests = st.one_of(
    st.builds(lambda r: ("ComputePlan", r), compute_plan_requests()),
    st.builds(lambda r: ("ComputePipeline", r), compute_pipeline_requests()),
    st.builds(lambda p, d, f: ("TriggerRebalance", pb.TriggerRebalanceRequest(
        placement=p, dry_run=d or p == "m", force=f)), names, st.booleans(), st.booleans()),
)


def test_fuzz_planning_service(fz):
    @settings(FUZZ, max_examples=850)
    @given(planning_requests)
    def run(item):
        method, request = item
        fz.unary("PlanningService", getattr(fz.planning, method), request)

    run()
    assert fz.sent["PlanningService"] >= MIN_MESSAGES["PlanningService"]
    fz.check_intact()


def test_oversized_message_is_refused_and_server_survives(fz):
    """A ~72 MiB load report (over the 64 MiB limit) is refused; the server keeps serving."""
    values = np.full(8 * 1024 * 1024, 2 ** 62, dtype=np.int64)         # 9 bytes per varint
    huge = pb.LoadReport(node="n0", placement="m", plan_version=1, sequence=1,
                         slot_counts=pb.Int64Tensor(shape=[2, 3], values=values))
    with pytest.raises(grpc.RpcError) as exc:
        list(fz.load.ReportLoad(iter([huge]), timeout=30))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    fz.check_intact()


def test_versions_beyond_the_store_range_are_refused_cleanly(fz):
    """Regression for what the fuzzing found: uint64 versions >= 2^63 crashed the store query
    (UNKNOWN); now NOT_FOUND / INVALID_ARGUMENT naming the field, or simply nothing to watch."""
    with pytest.raises(grpc.RpcError) as exc:
        fz.plans.GetPlan(pb.GetPlanRequest(placement="m", version=U64), timeout=10)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND and exc.value.details().startswith("version")
    for token in (str(2 ** 64), "\u00b2", "99999999999999999999"):
        with pytest.raises(grpc.RpcError) as exc:
            fz.plans.ListPlans(pb.ListPlansRequest(placement="m", page_token=token), timeout=10)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.details().startswith("page_token")
    with pytest.raises(grpc.RpcError) as exc:
        list(fz.plans.WatchPlans(pb.WatchPlansRequest(placement="m", after_version=U64), timeout=0.5))
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED       # nothing newer: waits
    fz.check_intact()
