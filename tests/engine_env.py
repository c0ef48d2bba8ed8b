"""Test environment for the engines' own code (SGLang, vLLM wheels installed without GPU stacks).

The environment holds PyPI's torchvision (a CUDA build) beside the CPU torch wheel, and SGLang's
config package imports ``torchvision.transforms`` unconditionally: call
:func:`allow_torchvision_import` before importing SGLang. ``tests/site/sitecustomize.py`` already
does so in every process the tests start (spawned ranks too), just before torchvision's import.
"""

from expertplane.engines.torchvision_compat import allow_torchvision_import

__all__ = ["allow_torchvision_import"]
