"""PyPI's torchvision next to a CPU build of torch.

PyPI's torchvision wheels are CUDA builds. Installed beside the CPU torch wheel (as the engines'
test environment and ``make setup`` do: SGLang imports ``torchvision.transforms``), torchvision's
C++ ops library cannot load (it links libtorch_cuda), and its Python layer then fails at import
while registering fake kernels for ``torchvision::nms`` and ``torchvision::qnms``, which were never
declared. transformers imports torchvision whenever it is installed, so the failure reaches every
model class. :func:`allow_torchvision_import` declares those two op schemas (no kernels: calling
them still fails) so the rest of torchvision, and transformers, import.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_declared = None      # the torch.library.Library holding the schemas; dropping it undeclares them


def allow_torchvision_import() -> None:
    """Declare torchvision's two unguarded op schemas when its CUDA build sits on CPU torch; a
    no-op with a matching torchvision, without one, or when they are declared already."""
    global _declared
    import torch

    if _declared is not None or torch.version.cuda is not None:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    version = Path(list(spec.submodule_search_locations)[0], "version.py")
    if not version.exists() or "+cu" not in version.read_text():   # a CPU build has its ops
        return
    try:
        torch.ops.torchvision.nms          # loaded or declared already
        return
    except (AttributeError, RuntimeError):
        pass
    _declared = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _declared.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
