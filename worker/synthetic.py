"""A synthetic MoE model and a drifting, skewed token stream, deterministic from seeds.

The model is ``L`` expert-parallel MoE layers (:class:`EPMoELayer`, seeded router and expert
weights per (seed, layer, logical expert)) on a residual stream::

    x_l = h_l / rms(h_l) + steer * u_l[pref_l(token)]      (layer input)
    h_{l+1} = h_l + moe_l(x_l)

``u_l[e]`` is the unit direction of layer ``l``'s router row for expert ``e``, so a token
whose preferred expert at layer ``l`` is ``e`` sends most of its traffic to ``e`` (the rest
of its top-k is spread by the residual stream). Preferred experts are drawn per token from a
Zipf law over a per-layer popularity ranking that drifts: every ``drift_period`` steps
``drift_swaps`` random pairs of ranks trade places. Everything is a function of
(seed, layer, step) and (seed, rank, step), so every rank agrees on the popularity and a run
repeats exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from expertplane.kernels.moe import EPMoELayer, LayerPlacement
from expertplane.kernels.reference import dense_moe_reference

__all__ = ["DTYPES", "ModelConfig", "PopularityDrift", "StreamConfig", "SyntheticBatch",
           "StepResult", "SyntheticMoEModel", "TokenStream"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# ||layer - dense reference|| / ||reference|| accepted per layer.
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class ModelConfig:
    """Model sizes: ``num_layers`` MoE layers of ``num_experts`` logical experts, hidden size
    ``hidden``, expert intermediate size ``intermediate``, ``top_k`` experts per token,
    DeepSeek-V3 group-limited routing over ``num_groups`` groups keeping ``topk_groups``."""

    num_layers: int = 4
    num_experts: int = 16
    hidden: int = 64
    intermediate: int = 128
    top_k: int = 4
    num_groups: int = 1
    topk_groups: int = 1
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "hidden", "intermediate", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: {self.top_k} exceeds num_experts {self.num_experts}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (w13 [H, 2I] + w2 [I, H])."""
        return 3 * self.hidden * self.intermediate * torch.empty(0, dtype=self.torch_dtype).element_size()


@dataclass(frozen=True)
class StreamConfig:
    """Token stream: ``tokens_per_step`` tokens per rank and step; preferred experts follow
    Zipf(``zipf_exponent``) over a ranking that drifts by ``drift_swaps`` transpositions per
    layer every ``drift_period`` steps (0 = never); ``steer`` scales the preference signal."""

    tokens_per_step: int = 256
    zipf_exponent: float = 1.2
    steer: float = 4.0
    drift_period: int = 50
    drift_swaps: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens_per_step < 1:
            raise ValueError(f"tokens_per_step: must be >= 1, got {self.tokens_per_step}")
        if self.zipf_exponent < 0 or self.steer < 0:
            raise ValueError("zipf_exponent/steer: must be >= 0")
        if self.drift_period < 0 or self.drift_swaps < 0:
            raise ValueError("drift_period/drift_swaps: must be >= 0")


class PopularityDrift:
    """Per-layer expert popularity at any step: ``probabilities(step)`` -> [L, E] float64."""

    def __init__(self, num_layers: int, num_experts: int, config: StreamConfig) -> None:
        self.num_layers, self.num_experts, self.config = num_layers, num_experts, config
        ranks = np.arange(1, num_experts + 1, dtype=np.float64)
        zipf = ranks ** -config.zipf_exponent
        self._zipf = zipf / zipf.sum()  # probability of the expert at each popularity rank
        rng = np.random.default_rng([config.seed, 0x5EED])
        self._rankings = [np.stack([rng.permutation(num_experts) for _ in range(num_layers)])]

    def epoch(self, step: int) -> int:
        return step // self.config.drift_period if self.config.drift_period else 0

    def ranking(self, step: int) -> np.ndarray:
        """[L, E]: ranking[l, j] = the expert at popularity rank j of layer l."""
        epoch = self.epoch(step)
        while len(self._rankings) <= epoch:
            prev = self._rankings[-1].copy()
            rng = np.random.default_rng([self.config.seed, 0xD21F7, len(self._rankings)])
            for layer in range(self.num_layers):
                for _ in range(self.config.drift_swaps):
                    i, j = rng.integers(0, self.num_experts, size=2)
                    prev[layer, [i, j]] = prev[layer, [j, i]]
            self._rankings.append(prev)
        return self._rankings[epoch]

    def probabilities(self, step: int) -> np.ndarray:
        """[L, E] probability that a token prefers each expert at ``step``."""
        out = np.empty((self.num_layers, self.num_experts))
        ranking = self.ranking(step)
        for layer in range(self.num_layers):
            out[layer, ranking[layer]] = self._zipf
        return out


@dataclass(frozen=True)
class SyntheticBatch:
    """One rank's tokens of one step: ``hidden`` [T, H] initial residual stream and
    ``preferred`` [L, T] int64 preferred logical expert per layer."""

    step: int
    hidden: Tensor
    preferred: Tensor


class TokenStream:
    """Deterministic batches for one rank: ``batch(step)`` depends on (seed, rank, step) only."""

    def __init__(self, model: ModelConfig, config: StreamConfig, rank: int,
                 device: str | torch.device = "cpu") -> None:
        self.model, self.config, self.rank = model, config, rank
        self.device = torch.device(device)
        self._gen = torch.Generator(device=self.device)
        self.drift = PopularityDrift(model.num_layers, model.num_experts, config)

    def batch(self, step: int) -> SyntheticBatch:
        """The batch of ``step``: preferred experts drawn on the host, the hidden states on
        the device (a generator seeded by (seed, rank, step); equal across runs on one
        device type)."""
        rng = np.random.default_rng([self.config.seed, 0x70C, self.rank, step])
        probs = self.drift.probabilities(step)
        t = self.config.tokens_per_step
        preferred = np.stack([rng.choice(self.model.num_experts, size=t, p=p) for p in probs])
        self._gen.manual_seed(int(rng.integers(0, 2**63 - 1)))
        hidden = torch.randn(t, self.model.hidden, generator=self._gen, device=self.device)
        return SyntheticBatch(step, hidden, torch.from_numpy(preferred).to(self.device))


@dataclass(frozen=True)
class StepResult:
    """Output of one step: ``hidden`` [T, H] final residual stream; ``max_error``: largest
    per-layer relative error against the dense reference (None when not verified)."""

    hidden: Tensor
    max_error: float | None


class SyntheticMoEModel(nn.Module):
    """``L`` :class:`EPMoELayer` s over ``group`` (one placement per layer)."""

    def __init__(self, config: ModelConfig, stream: StreamConfig,
                 placements: Sequence[LayerPlacement], *, group: dist.ProcessGroup | None = None,
                 gpus_per_node: int | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        if len(placements) != config.num_layers:
            raise ValueError(f"placements: need {config.num_layers} layers, got {len(placements)}")
        self.config, self.stream = config, stream
        self.layers = nn.ModuleList(
            EPMoELayer(config.hidden, config.intermediate, config.num_experts, placements[l],
                       group=group, top_k=config.top_k, num_groups=config.num_groups,
                       topk_groups=config.topk_groups, gpus_per_node=gpus_per_node, layer=l,
                       seed=config.seed, dtype=config.torch_dtype, device=device)
            for l in range(config.num_layers))
        # [L, E, H] unit router directions: the preference signal.
        dirs = torch.stack([layer.router_weight.detach() for layer in self.layers])
        self.register_buffer("directions", dirs / dirs.norm(dim=-1, keepdim=True))

    @property
    def tolerance(self) -> float:
        return _TOLERANCE[self.config.torch_dtype]

    def pretune(self, world_size: int) -> bool:
        """Tune the expert GEMMs (Triton autotune) for every load level a step can bring, before
        serving: at most ``tokens_per_step`` x ``world_size`` x ``top_k`` rows reach one rank's
        slots. One layer suffices (the tuning is per shape, every layer has the same). False
        when the experts never take the Triton path."""
        experts = self.layers[0].experts
        rows = self.stream.tokens_per_step * world_size * self.config.top_k
        return experts.pretune(-(-rows // experts.num_slots))

    def layer_input(self, layer: int, h: Tensor, preferred: Tensor) -> Tensor:
        """x_l [T, H] = h / rms(h) + steer * u_l[preferred[l]]."""
        rms = h.pow(2).mean(dim=-1, keepdim=True).add(1e-6).sqrt()
        return h / rms + self.stream.steer * self.directions[layer, preferred[layer]]

    def forward(self, batch: SyntheticBatch, verify: bool = False) -> StepResult:
        """Run every layer (collective on all ranks). ``verify``: compare each layer with the
        single-process dense reference on this rank's tokens."""
        h = batch.hidden.float()
        worst = 0.0
        for l, layer in enumerate(self.layers):
            x = self.layer_input(l, h, batch.preferred)
            y = layer(x).float()
            if verify:
                ref = dense_moe_reference(x, layer.router_weight, layer.router,
                                          layer.expert_weights, layer.selection_bias)
                err = float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))
                worst = max(worst, err)
            h = h + y
        return StepResult(h, worst if verify else None)

    def read_counters(self) -> Tensor:
        """Tokens per local slot since the last read, all layers: host LongTensor [L, S]."""
        return torch.stack([layer.read_counters(reset=True) for layer in self.layers])
