"""Test environment for the engines' own code (SGLang, vLLM wheels installed without GPU stacks).

PyPI's torchvision is a CUDA build: next to the CPU torch wheel its C++ ops library cannot load
(it links libtorch_cuda), and its Python layer then fails at import registering fake kernels for
the two ops ``torchvision::nms`` and ``torchvision::qnms`` that never got declared. SGLang's config
package imports ``torchvision.transforms`` unconditionally. ``allow_torchvision_import()`` declares
those two op schemas (no kernels: calling them still fails) so the rest of torchvision imports;
call it before importing SGLang, in every process (spawned ranks too).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_declared = None


def allow_torchvision_import() -> None:
    """Declare torchvision's two unguarded op schemas when its CUDA build sits on CPU torch."""
    global _declared
    import torch

    if _declared is not None or torch.version.cuda is not None:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    version = Path(list(spec.submodule_search_locations)[0], "version.py")
    if "+cu" not in version.read_text():  # a CPU build has its ops library
        return
    try:
        torch.ops.torchvision.nms          # declared already (tests/site/sitecustomize.py's copy)
        return
    except (AttributeError, RuntimeError):
        pass
    _declared = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _declared.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
