"""``expertplane warm``: compile the planner's numba kernels into numba's on-disk cache now.

Every placement algorithm (deepseek, balanced, topology), fresh and movement-aware, under both
policies (hierarchical: groups on nodes; global), the redundancy sizing and the lower bound, and
the pipeline partitioner for each schedule. Later processes load the compiled code from the
cache instead of compiling it on first use (10-100 s per algorithm on 2 busy CPUs). ``make
setup`` and the Docker build run it; the cache is numba's (``__pycache__`` next to the sources,
or ``$NUMBA_CACHE_DIR``) and is valid for this CPU model and these sources.
"""

from __future__ import annotations

import argparse
import time

ALGORITHMS = ("deepseek", "balanced", "topology")


def register(sub) -> None:
    parser = sub.add_parser("warm", help="compile the planner ahead of time (numba cache)",
                            description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=_run)


def placement_specs() -> list:
    """One small placement per algorithm and policy (hierarchical: 4 groups on 2 nodes; global:
    4 groups on 3 nodes): the kernels compile per argument type, not per size."""
    from expertplane.controller.spec import PlacementSpec

    return [PlacementSpec(name=f"{policy}-{algorithm}", num_layers=1, num_experts=32,
                          num_nodes=nodes, gpus_per_node=4, num_replicas=48, num_groups=4,
                          algorithm=algorithm)
            for algorithm in ALGORITHMS
            for policy, nodes in (("hierarchical", 2), ("global", 3))
            if (algorithm, policy) != ("topology", "global")]   # topology is hierarchical only


def _warm_pipeline() -> None:
    from expertplane.cli.pipeline import SCHEDULES
    from expertplane.planner.pipeline import load_profile, partition
    from expertplane.planner.pipeline.profile import shipped_profiles

    profile = load_profile(shipped_profiles()["deepseek-v3-like"])
    for schedule in SCHEDULES:
        partition(profile, 4, schedule=schedule, micro_batches=8)


def _warm_sizing() -> None:
    import numpy as np

    from expertplane.planner.sizing import recommend_redundancy

    load = (1.0 + np.random.default_rng(0).permutation(32))[None, :] ** -1.0
    for nodes, redundant in ((2, 8), (3, 4)):      # 40 slots on 8 GPUs, 36 on 12 GPUs
        recommend_redundancy(load, 4, nodes, 4 * nodes, 1.05, [redundant], "deepseek")


def steps() -> list[tuple[str, object]]:
    """(label, callable) of every warm-up step."""
    from expertplane.controller.planning import _compile_planner   # what the controller warms

    out = [(f"planner {spec.name}", lambda spec=spec: _compile_planner(spec))
           for spec in placement_specs()]
    out += [("sizing and bounds", _warm_sizing), ("pipeline partitioner", _warm_pipeline)]
    return out


def _run(args) -> int:
    start = time.perf_counter()
    for label, step in steps():
        t = time.perf_counter()
        print(f"warm: {label} ...", end=" ", flush=True)
        step()
        print(f"{time.perf_counter() - t:.1f} s", flush=True)
    print(f"warm: planner compiled and cached in {time.perf_counter() - start:.1f} s", flush=True)
    return 0
