"""controller.planning.warm_up: after it, planning for the placement compiles nothing new.

Each case runs in a fresh interpreter (numba dispatchers start empty there): it warms the
planner for a spec, records every planner dispatcher's compiled signatures, then plans the full
spec fresh and movement-aware (as the policy does) and records them again."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from expertplane.controller.planning import warm_up
from expertplane.controller.spec import PlacementSpec

_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from numba.core.dispatcher import Dispatcher
    from expertplane.controller.planning import compute_candidate, warm_up
    from expertplane.controller.spec import PlacementSpec

    def compiled():
        return {f"{name}.{attr}": sorted(map(str, obj.signatures))
                for name, module in list(sys.modules.items())
                if name.startswith("expertplane.planner")
                for attr, obj in vars(module).items() if isinstance(obj, Dispatcher)}

    spec = PlacementSpec(**json.loads(sys.argv[1]))
    thread = warm_up(spec)
    thread.join()
    warmed = compiled()
    rng = np.random.default_rng(1)
    load = rng.zipf(1.2, (spec.num_layers, spec.num_experts)).astype(np.float64)
    first = compute_candidate(spec, load)
    drifted = load * np.exp(rng.normal(0.0, 0.3, load.shape))
    compute_candidate(spec, drifted, previous=first.phy2log)
    print(json.dumps({"daemon": thread.daemon, "warmed": warmed, "planned": compiled()}))
""")

# global (4 groups on 3 nodes), hierarchical (4 groups on 2 nodes), and topology placements
SPECS = [dict(name="global", num_layers=6, num_experts=32, num_nodes=3, gpus_per_node=8,
              num_replicas=48, num_groups=4, algorithm="balanced"),
         dict(name="hier", num_layers=6, num_experts=32, num_nodes=2, gpus_per_node=4,
              num_replicas=48, num_groups=4, algorithm="deepseek"),
         dict(name="topo", num_layers=6, num_experts=32, num_nodes=2, gpus_per_node=4,
              num_replicas=48, num_groups=4, algorithm="topology")]


@pytest.mark.parametrize("fields", SPECS, ids=[s["name"] for s in SPECS])
def test_warm_up_compiles_every_kernel_the_plans_use(fields):
    out = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(fields)], check=True,
                         capture_output=True, text=True, timeout=240)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["daemon"]
    warmed, planned = result["warmed"], result["planned"]
    assert planned == warmed  # no kernel compiled a new signature for the real plans
    kernels = {"balanced": "balanced._solve_rows", "deepseek": "deepseek._replicate_kernel",
               "topology": "topology._fill_layer"}
    assert warmed[f"expertplane.planner.{kernels[fields['algorithm']]}"]
    if fields["algorithm"] != "topology":  # topology plans are aligned, never repaired
        assert warmed["expertplane.planner.movement._repair"]


def test_warm_up_failure_stays_in_its_thread_and_is_logged(caplog):
    # 5 experts cannot be split into 2 groups: the plan fails inside the thread, not the caller
    spec = PlacementSpec(name="bad", num_layers=1, num_experts=5, num_nodes=1, gpus_per_node=1,
                         num_replicas=5, num_groups=2)
    thread = warm_up(spec)
    thread.join(60)
    assert not thread.is_alive()
    assert any("planner warm-up for placement 'bad' failed" in r.getMessage()
               for r in caplog.records)
