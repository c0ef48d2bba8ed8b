"""The image the manifests run is the one the Dockerfile builds: same tag (the package version),
entrypoint the CLI's script, same non-root UID as the pods' securityContext, same torch pin as
the Makefile. (The image itself cannot be built in the test environment: no Docker daemon.)"""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _pod_specs():
    """(file name, pod spec) of every workload in manifests/*.yaml."""
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            pod = ((doc or {}).get("spec") or {}).get("template", {}).get("spec")
            if pod:
                yield path.name, pod


def test_every_container_runs_the_kustomization_image_at_the_package_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert kustomization["images"] == [{"name": "expertplane", "newTag": version}]
    images = {(name, c["name"]): c["image"] for name, pod in _pod_specs()
              for c in pod["containers"] + pod.get("initContainers", [])}
    assert {name for name, _ in images} == {"agent.yaml", "controller.yaml", "operator.yaml"}
    assert set(images.values()) == {f"expertplane:{version}"}
    assert f"docker build -t expertplane:{version} ." in _dockerfile()


def test_dockerfile_entrypoint_user_and_torch_pin_match_the_project():
    dockerfile = _dockerfile()
    (entrypoint,) = re.findall(r'^ENTRYPOINT \["([^"]+)"\]$', dockerfile, re.M)
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][entrypoint]
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function))
    (uid,) = re.findall(r"^USER (\d+):\d+$", dockerfile, re.M)
    for name, pod in _pod_specs():
        run_as = pod.get("securityContext", {}).get("runAsUser")
        assert run_as in (None, int(uid)), name
    (torch,) = re.findall(r"^ARG TORCH_SPEC=(\S+)$", dockerfile, re.M)
    assert re.search(rf"^TORCH_SPEC\s*\?=\s*{re.escape(torch)}$",
                     (ROOT / "Makefile").read_text(), re.M)
