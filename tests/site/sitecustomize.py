"""Started in every Python process the tests run (``tests/conftest.py`` puts this folder first on
``PYTHONPATH``): worker subprocesses and ``torch.multiprocessing`` ranks as well as pytest itself.

The test environment holds PyPI's torchvision (a CUDA build, needed by SGLang's imports) next to
the CPU torch wheel; see ``tests/engine_env.py``. transformers imports torchvision too whenever
it is installed, so every process that may import it needs the two op schemas declared first.
This hook waits for the first ``import torchvision`` and declares them just before it, so a
process that never imports torchvision never pays for importing torch here.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs ``engine_env.allow_torchvision_import()`` once, when torchvision is first looked up."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            spec = importlib.util.spec_from_file_location(
                "_expertplane_engine_env", Path(__file__).parents[1] / "engine_env.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module      # keeps its torch.library.Library (the schemas) alive
            spec.loader.exec_module(module)
            module.allow_torchvision_import()
        return None          # the regular finders import torchvision itself


def install() -> None:
    """Put the hook in front of the import system (idempotent)."""
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


install()
