"""The wheel: built without setuptools' "Package would be ignored" warnings, and holding the
data files the code reads at run time (CRD schema, Alembic scripts, profiles, examples)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_wheel_builds_quietly_with_its_data_files(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", "build", ".hypothesis", ".pytest_cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr
    assert "would be ignored" not in out.stdout + out.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("expertplane/manifests/crds/expertplacements.yaml",
                 "expertplane/controller/migrations/env.py",
                 "expertplane/controller/migrations/versions/0001_initial.py",
                 "expertplane/planner/profiles/deepseek-v3-like.yaml",
                 "expertplane/examples/demo.yaml",
                 "expertplane/examples/placements/deepseek-v3.yaml",
                 "expertplane/proto/expertplane.proto",
                 "expertplane/numba_cache.py"):
        assert path in names, path
