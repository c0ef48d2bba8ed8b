"""Uninstalling with the operator gone, following docs/operator.md to the letter, against a real
kube-apiserver: `kubectl delete -k manifests/` first (the CRDs then hang in Terminating on the
ExpertPlacements' finalizers, as users saw), then the documented block releases them."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.k8s_fixture import (  # noqa: F401  (pytest fixtures)
    NAMESPACE,
    REPO,
    OperatorProcess,
    apiserver,
    controller,
    operator_kubeconfig,
    wait_for,
)

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(240)]
CRDS = ("expertplacements.expertplane.io", "pipelineplans.expertplane.io")


def documented_block() -> str:
    """The shell block that follows the ``uninstall-without-operator`` marker in the docs."""
    text = (REPO / "docs" / "operator.md").read_text()
    match = re.search(r"<!-- uninstall-without-operator:[^>]*-->\n```\n(.*?)```", text, re.S)
    assert match, "docs/operator.md lost its uninstall block"
    return match.group(1)


def test_uninstall_with_the_operator_gone(apiserver, operator_kubeconfig, controller, tmp_path):
    op = OperatorProcess(tmp_path / "operator.log", "--controller", f"127.0.0.1:{controller.port}",
                         "--kubeconfig", operator_kubeconfig, "--namespace", "default",
                         "--refresh-seconds", "1", "--lease-namespace", NAMESPACE,
                         "--identity", "op-gone")
    try:
        wait_for(lambda: "op-gone leads" in op.log(), timeout=60, what="operator start")
        apiserver.kubectl("apply", "--server-side", "-k", str(REPO / "manifests" / "samples"),
                          "-n", "default")
        wait_for(lambda: (apiserver.get("expertplacement", "deepseek-v3") or {}).get("metadata", {})
                 .get("finalizers") and (apiserver.get("pipelineplan", "deepseek-v3-pp8") or {})
                 .get("status"), timeout=120, what="samples handled")
    finally:
        assert op.stop() == 0, op.log()[-3000:]
    assert not apiserver.get("pipelineplan", "deepseek-v3-pp8")["metadata"].get("finalizers")
    # What users did: delete everything with the operator gone. The CRDs hang.
    apiserver.kubectl("delete", "-k", str(REPO / "manifests"), "--ignore-not-found", "--wait=false")

    def crd_terminating():
        crd = apiserver.get("crd", CRDS[0], NAMESPACE)
        return crd and any(c["type"] == "Terminating" and c["status"] == "True"
                           for c in crd["status"]["conditions"])
    wait_for(crd_terminating, what="CRD Terminating")
    # The documented block, run as a user would (kubectl on PATH, the cluster's kubeconfig). The
    # test cluster runs no namespace controller, so its `kubectl delete -k` must not wait for
    # the namespace to finish deleting; everything else is the block as written.
    script = documented_block().replace("--ignore-not-found", "--ignore-not-found --wait=false")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, text=True,
                          capture_output=True, timeout=120,
                          env={**os.environ, "KUBECONFIG": apiserver.kubeconfig})
    assert proc.returncode == 0, proc.stderr
    assert "expertplacement.expertplane.io/deepseek-v3 patched" in proc.stdout
    for crd in CRDS:
        wait_for(lambda: apiserver.get("crd", crd, NAMESPACE) is None, timeout=60,
                 what=f"{crd} deleted")
    assert apiserver.get("clusterrole", "expertplane-operator", NAMESPACE) is None
