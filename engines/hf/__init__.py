"""HuggingFace transformers MoE models served expert-parallel by ExpertPlane.

- :mod:`adapter`: the MoE blocks of a model (router + experts interface), checked.
- :mod:`layer`: :func:`expert_parallel` (our layer behind transformers' experts interface),
  :func:`expert_load`, :func:`ep_layers`.
"""

from expertplane.engines.torchvision_compat import allow_torchvision_import

allow_torchvision_import()      # before transformers imports torchvision (CUDA build on CPU torch)

from expertplane.engines.hf.adapter import UnsupportedModelError, find_moe_blocks  # noqa: E402
from expertplane.engines.hf.layer import ep_layers, expert_load, expert_parallel  # noqa: E402

__all__ = ["UnsupportedModelError", "ep_layers", "expert_load", "expert_parallel",
           "find_moe_blocks"]
