"""The project's shared data and scripts: ``../shared`` from the repository root, where every
developer checkout and CI run has it (see ../shared/README.md)."""

from __future__ import annotations

import json
import pathlib

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
K8S_APISERVER = SHARED / "k8s" / "test-apiserver"


def eplb_json(name: str):
    """A JSON file of DeepSeek EPLB reference data in ``shared/eplb``."""
    path = SHARED / "eplb" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is absent: the EPLB exactness tests need the checkout "
                                "next to the project's shared/ directory (../shared)")
    return json.loads(path.read_text())
