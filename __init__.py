"""ExpertPlane: a control plane for Mixture-of-Experts clusters.

Subpackages: ``planner`` (pure EPLB and pipeline computation), ``controller`` (gRPC
control plane, plan store, operator), ``agent`` (node agent), ``kernels`` (worker-side
MoE layer and hot-swap), ``worker`` (the reference worker process), ``proto`` (generated wire API), ``cli`` (the ``expertplane`` command).
"""

__version__ = "0.1.0"
