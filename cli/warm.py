"""``expertplane warm``: compile the planner's numba kernels into numba's on-disk cache now.

Every placement algorithm (deepseek, balanced, topology), fresh and movement-aware, under both
policies (hierarchical: groups on nodes; global), the redundancy sizing and the lower bound
(``planner.warm``), and the pipeline partitioner for each schedule. Later processes load the
compiled code from the cache instead of compiling it (40-300 s in all on 2 busy CPUs). ``make
setup`` and the Docker build run it. Without it, the first plan of a process that finds the
cache empty starts the same build in the background and plans with numpy meanwhile
(``planner.compiled``). The cache is numba's (``__pycache__`` next to the sources, or
``$NUMBA_CACHE_DIR``) and is valid for this CPU model and these sources.
"""

from __future__ import annotations

import argparse
import time


def register(sub) -> None:
    parser = sub.add_parser("warm", help="compile the planner ahead of time (numba cache)",
                            description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=_run)


def _warm_pipeline() -> None:
    from expertplane.cli.pipeline import SCHEDULES
    from expertplane.planner.pipeline import load_profile, partition
    from expertplane.planner.pipeline.profile import shipped_profiles

    profile = load_profile(shipped_profiles()["deepseek-v3-like"])
    for schedule in SCHEDULES:
        partition(profile, 4, schedule=schedule, micro_batches=8)


def _run(args) -> int:
    from expertplane.planner import warm

    print("warm: compiling the planner's kernels (each step prints when done) ...", flush=True)
    seconds = warm.run(lambda line: print(f"warm: {line}", flush=True))
    t = time.perf_counter()
    _warm_pipeline()
    print(f"warm: pipeline partitioner: {time.perf_counter() - t:.1f} s", flush=True)
    print(f"warm: planner compiled and cached in {seconds + time.perf_counter() - t:.1f} s",
          flush=True)
    return 0
