"""Test environment for the engines' own code (SGLang, vLLM wheels installed without GPU stacks).

The environment holds PyPI's torchvision (a CUDA build) beside the CPU torch wheel, and SGLang's
config package imports ``torchvision.transforms`` unconditionally: call
:func:`allow_torchvision_import` before importing SGLang. ``tests/site/sitecustomize.py`` already
does so in every process the tests start (spawned ranks too), just before torchvision's import.

The small DeepSeek-V3 model directory and SGLang's ServerArgs override are the ones
``expertplane bench engines`` uses (``benchmarks/engines.py``).
"""

from expertplane.benchmarks.engines import model_dir as deepseek_v3_dir
from expertplane.benchmarks.engines import publish_server_args
from expertplane.engines.torchvision_compat import allow_torchvision_import

__all__ = ["allow_torchvision_import", "deepseek_v3_dir", "publish_server_args"]
