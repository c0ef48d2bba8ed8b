"""Started in every Python process the tests run (``tests/conftest.py`` puts this folder first on
``PYTHONPATH``): worker subprocesses and ``torch.multiprocessing`` ranks as well as pytest itself.

The test environment holds PyPI's torchvision (a CUDA build, needed by SGLang's imports) next to
the CPU torch wheel; see ``expertplane.engines.torchvision_compat``. transformers imports torchvision too whenever
it is installed, so every process that may import it needs the two op schemas declared first.
This hook waits for the first ``import torchvision`` and declares them just before it, so a
process that never imports torchvision never pays for importing torch here.
"""

from __future__ import annotations

import importlib.abc
import sys


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs ``allow_torchvision_import()`` once, when torchvision is first looked up."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            from expertplane.engines.torchvision_compat import allow_torchvision_import
            allow_torchvision_import()
        return None          # the regular finders import torchvision itself


def install() -> None:
    """Put the hook in front of the import system (idempotent)."""
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


install()
