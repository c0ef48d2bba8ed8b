"""ComputePipeline: a ``ComputePipelineRequest`` through ``planner.pipeline.partition``."""

from __future__ import annotations

import yaml

from expertplane.errors import FieldError
from expertplane.planner.pipeline.partition import partition
from expertplane.planner.pipeline.profile import profile_from_layers
from expertplane.proto import expertplane_pb2 as pb


def _layers(req: pb.ComputePipelineRequest):
    """The request's layers as a planner ``Profile`` (from ``layers`` or ``profile_yaml``)."""
    if req.layers and req.profile_yaml:
        raise FieldError("profile_yaml", "give either layers or profile_yaml, not both")
    if req.layers:
        return profile_from_layers([
            {"F": l.forward, "B": l.backward, "W": l.weight_grad,
             "activation_bytes": float(l.activation_bytes), "param_bytes": float(l.param_bytes),
             "kind": l.kind or "dense", "ep_imbalance": l.ep_imbalance or 1.0}
            for l in req.layers], field="layers")
    if not req.profile_yaml:
        raise FieldError("layers", "give layers or profile_yaml")
    try:
        doc = yaml.safe_load(req.profile_yaml)
    except yaml.YAMLError as exc:
        raise FieldError("profile_yaml", f"not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or "layers" not in doc:
        raise FieldError("profile_yaml", "must be a mapping with a 'layers' list")
    return profile_from_layers(doc["layers"], str(doc.get("name", "")), field="profile_yaml.layers")


def compute_partition(req: pb.ComputePipelineRequest) -> pb.PipelinePartition:
    """The step-time-optimal partition. ``peak_memory_bytes`` is per pipeline rank (= per stage
    except for ``dualpipev``, whose ranks hold two stages); ``stage_busy`` is the seconds each
    stage computes in one step (F + B of every micro-batch)."""
    if req.num_stages < 1:
        raise FieldError("num_stages", f"must be >= 1, got {req.num_stages}")
    plan = partition(_layers(req), req.num_stages, schedule=req.schedule or "1f1b",
                     micro_batches=req.micro_batches or None,
                     memory_limit=float(req.memory_limit_bytes) or None, p2p=req.p2p_seconds)
    busy = plan.stage_times[:, :2].sum(axis=1) * plan.micro_batches
    return pb.PipelinePartition(boundaries=list(plan.boundaries), step_time=plan.step_time,
                                bubble_fraction=plan.bubble_fraction,
                                peak_memory_bytes=[int(x) for x in plan.peak_memory],
                                stage_busy=busy.tolist())
