"""Conversions between the controller's plan forms: planner candidate -> stored record -> wire
messages (the one place each is built)."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp

from expertplane.controller.planning import Candidate
from expertplane.controller.spec import PlacementSpec
from expertplane.controller.store import PlanRecord, RolloutRecord, utcnow
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import double_tensor, int64_tensor


def timestamp(value: dt.datetime | float | None) -> Timestamp | None:
    """A protobuf Timestamp from a datetime or unix seconds (None stays None)."""
    if value is None:
        return None
    ts = Timestamp()
    if isinstance(value, dt.datetime):
        ts.FromDatetime(value.astimezone(dt.timezone.utc).replace(tzinfo=None))
    else:
        ts.FromNanoseconds(int(value * 1e9))
    return ts


def plan_record(spec: PlacementSpec, cand: Candidate, reason: str, previous: int) -> PlanRecord:
    """A record of ``cand`` planned for ``spec`` against version ``previous`` (0: none); its
    version is 0 until stored."""
    return PlanRecord(
        placement=spec.name, version=0, algorithm=cand.algorithm, reason=reason,
        previous_version=previous, num_nodes=spec.num_nodes, gpus_per_node=spec.gpus_per_node,
        phy2log=cand.phy2log, log2phy=cand.log2phy, logcnt=cand.logcnt, load_snapshot=cand.load,
        predicted_balance=cand.predicted_balance.tolist(),
        current_balance=cand.current_balance.tolist(), slots_moved=cand.slots_moved,
        bytes_moved=cand.bytes_moved, created_at=utcnow())


def plan_summary(p: PlanRecord) -> pb.PlanSummary:
    return pb.PlanSummary(placement=p.placement, version=p.version, algorithm=p.algorithm,
                          predicted_balance=p.predicted_balance, slots_moved=p.slots_moved,
                          bytes_moved=p.bytes_moved, previous_version=p.previous_version,
                          created_at=timestamp(p.created_at), reason=p.reason,
                          previous_plan_balance=p.current_balance)


def plan_message(p: PlanRecord, *, with_load: bool = True) -> pb.Plan:
    """The wire Plan; ``with_load=False`` leaves out the load snapshot (workers do not need it,
    and it is the bulkiest part of a prepare command)."""
    msg = pb.Plan(summary=plan_summary(p),
                  topology=pb.Topology(num_nodes=p.num_nodes, gpus_per_node=p.gpus_per_node),
                  phy2log=int64_tensor(p.phy2log), log2phy=int64_tensor(p.log2phy),
                  logcnt=int64_tensor(p.logcnt))
    if with_load:
        msg.load_snapshot.CopyFrom(double_tensor(p.load_snapshot))
    return msg


def rollout_message(r: RolloutRecord) -> pb.RolloutRecord:
    prepared = [pb.WorkerInfo(node=node, rank=rank, placement=r.placement)
                for rank, node in sorted(r.acks.get("prepared", {}).items())]
    return pb.RolloutRecord(rollout_id=r.id, placement=r.placement, from_version=r.from_version,
                            to_version=r.to_version, state=r.state, reason=r.reason,
                            started_at=timestamp(r.started_at), finished_at=timestamp(r.finished_at),
                            prepared=prepared, prepare_seconds=r.prepare_seconds,
                            commit_seconds=r.commit_seconds)
