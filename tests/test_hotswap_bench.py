"""The hot-swap benchmark's set-up: the swap it times moves exactly the experts it claims, and
bad options are rejected with the option's name."""

import argparse

import pytest
import torch

from expertplane.benchmarks import hotswap
from expertplane.kernels.hotswap import plan_transfers


def _cfg(world: int, local: int = 8) -> dict:
    return {"world_size": world, "local_experts": local, "layers": 2}


@pytest.mark.parametrize("world,moved", [(1, 2), (1, 8), (2, 1), (2, 5), (4, 3)])
def test_rotation_moves_exactly_m_experts_per_rank(world, moved):
    cfg = _cfg(world)
    old = torch.stack([p.phy2log for p in hotswap._placements(cfg, moved, False)])
    new = torch.stack([p.phy2log for p in hotswap._placements(cfg, moved, True)])
    plan = plan_transfers(old, new, world)
    for rank in range(world):
        fills = plan.for_rank(rank)
        assert len(fills) == moved * cfg["layers"]
        kind = "local" if world == 1 else "remote"
        assert {f.source for f in fills} == {kind}
        if world > 1:
            assert {f.src_rank for f in fills} == {(rank - 1) % world}


def _args(*argv):
    parser = argparse.ArgumentParser()
    hotswap.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("argv,field", [
    (["--device", "cpu", "--world-size", "1", "--moved", "1"], "moved"),
    (["--device", "cpu", "--moved", "9", "--local-experts", "8"], "moved"),
    (["--device", "cpu", "--world-size", "0"], "world_size"),
    (["--device", "cpu", "--world-size", "1", "--local-experts", "4", "--moved", "2"], "top_k"),
])
def test_bad_options_name_the_field(argv, field):
    with pytest.raises(ValueError, match=field):
        hotswap.resolve_config(_args(*argv))


def test_staging_steps_are_compared_with_the_steps_just_before_their_swap():
    series = [("between", 1.0), ("between", 1.0), ("starting", 1.5), ("copying", 1.1),
              ("copying", 1.2), ("waiting", 1.0), ("committing", 1.3),
              ("between", 2.0), ("starting", 2.4), ("copying", 2.2), ("committing", 2.1)]
    ratios = [x for pair in hotswap._staging_vs_before(series) for x in pair]
    assert ratios == pytest.approx([1.2, 1.5, 1.15, 1.2])


def test_settle_steps_must_be_positive():
    with pytest.raises(ValueError, match="settle_steps"):
        hotswap.resolve_config(_args("--device", "cpu", "--settle-steps", "0"))
