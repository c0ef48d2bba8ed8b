"""The rebalance policy rules: threshold, hysteresis, cooldown, byte budget and cost, modes."""

import numpy as np
import pytest

from expertplane.controller.planning import Candidate
from expertplane.controller.policy import GIB, PolicyState, decide, record
from expertplane.controller.spec import PolicySpec


def candidate(current=1.5, predicted=1.2, bytes_moved=0) -> Candidate:
    z = np.zeros((1, 1), dtype=np.int64)
    return Candidate("deepseek", z, z[..., None], z, np.zeros((1, 1)),
                     np.array([predicted]), np.array([current]), bytes_moved // 10, bytes_moved)


def test_gain_is_relative_to_current_balance():
    assert candidate(2.0, 1.5).gain == pytest.approx(0.25)


def test_threshold():
    pol = PolicySpec(threshold=0.25)
    assert decide(pol, candidate(1.5, 1.2), PolicyState(), 0).rebalance is False  # gain 0.2
    d = decide(pol, candidate(2.0, 1.4), PolicyState(), 0)                          # gain 0.3
    assert d.rebalance and d.reason == "gain above threshold"
    assert (d.current_balance, d.predicted_balance) == (2.0, 1.4)


def test_hysteresis_needs_extra_gain_until_rearmed():
    pol = PolicySpec(threshold=0.1, hysteresis=0.1)
    state = PolicyState()
    first = decide(pol, candidate(2.0, 1.7), state, 0)     # gain 0.15
    assert first.rebalance
    record(state, first, pol, 0, rolled_out=True)
    again = decide(pol, candidate(2.0, 1.7), state, 1)     # 0.15 < 0.1 + 0.1
    assert not again.rebalance and "hysteresis" in again.reason
    record(state, again, pol, 1, rolled_out=False)
    assert not state.armed                                  # still above threshold: not re-armed
    low = decide(pol, candidate(2.0, 1.9), state, 2)       # gain 0.05 < threshold: re-arms
    record(state, low, pol, 2, rolled_out=False)
    assert state.armed
    assert decide(pol, candidate(2.0, 1.7), state, 3).rebalance


def test_cooldown():
    pol = PolicySpec(threshold=0.0, cooldown_seconds=60)
    state = PolicyState(last_rebalance=100.0)
    d = decide(pol, candidate(), state, 130)
    assert not d.rebalance and d.reason.startswith("cooldown: 30 s left")
    assert decide(pol, candidate(), state, 161).rebalance


def test_move_budget_and_cost_per_gib():
    state = PolicyState()
    d = decide(PolicySpec(threshold=0.0, move_budget_bytes=100), candidate(bytes_moved=101), state, 0)
    assert not d.rebalance and "over the budget" in d.reason
    pays = PolicySpec(threshold=0.0, min_gain_per_gib=0.1)
    # gain 0.2: pays for up to 2 GiB
    assert decide(pays, candidate(bytes_moved=int(1.9 * GIB)), state, 0).rebalance
    d = decide(pays, candidate(bytes_moved=int(2.1 * GIB)), state, 0)
    assert not d.rebalance and "does not pay" in d.reason


def test_modes_and_force():
    state = PolicyState(last_rebalance=0.0)
    off, manual = PolicySpec(mode="off", threshold=0), PolicySpec(mode="manual", threshold=0)
    assert not decide(off, candidate(), state, 1, manual=True).rebalance
    assert not decide(manual, candidate(), state, 1).rebalance
    assert decide(manual, candidate(), state, 1, manual=True).reason == "manual trigger"
    forced = decide(PolicySpec(mode="off", cooldown_seconds=1e9), candidate(1.0, 1.0), state, 1,
                    force=True)
    assert forced.rebalance and forced.reason == "forced"


def test_no_gain_never_rebalances_even_at_zero_threshold():
    assert not decide(PolicySpec(threshold=0.0), candidate(1.2, 1.2), PolicyState(), 0).rebalance


def test_candidate_for_replans_movement_aware_only_when_a_fresh_plan_gains_enough():
    from expertplane.controller.planning import compute_candidate
    from expertplane.controller.policy import candidate_for
    from expertplane.controller.spec import PlacementSpec

    rng = np.random.default_rng(3)
    load = (1.0 + rng.permuted(np.tile(np.arange(32.0), (4, 1)), axis=1)) ** -1.2
    spec = PlacementSpec(name="p", num_layers=4, num_experts=32, num_nodes=2, gpus_per_node=4,
                         num_replicas=48, num_groups=4, expert_bytes=1000, algorithm="balanced",
                         policy=PolicySpec(threshold=0.6))
    previous = compute_candidate(spec, load[:, ::-1].copy()).phy2log   # planned for other loads
    fresh = compute_candidate(spec, load, previous, movement_aware=False)
    aware = compute_candidate(spec, load, previous)
    assert 0 < fresh.gain < 0.6 and aware.slots_moved < fresh.slots_moved
    state = PolicyState()
    low = candidate_for(spec, load, previous, state)              # the fresh plan: turned down
    np.testing.assert_array_equal(low.phy2log, fresh.phy2log)
    assert not decide(spec.policy, low, state, 0).rebalance
    for pol, kw in ((PolicySpec(threshold=0.0), {}), (spec.policy, {"manual": True}),
                    (spec.policy, {"force": True})):
        from dataclasses import replace
        got = candidate_for(replace(spec, policy=pol), load, previous, state, **kw)
        np.testing.assert_array_equal(got.phy2log, aware.phy2log)
