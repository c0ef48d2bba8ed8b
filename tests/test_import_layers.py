"""The package import direction (docs/architecture.md): every import statement of every module,
function-local ones included, points down the layers, never up.

    errors <- planner <- kernels <- worker          (an arrow points at what imports)
    errors, planner <- controller
    errors <- rpc <- agent, controller, worker
    proto  <- rpc
    errors, planner, kernels, rpc, proto <- engines <- worker
    cli, demo, benchmarks and __main__ entry points: on top, may import every package

The checker parses sources (ast) and imports nothing, so it also judges planted sources.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]   # the repository root is the package

# package -> the other packages of expertplane it may import (top-level modules count as
# packages: errors.py is "errors"). cli, demo and benchmarks are not listed: they may import all.
ALLOWED: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "numba_cache": frozenset(),   # seeding numba's cache of the planner's kernels (stdlib only)
    "planner": frozenset({"errors"}),
    "kernels": frozenset({"errors", "planner"}),
    "proto": frozenset(),
    "rpc": frozenset({"errors", "proto"}),
    "agent": frozenset({"errors", "proto", "rpc"}),
    "controller": frozenset({"errors", "planner", "proto", "rpc"}),
    # engine adapters and plugins (Hugging Face models on our layer, SGLang / vLLM plugins)
    "engines": frozenset({"errors", "planner", "kernels", "proto", "rpc"}),
    "worker": frozenset({"errors", "planner", "kernels", "engines", "proto", "rpc"}),
}
# third-party libraries a package may import (besides the standard library); unlisted: any.
# The planner is pure computation; PyYAML only reads plan and profile files (planner.io,
# planner.pipeline.profile).
THIRD_PARTY: dict[str, frozenset[str]] = {
    "planner": frozenset({"numpy", "scipy", "numba", "torch", "yaml"}),
    "kernels": frozenset({"numpy", "torch", "triton"}),
}
TOP = ("cli", "demo", "benchmarks")
SKIPPED_DIRS = {"tests", "docs", "examples", "manifests"}


def package_of(module: str) -> str:
    """``expertplane.planner.eplb`` -> ``planner``; ``expertplane`` itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_modules(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source`` (the text of ``module``),
    relative imports resolved; ``is_package``: ``source`` is the package's ``__init__``."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, name))
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """Upward imports of ``module`` (named ``expertplane.<package>...``), one line each."""
    package = package_of(module)
    if package in TOP or package not in ALLOWED or module.endswith(".__main__"):
        return []   # the top packages, and entry points (python -m ...), may import all
    out = []
    for line, name in imported_modules(module, source, is_package):
        top = name.split(".")[0]
        if top == "expertplane":
            target = package_of(name)
            if target and target != package and target not in ALLOWED[package]:
                out.append(f"{module}:{line} imports {name} ({package} -> {target})")
        elif top not in sys.stdlib_module_names and package in THIRD_PARTY \
                and top not in THIRD_PARTY[package]:
            out.append(f"{module}:{line} imports {name} (third-party, not for {package})")
    return out


def project_modules() -> list[tuple[str, pathlib.Path]]:
    """(module name, path) of every Python module of the package."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIPPED_DIRS or any(p.startswith(".") or p.endswith(".egg-info")
                                               for p in rel.parts):
            continue
        parts = ["expertplane", *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    return out


def test_every_package_imports_only_downward():
    modules = project_modules()
    assert len(modules) > 100 and any(m == "expertplane.planner.eplb" for m, _ in modules)
    found = [v for module, path in modules
             for v in violations(module, path.read_text(), path.name == "__init__.py")]
    assert found == []


def test_every_package_has_a_layer():
    """A new package must be placed (ALLOWED or TOP) before it is checked."""
    packages = {package_of(m) for m, _ in project_modules()} - {""}
    assert packages - set(ALLOWED) - set(TOP) == set()


@pytest.mark.parametrize("module,source", [
    ("expertplane.planner.fake", "from expertplane.kernels.routing import route\n"),
    ("expertplane.planner.fake", "def f():\n    from expertplane.controller import core\n"),
    ("expertplane.planner.fake", "from ..rpc import channels\n"),
    ("expertplane.planner.fake", "import grpc\n"),
    ("expertplane.kernels.fake", "import expertplane.worker.process\n"),
    ("expertplane.kernels.fake", "from expertplane.proto import expertplane_pb2 as pb\n"),
    ("expertplane.kernels.hotswap.fake", "from ...rpc.channels import make_channel\n"),
    ("expertplane.controller.fake", "from expertplane.kernels.balancing import BiasUpdate\n"),
    ("expertplane.controller.fake", "from expertplane.worker import service\n"),
    ("expertplane.rpc.fake", "from expertplane.controller.core import Controller\n"),
    ("expertplane.errors", "import expertplane.planner\n"),
])
def test_a_planted_upward_import_is_caught(module, source):
    assert len(violations(module, source)) == 1


@pytest.mark.parametrize("module,source", [
    ("expertplane.planner.fake", "from . import plan\nimport numpy as np\nimport json\n"),
    ("expertplane.kernels.hotswap.fake", "from ..moe import EPMoELayer\n"
                                         "from expertplane.planner.transfers import plan_transfers\n"),
    ("expertplane.worker.fake", "from expertplane.kernels import moe\nimport grpc\n"),
    ("expertplane.cli.fake", "from expertplane.controller import core\n"),
    ("expertplane.controller.operator.__main__", "from expertplane.cli.main import main\n"),
])
def test_downward_imports_pass(module, source):
    assert violations(module, source) == []


def test_relative_imports_resolve_from_the_module_or_its_package():
    assert imported_modules("expertplane.kernels.hotswap.engine", "from ..moe import X\n") == \
        [(1, "expertplane.kernels.moe")]
    assert imported_modules("expertplane.kernels.hotswap", "from .engine import X\n",
                            is_package=True) == [(1, "expertplane.kernels.hotswap.engine")]
