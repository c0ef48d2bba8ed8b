"""Load traces: rows per expert and step over time, seeded generators and replays.

A trace is cut into ticks of ``steps_per_tick`` steps with constant load: ``load`` [T, L, E]
float32 rows (token x expert pairs) routed to each logical expert in one step, summed over all
GPUs, and ``tokens`` [T] tokens per GPU per step. Every generator is a pure function of its
arguments and ``seed``.

Generators (``generate``): per-layer Zipf popularity over a random ranking, with
* ``drift``: every expert's log-popularity takes a Gaussian random walk (rescaled each tick so
  the skew stays that of the Zipf law), ``drift_sigma`` = standard deviation of its total change;
* ``shift``: drift plus sudden shifts: at each shift a new tenant's popularity (another Zipf
  ranking per layer) takes ``shift_share`` of the traffic, replacing the previous tenant's;
* ``burst``: drift plus bursts: for ``burst_steps`` steps ``burst_share`` of the traffic follows
  a burst's own ranking, then it is gone.
All of them alternate decode-like phases (``decode_tokens`` per GPU and step) with prefill-like
phases (``prefill_tokens``), ``prefill_steps`` of every ``phase_steps``. A tick's rows are drawn
(Poisson) around their expectation, so windows see sampling noise.

Replays: ``from_demo`` rebuilds the per-step popularity of an ``expertplane demo`` run from its
configuration (the demo's own ``worker.synthetic.PopularityDrift``); ``from_sglang_dump`` reads
an SGLang expert-distribution dump recorded per forward pass (``logical_count`` [passes, L, E]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("drift", "shift", "burst")


@dataclass(frozen=True)
class Trace:
    """``load`` [T, L, E] float32 rows per expert and step; ``tokens`` [T] tokens per GPU and
    step; each tick lasts ``steps_per_tick`` steps."""

    name: str
    load: np.ndarray
    tokens: np.ndarray
    steps_per_tick: int

    def __post_init__(self) -> None:
        if self.load.ndim != 3 or self.tokens.shape != self.load.shape[:1]:
            raise ValueError(f"trace {self.name}: load must be [T, L, E] and tokens [T], got "
                             f"{list(self.load.shape)} and {list(self.tokens.shape)}")
        if self.steps_per_tick < 1:
            raise ValueError(f"steps_per_tick: must be >= 1, got {self.steps_per_tick}")

    @property
    def num_ticks(self) -> int:
        return self.load.shape[0]

    @property
    def num_steps(self) -> int:
        return self.num_ticks * self.steps_per_tick


@dataclass(frozen=True)
class TraceSpec:
    """Parameters of a generated trace (steps in model steps)."""

    kind: str = "drift"
    num_steps: int = 6000
    steps_per_tick: int = 50
    zipf: float = 1.0
    drift_sigma: float = 1.0
    shifts: int = 2
    shift_share: float = 0.5
    bursts: int = 3
    burst_steps: int = 300
    burst_share: float = 0.4
    phase_steps: int = 2000
    prefill_steps: int = 100
    decode_tokens: int = 128
    prefill_tokens: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: must be one of {list(KINDS)}, got {self.kind!r}")
        for name in ("num_steps", "steps_per_tick", "decode_tokens", "prefill_tokens",
                     "phase_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


def _zipf_logits(rng, layers: int, experts: int, s: float) -> np.ndarray:
    """[L, E] log-popularity -s*log(rank) over a random ranking per layer."""
    ranks = np.argsort(rng.random((layers, experts)), axis=1) + 1.0
    return -s * np.log(ranks)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _drifting(rng, ticks: int, layers: int, experts: int, spec: TraceSpec) -> np.ndarray:
    """[T, L, E] probabilities: Zipf logits plus a random walk, skew held at the Zipf law's."""
    base = _zipf_logits(rng, layers, experts, spec.zipf)
    steps = rng.normal(0.0, spec.drift_sigma / np.sqrt(max(ticks, 1)), (ticks, layers, experts))
    logits = base[None] + np.cumsum(steps, axis=0)
    logits -= logits.mean(axis=-1, keepdims=True)
    logits *= base.std(axis=-1, keepdims=True)[None] / logits.std(axis=-1, keepdims=True)
    return _softmax(logits)


def _event_ticks(rng, ticks: int, count: int) -> np.ndarray:
    """``count`` distinct event ticks in the middle 80% of the trace, sorted."""
    lo, hi = int(0.1 * ticks), max(int(0.9 * ticks), int(0.1 * ticks) + count)
    return np.sort(rng.choice(np.arange(lo, hi), size=min(count, hi - lo), replace=False))


def generate(layers: int, experts: int, top_k: int, num_gpus: int, spec: TraceSpec) -> Trace:
    """A generated trace for a cluster of ``num_gpus`` GPUs routing ``top_k`` experts/token."""
    rng = np.random.default_rng([spec.seed, KINDS.index(spec.kind)])
    ticks = -(-spec.num_steps // spec.steps_per_tick)
    probs = _drifting(rng, ticks, layers, experts, spec)
    k = spec.steps_per_tick
    if spec.kind == "shift":
        share = np.zeros(ticks)
        tenant = np.zeros((ticks, layers, experts))
        for at in _event_ticks(rng, ticks, spec.shifts):
            share[at:] = spec.shift_share
            tenant[at:] = _softmax(_zipf_logits(rng, layers, experts, spec.zipf))
        probs = (1 - share)[:, None, None] * probs + share[:, None, None] * tenant
    elif spec.kind == "burst":
        width = max(1, spec.burst_steps // k)
        for at in _event_ticks(rng, ticks, spec.bursts):
            burst = _softmax(_zipf_logits(rng, layers, experts, spec.zipf))
            end = min(at + width, ticks)
            probs[at:end] = (1 - spec.burst_share) * probs[at:end] + spec.burst_share * burst
    step = np.arange(ticks) * k
    prefill = (step % spec.phase_steps) >= spec.phase_steps - spec.prefill_steps
    tokens = np.where(prefill, spec.prefill_tokens, spec.decode_tokens).astype(np.float64)
    expected = probs * (tokens * num_gpus * top_k * k)[:, None, None]   # rows per tick
    load = rng.poisson(expected) / k
    return Trace(f"{spec.kind}-s{spec.seed}", load.astype(np.float32), tokens, k)


def from_demo(config: dict, num_gpus: int, num_steps: int, steps_per_tick: int,
              seed: int = 0) -> Trace:
    """The per-step load of an ``expertplane demo`` run with ``config`` (the demo's YAML:
    ``placement`` and ``workload``): its popularity at the first step of each tick times its
    tokens per rank and step, ``num_gpus`` ranks and ``top_k``."""
    from expertplane.worker.synthetic import PopularityDrift, StreamConfig

    model, work = config["placement"]["model"], config["workload"]
    stream = StreamConfig(tokens_per_step=work["tokens_per_step"],
                          zipf_exponent=work["zipf_exponent"], steer=work["steer"],
                          drift_period=work["drift_period"], drift_swaps=work["drift_swaps"],
                          seed=seed)
    drift = PopularityDrift(model["num_layers"], model["num_experts"], stream)
    ticks = -(-num_steps // steps_per_tick)
    probs = np.stack([drift.probabilities(t * steps_per_tick) for t in range(ticks)])
    tokens = np.full(ticks, float(stream.tokens_per_step))
    load = probs * (stream.tokens_per_step * num_gpus * work["top_k"])
    return Trace(f"demo-s{seed}", load.astype(np.float32), tokens, steps_per_tick)


def from_sglang_dump(logical_count, num_gpus: int, top_k: int, steps_per_tick: int) -> Trace:
    """An SGLang per-pass dump's ``logical_count`` [passes, L, E] (rows per expert and forward
    pass) as a trace; passes are averaged per tick, tokens per GPU = rows / (GPUs x top_k)."""
    counts = np.asarray(logical_count, dtype=np.float64)
    if counts.ndim != 3 or counts.shape[0] < 1:
        raise ValueError(f"logical_count: must be [passes, L, E], got {list(counts.shape)}")
    ticks = counts.shape[0] // steps_per_tick
    if ticks < 1:
        raise ValueError(f"logical_count: {counts.shape[0]} passes, fewer than one tick of "
                         f"{steps_per_tick}")
    load = counts[:ticks * steps_per_tick].reshape(ticks, steps_per_tick, *counts.shape[1:])
    load = load.mean(axis=1)
    tokens = load[:, 0, :].sum(axis=-1) / (num_gpus * top_k)
    return Trace("sglang-dump", load.astype(np.float32), tokens, steps_per_tick)
