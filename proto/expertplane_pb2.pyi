import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RolloutProtocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_PROTOCOL_ORIGINAL: _ClassVar[RolloutProtocol]
    ROLLOUT_PROTOCOL_BATCHED: _ClassVar[RolloutProtocol]
ROLLOUT_PROTOCOL_ORIGINAL: RolloutProtocol
ROLLOUT_PROTOCOL_BATCHED: RolloutProtocol

class Int64Tensor(_message.Message):
    __slots__ = ("shape", "values")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[int]] = ...) -> None: ...

class DoubleTensor(_message.Message):
    __slots__ = ("shape", "values")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class Topology(_message.Message):
    __slots__ = ("num_nodes", "gpus_per_node")
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    num_nodes: int
    gpus_per_node: int
    def __init__(self, num_nodes: _Optional[int] = ..., gpus_per_node: _Optional[int] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("num_layers", "num_experts", "num_groups", "expert_bytes")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BYTES_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_experts: int
    num_groups: int
    expert_bytes: int
    def __init__(self, num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., num_groups: _Optional[int] = ..., expert_bytes: _Optional[int] = ...) -> None: ...

class RebalancePolicy(_message.Message):
    __slots__ = ("mode", "window_seconds", "half_life_seconds", "threshold", "hysteresis", "cooldown_seconds", "move_budget_bytes", "min_gain_per_gib", "dry_run")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[RebalancePolicy.Mode]
        AUTO: _ClassVar[RebalancePolicy.Mode]
        MANUAL: _ClassVar[RebalancePolicy.Mode]
        OFF: _ClassVar[RebalancePolicy.Mode]
    MODE_UNSPECIFIED: RebalancePolicy.Mode
    AUTO: RebalancePolicy.Mode
    MANUAL: RebalancePolicy.Mode
    OFF: RebalancePolicy.Mode
    MODE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HALF_LIFE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    HYSTERESIS_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MOVE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_GAIN_PER_GIB_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    mode: RebalancePolicy.Mode
    window_seconds: float
    half_life_seconds: float
    threshold: float
    hysteresis: float
    cooldown_seconds: float
    move_budget_bytes: int
    min_gain_per_gib: float
    dry_run: bool
    def __init__(self, mode: _Optional[_Union[RebalancePolicy.Mode, str]] = ..., window_seconds: _Optional[float] = ..., half_life_seconds: _Optional[float] = ..., threshold: _Optional[float] = ..., hysteresis: _Optional[float] = ..., cooldown_seconds: _Optional[float] = ..., move_budget_bytes: _Optional[int] = ..., min_gain_per_gib: _Optional[float] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("name", "model", "topology", "num_replicas", "algorithm", "policy", "initial_load", "generation", "router_bias", "restore_phy2log", "restore_version", "initial_load_file")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LOAD_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ROUTER_BIAS_FIELD_NUMBER: _ClassVar[int]
    RESTORE_PHY2LOG_FIELD_NUMBER: _ClassVar[int]
    RESTORE_VERSION_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LOAD_FILE_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: ModelSpec
    topology: Topology
    num_replicas: int
    algorithm: str
    policy: RebalancePolicy
    initial_load: DoubleTensor
    generation: int
    router_bias: RouterBiasPolicy
    restore_phy2log: Int64Tensor
    restore_version: int
    initial_load_file: str
    def __init__(self, name: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., topology: _Optional[_Union[Topology, _Mapping]] = ..., num_replicas: _Optional[int] = ..., algorithm: _Optional[str] = ..., policy: _Optional[_Union[RebalancePolicy, _Mapping]] = ..., initial_load: _Optional[_Union[DoubleTensor, _Mapping]] = ..., generation: _Optional[int] = ..., router_bias: _Optional[_Union[RouterBiasPolicy, _Mapping]] = ..., restore_phy2log: _Optional[_Union[Int64Tensor, _Mapping]] = ..., restore_version: _Optional[int] = ..., initial_load_file: _Optional[str] = ...) -> None: ...

class RouterBiasPolicy(_message.Message):
    __slots__ = ("enabled", "speed", "rule", "interval_seconds")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    speed: float
    rule: str
    interval_seconds: float
    def __init__(self, enabled: _Optional[bool] = ..., speed: _Optional[float] = ..., rule: _Optional[str] = ..., interval_seconds: _Optional[float] = ...) -> None: ...

class PlanSummary(_message.Message):
    __slots__ = ("placement", "version", "algorithm", "predicted_balance", "slots_moved", "bytes_moved", "previous_version", "created_at", "reason", "previous_plan_balance")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_BALANCE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_MOVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_PLAN_BALANCE_FIELD_NUMBER: _ClassVar[int]
    placement: str
    version: int
    algorithm: str
    predicted_balance: _containers.RepeatedScalarFieldContainer[float]
    slots_moved: int
    bytes_moved: int
    previous_version: int
    created_at: _timestamp_pb2.Timestamp
    reason: str
    previous_plan_balance: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, placement: _Optional[str] = ..., version: _Optional[int] = ..., algorithm: _Optional[str] = ..., predicted_balance: _Optional[_Iterable[float]] = ..., slots_moved: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., previous_version: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., previous_plan_balance: _Optional[_Iterable[float]] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("summary", "topology", "phy2log", "log2phy", "logcnt", "load_snapshot")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    PHY2LOG_FIELD_NUMBER: _ClassVar[int]
    LOG2PHY_FIELD_NUMBER: _ClassVar[int]
    LOGCNT_FIELD_NUMBER: _ClassVar[int]
    LOAD_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    summary: PlanSummary
    topology: Topology
    phy2log: Int64Tensor
    log2phy: Int64Tensor
    logcnt: Int64Tensor
    load_snapshot: DoubleTensor
    def __init__(self, summary: _Optional[_Union[PlanSummary, _Mapping]] = ..., topology: _Optional[_Union[Topology, _Mapping]] = ..., phy2log: _Optional[_Union[Int64Tensor, _Mapping]] = ..., log2phy: _Optional[_Union[Int64Tensor, _Mapping]] = ..., logcnt: _Optional[_Union[Int64Tensor, _Mapping]] = ..., load_snapshot: _Optional[_Union[DoubleTensor, _Mapping]] = ...) -> None: ...

class GpuStats(_message.Message):
    __slots__ = ("utilization", "memory_used_bytes", "memory_total_bytes", "power_watts", "temperature_c")
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    POWER_WATTS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    utilization: float
    memory_used_bytes: int
    memory_total_bytes: int
    power_watts: float
    temperature_c: float
    def __init__(self, utilization: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., power_watts: _Optional[float] = ..., temperature_c: _Optional[float] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("node", "worker_rank", "placement", "plan_version", "sequence", "window_start", "window_end", "slot_counts", "expert_load", "gpu", "dropped_windows", "dropped_tokens", "agent_epoch", "steps", "failed_steps")
    NODE_FIELD_NUMBER: _ClassVar[int]
    WORKER_RANK_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    SLOT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOAD_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    DROPPED_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AGENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FAILED_STEPS_FIELD_NUMBER: _ClassVar[int]
    node: str
    worker_rank: int
    placement: str
    plan_version: int
    sequence: int
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    slot_counts: Int64Tensor
    expert_load: DoubleTensor
    gpu: GpuStats
    dropped_windows: int
    dropped_tokens: Int64Tensor
    agent_epoch: int
    steps: int
    failed_steps: int
    def __init__(self, node: _Optional[str] = ..., worker_rank: _Optional[int] = ..., placement: _Optional[str] = ..., plan_version: _Optional[int] = ..., sequence: _Optional[int] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., slot_counts: _Optional[_Union[Int64Tensor, _Mapping]] = ..., expert_load: _Optional[_Union[DoubleTensor, _Mapping]] = ..., gpu: _Optional[_Union[GpuStats, _Mapping]] = ..., dropped_windows: _Optional[int] = ..., dropped_tokens: _Optional[_Union[Int64Tensor, _Mapping]] = ..., agent_epoch: _Optional[int] = ..., steps: _Optional[int] = ..., failed_steps: _Optional[int] = ...) -> None: ...

class LoadAck(_message.Message):
    __slots__ = ("node", "worker_rank", "sequence", "status", "message")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[LoadAck.Status]
        ACCEPTED: _ClassVar[LoadAck.Status]
        DUPLICATE: _ClassVar[LoadAck.Status]
        STALE: _ClassVar[LoadAck.Status]
        REJECTED: _ClassVar[LoadAck.Status]
        OVERLOADED: _ClassVar[LoadAck.Status]
    STATUS_UNSPECIFIED: LoadAck.Status
    ACCEPTED: LoadAck.Status
    DUPLICATE: LoadAck.Status
    STALE: LoadAck.Status
    REJECTED: LoadAck.Status
    OVERLOADED: LoadAck.Status
    NODE_FIELD_NUMBER: _ClassVar[int]
    WORKER_RANK_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    node: str
    worker_rank: int
    sequence: int
    status: LoadAck.Status
    message: str
    def __init__(self, node: _Optional[str] = ..., worker_rank: _Optional[int] = ..., sequence: _Optional[int] = ..., status: _Optional[_Union[LoadAck.Status, str]] = ..., message: _Optional[str] = ...) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ("placement", "version", "in_force")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IN_FORCE_FIELD_NUMBER: _ClassVar[int]
    placement: str
    version: int
    in_force: bool
    def __init__(self, placement: _Optional[str] = ..., version: _Optional[int] = ..., in_force: _Optional[bool] = ...) -> None: ...

class ListPlansRequest(_message.Message):
    __slots__ = ("placement", "page_size", "page_token")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    placement: str
    page_size: int
    page_token: str
    def __init__(self, placement: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPlansResponse(_message.Message):
    __slots__ = ("plans", "next_page_token")
    PLANS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    plans: _containers.RepeatedCompositeFieldContainer[PlanSummary]
    next_page_token: str
    def __init__(self, plans: _Optional[_Iterable[_Union[PlanSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchPlansRequest(_message.Message):
    __slots__ = ("placement", "after_version")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    placement: str
    after_version: int
    def __init__(self, placement: _Optional[str] = ..., after_version: _Optional[int] = ...) -> None: ...

class ListPlacementsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PlacementState(_message.Message):
    __slots__ = ("spec", "plan_version", "observed_balance", "predicted_balance", "last_rebalance", "rollout_state", "latest_version")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_BALANCE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_BALANCE_FIELD_NUMBER: _ClassVar[int]
    LAST_REBALANCE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_STATE_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    spec: Placement
    plan_version: int
    observed_balance: _containers.RepeatedScalarFieldContainer[float]
    predicted_balance: _containers.RepeatedScalarFieldContainer[float]
    last_rebalance: _timestamp_pb2.Timestamp
    rollout_state: str
    latest_version: int
    def __init__(self, spec: _Optional[_Union[Placement, _Mapping]] = ..., plan_version: _Optional[int] = ..., observed_balance: _Optional[_Iterable[float]] = ..., predicted_balance: _Optional[_Iterable[float]] = ..., last_rebalance: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rollout_state: _Optional[str] = ..., latest_version: _Optional[int] = ...) -> None: ...

class ListPlacementsResponse(_message.Message):
    __slots__ = ("placements",)
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    placements: _containers.RepeatedCompositeFieldContainer[PlacementState]
    def __init__(self, placements: _Optional[_Iterable[_Union[PlacementState, _Mapping]]] = ...) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ("placement",)
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    placement: str
    def __init__(self, placement: _Optional[str] = ...) -> None: ...

class LoadWindow(_message.Message):
    __slots__ = ("placement", "load", "reports", "as_of", "gpu_load", "router_bias", "steps", "failed_steps", "dropped_tokens", "gpus")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    GPU_LOAD_FIELD_NUMBER: _ClassVar[int]
    ROUTER_BIAS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FAILED_STEPS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    placement: str
    load: DoubleTensor
    reports: int
    as_of: _timestamp_pb2.Timestamp
    gpu_load: DoubleTensor
    router_bias: DoubleTensor
    steps: int
    failed_steps: int
    dropped_tokens: DoubleTensor
    gpus: _containers.RepeatedCompositeFieldContainer[GpuReport]
    def __init__(self, placement: _Optional[str] = ..., load: _Optional[_Union[DoubleTensor, _Mapping]] = ..., reports: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gpu_load: _Optional[_Union[DoubleTensor, _Mapping]] = ..., router_bias: _Optional[_Union[DoubleTensor, _Mapping]] = ..., steps: _Optional[int] = ..., failed_steps: _Optional[int] = ..., dropped_tokens: _Optional[_Union[DoubleTensor, _Mapping]] = ..., gpus: _Optional[_Iterable[_Union[GpuReport, _Mapping]]] = ...) -> None: ...

class GpuReport(_message.Message):
    __slots__ = ("worker_rank", "node", "stats")
    WORKER_RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    worker_rank: int
    node: str
    stats: GpuStats
    def __init__(self, worker_rank: _Optional[int] = ..., node: _Optional[str] = ..., stats: _Optional[_Union[GpuStats, _Mapping]] = ...) -> None: ...

class GetBiasHistoryRequest(_message.Message):
    __slots__ = ("placement",)
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    placement: str
    def __init__(self, placement: _Optional[str] = ...) -> None: ...

class BiasPoint(_message.Message):
    __slots__ = ("at", "bias", "max_over_mean", "sequence")
    AT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    MAX_OVER_MEAN_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    bias: DoubleTensor
    max_over_mean: _containers.RepeatedScalarFieldContainer[float]
    sequence: int
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., bias: _Optional[_Union[DoubleTensor, _Mapping]] = ..., max_over_mean: _Optional[_Iterable[float]] = ..., sequence: _Optional[int] = ...) -> None: ...

class BiasHistory(_message.Message):
    __slots__ = ("placement", "points")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    placement: str
    points: _containers.RepeatedCompositeFieldContainer[BiasPoint]
    def __init__(self, placement: _Optional[str] = ..., points: _Optional[_Iterable[_Union[BiasPoint, _Mapping]]] = ...) -> None: ...

class DeletePlacementRequest(_message.Message):
    __slots__ = ("placement",)
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    placement: str
    def __init__(self, placement: _Optional[str] = ...) -> None: ...

class DeletePlacementResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ListRolloutsRequest(_message.Message):
    __slots__ = ("placement", "limit")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    placement: str
    limit: int
    def __init__(self, placement: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class RolloutRecord(_message.Message):
    __slots__ = ("rollout_id", "placement", "from_version", "to_version", "state", "reason", "started_at", "finished_at", "prepared", "prepare_seconds", "commit_seconds")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    PREPARED_FIELD_NUMBER: _ClassVar[int]
    PREPARE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    placement: str
    from_version: int
    to_version: int
    state: str
    reason: str
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    prepared: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    prepare_seconds: float
    commit_seconds: float
    def __init__(self, rollout_id: _Optional[str] = ..., placement: _Optional[str] = ..., from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., prepared: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., prepare_seconds: _Optional[float] = ..., commit_seconds: _Optional[float] = ...) -> None: ...

class ListRolloutsResponse(_message.Message):
    __slots__ = ("rollouts",)
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[RolloutRecord]
    def __init__(self, rollouts: _Optional[_Iterable[_Union[RolloutRecord, _Mapping]]] = ...) -> None: ...

class ComputePlanRequest(_message.Message):
    __slots__ = ("placement", "spec", "load", "previous_phy2log", "store", "rollout")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_PHY2LOG_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    placement: str
    spec: Placement
    load: DoubleTensor
    previous_phy2log: Int64Tensor
    store: bool
    rollout: bool
    def __init__(self, placement: _Optional[str] = ..., spec: _Optional[_Union[Placement, _Mapping]] = ..., load: _Optional[_Union[DoubleTensor, _Mapping]] = ..., previous_phy2log: _Optional[_Union[Int64Tensor, _Mapping]] = ..., store: _Optional[bool] = ..., rollout: _Optional[bool] = ...) -> None: ...

class LayerProfile(_message.Message):
    __slots__ = ("forward", "backward", "weight_grad", "activation_bytes", "param_bytes", "kind", "ep_imbalance")
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_GRAD_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EP_IMBALANCE_FIELD_NUMBER: _ClassVar[int]
    forward: float
    backward: float
    weight_grad: float
    activation_bytes: int
    param_bytes: int
    kind: str
    ep_imbalance: float
    def __init__(self, forward: _Optional[float] = ..., backward: _Optional[float] = ..., weight_grad: _Optional[float] = ..., activation_bytes: _Optional[int] = ..., param_bytes: _Optional[int] = ..., kind: _Optional[str] = ..., ep_imbalance: _Optional[float] = ...) -> None: ...

class ComputePipelineRequest(_message.Message):
    __slots__ = ("layers", "profile_yaml", "num_stages", "schedule", "micro_batches", "memory_limit_bytes", "p2p_seconds")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_YAML_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    P2P_SECONDS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerProfile]
    profile_yaml: str
    num_stages: int
    schedule: str
    micro_batches: int
    memory_limit_bytes: int
    p2p_seconds: float
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerProfile, _Mapping]]] = ..., profile_yaml: _Optional[str] = ..., num_stages: _Optional[int] = ..., schedule: _Optional[str] = ..., micro_batches: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., p2p_seconds: _Optional[float] = ...) -> None: ...

class PipelinePartition(_message.Message):
    __slots__ = ("boundaries", "step_time", "bubble_fraction", "peak_memory_bytes", "stage_busy")
    BOUNDARIES_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_FIELD_NUMBER: _ClassVar[int]
    BUBBLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGE_BUSY_FIELD_NUMBER: _ClassVar[int]
    boundaries: _containers.RepeatedScalarFieldContainer[int]
    step_time: float
    bubble_fraction: float
    peak_memory_bytes: _containers.RepeatedScalarFieldContainer[int]
    stage_busy: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, boundaries: _Optional[_Iterable[int]] = ..., step_time: _Optional[float] = ..., bubble_fraction: _Optional[float] = ..., peak_memory_bytes: _Optional[_Iterable[int]] = ..., stage_busy: _Optional[_Iterable[float]] = ...) -> None: ...

class TriggerRebalanceRequest(_message.Message):
    __slots__ = ("placement", "dry_run", "force", "propose", "version")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    PROPOSE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    placement: str
    dry_run: bool
    force: bool
    propose: bool
    version: int
    def __init__(self, placement: _Optional[str] = ..., dry_run: _Optional[bool] = ..., force: _Optional[bool] = ..., propose: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class RebalanceDecision(_message.Message):
    __slots__ = ("placement", "rebalance", "reason", "in_force_balance_mean", "predicted_balance", "gain", "slots_moved", "bytes_moved", "new_version")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    REBALANCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IN_FORCE_BALANCE_MEAN_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_BALANCE_FIELD_NUMBER: _ClassVar[int]
    GAIN_FIELD_NUMBER: _ClassVar[int]
    SLOTS_MOVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    placement: str
    rebalance: bool
    reason: str
    in_force_balance_mean: float
    predicted_balance: float
    gain: float
    slots_moved: int
    bytes_moved: int
    new_version: int
    def __init__(self, placement: _Optional[str] = ..., rebalance: _Optional[bool] = ..., reason: _Optional[str] = ..., in_force_balance_mean: _Optional[float] = ..., predicted_balance: _Optional[float] = ..., gain: _Optional[float] = ..., slots_moved: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., new_version: _Optional[int] = ...) -> None: ...

class RouterBias(_message.Message):
    __slots__ = ("placement", "sequence", "bias")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    placement: str
    sequence: int
    bias: DoubleTensor
    def __init__(self, placement: _Optional[str] = ..., sequence: _Optional[int] = ..., bias: _Optional[_Union[DoubleTensor, _Mapping]] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("node", "rank", "placement", "plan_version", "prepared_version", "address", "world_size")
    NODE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREPARED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    node: str
    rank: int
    placement: str
    plan_version: int
    prepared_version: int
    address: str
    world_size: int
    def __init__(self, node: _Optional[str] = ..., rank: _Optional[int] = ..., placement: _Optional[str] = ..., plan_version: _Optional[int] = ..., prepared_version: _Optional[int] = ..., address: _Optional[str] = ..., world_size: _Optional[int] = ...) -> None: ...

class HelloAck(_message.Message):
    __slots__ = ("protocol", "workers")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    protocol: RolloutProtocol
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, protocol: _Optional[_Union[RolloutProtocol, str]] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class RolloutCommand(_message.Message):
    __slots__ = ("rollout_id", "prepare", "commit", "abort", "bias", "hello", "placement", "ranks")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    PREPARE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    prepare: Plan
    commit: int
    abort: int
    bias: RouterBias
    hello: HelloAck
    placement: str
    ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, rollout_id: _Optional[str] = ..., prepare: _Optional[_Union[Plan, _Mapping]] = ..., commit: _Optional[int] = ..., abort: _Optional[int] = ..., bias: _Optional[_Union[RouterBias, _Mapping]] = ..., hello: _Optional[_Union[HelloAck, _Mapping]] = ..., placement: _Optional[str] = ..., ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class RolloutEvent(_message.Message):
    __slots__ = ("kind", "node", "rollout_id", "placement", "version", "workers", "message", "protocol")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[RolloutEvent.Kind]
        HELLO: _ClassVar[RolloutEvent.Kind]
        PREPARED: _ClassVar[RolloutEvent.Kind]
        COMMITTED: _ClassVar[RolloutEvent.Kind]
        ABORTED: _ClassVar[RolloutEvent.Kind]
        FAILED: _ClassVar[RolloutEvent.Kind]
        WORKER_LOST: _ClassVar[RolloutEvent.Kind]
        WORKER_JOINED: _ClassVar[RolloutEvent.Kind]
        BIAS_APPLIED: _ClassVar[RolloutEvent.Kind]
    KIND_UNSPECIFIED: RolloutEvent.Kind
    HELLO: RolloutEvent.Kind
    PREPARED: RolloutEvent.Kind
    COMMITTED: RolloutEvent.Kind
    ABORTED: RolloutEvent.Kind
    FAILED: RolloutEvent.Kind
    WORKER_LOST: RolloutEvent.Kind
    WORKER_JOINED: RolloutEvent.Kind
    BIAS_APPLIED: RolloutEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    kind: RolloutEvent.Kind
    node: str
    rollout_id: str
    placement: str
    version: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    message: str
    protocol: RolloutProtocol
    def __init__(self, kind: _Optional[_Union[RolloutEvent.Kind, str]] = ..., node: _Optional[str] = ..., rollout_id: _Optional[str] = ..., placement: _Optional[str] = ..., version: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., message: _Optional[str] = ..., protocol: _Optional[_Union[RolloutProtocol, str]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("node", "pull_interval_seconds")
    NODE_FIELD_NUMBER: _ClassVar[int]
    PULL_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node: str
    pull_interval_seconds: float
    def __init__(self, node: _Optional[str] = ..., pull_interval_seconds: _Optional[float] = ...) -> None: ...

class EngineLoadReport(_message.Message):
    __slots__ = ("placement", "engine", "expert_load", "window_start", "window_end", "engine_epoch", "sequence")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOAD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    ENGINE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    placement: str
    engine: str
    expert_load: DoubleTensor
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    engine_epoch: int
    sequence: int
    def __init__(self, placement: _Optional[str] = ..., engine: _Optional[str] = ..., expert_load: _Optional[_Union[DoubleTensor, _Mapping]] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., engine_epoch: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class EngineLoadAck(_message.Message):
    __slots__ = ("queued",)
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    queued: bool
    def __init__(self, queued: _Optional[bool] = ...) -> None: ...

class PullCountersRequest(_message.Message):
    __slots__ = ("ack_epoch", "ack_sequence", "agent_epoch")
    ACK_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ACK_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    AGENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ack_epoch: int
    ack_sequence: int
    agent_epoch: int
    def __init__(self, ack_epoch: _Optional[int] = ..., ack_sequence: _Optional[int] = ..., agent_epoch: _Optional[int] = ...) -> None: ...

class CounterSnapshot(_message.Message):
    __slots__ = ("rank", "placement", "plan_version", "window_start", "window_end", "slot_counts", "dropped_tokens", "steps", "failed_steps", "epoch", "sequence")
    RANK_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    SLOT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FAILED_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    placement: str
    plan_version: int
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    slot_counts: Int64Tensor
    dropped_tokens: Int64Tensor
    steps: int
    failed_steps: int
    epoch: int
    sequence: int
    def __init__(self, rank: _Optional[int] = ..., placement: _Optional[str] = ..., plan_version: _Optional[int] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., slot_counts: _Optional[_Union[Int64Tensor, _Mapping]] = ..., dropped_tokens: _Optional[_Union[Int64Tensor, _Mapping]] = ..., steps: _Optional[int] = ..., failed_steps: _Optional[int] = ..., epoch: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("rollout_id", "plan")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    plan: Plan
    def __init__(self, rollout_id: _Optional[str] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...

class VersionRequest(_message.Message):
    __slots__ = ("rollout_id", "placement", "version")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    placement: str
    version: int
    def __init__(self, rollout_id: _Optional[str] = ..., placement: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class WorkerAck(_message.Message):
    __slots__ = ("ok", "message", "worker", "seconds")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    worker: WorkerInfo
    seconds: float
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ..., worker: _Optional[_Union[WorkerInfo, _Mapping]] = ..., seconds: _Optional[float] = ...) -> None: ...
