"""A planning change whose re-plan call fails is re-planned at the next reconcile: the
controller already holds the new spec then (nothing differs any more), so the object's status
remembers the owed re-plan (``status.replanOwed``, kept by the CRD's schema). Against a real
kube-apiserver and a real controller on loopback; the one failure is injected into the operator's
controller client (the re-plan call answers DEADLINE_EXCEEDED, as a slow controller does)."""

from __future__ import annotations

import grpc
import kubernetes
import pytest

from expertplane.controller.operator.client import ControllerCallError, ControllerClient
from expertplane.controller.operator.crd import GROUP, VERSION
from expertplane.controller.operator.kube import Kube
from expertplane.controller.operator.placement import reconcile_placement
from expertplane.controller.operator.reconcile import OperatorContext

from tests.k8s_fixture import apiserver, controller  # noqa: F401  (pytest fixtures)

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(240)]
NS, NAME = "default", "owed"


def _doc(algorithm: str) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ExpertPlacement",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {"model": {"layers": 2, "experts": 8, "groups": 2, "expertBytes": 1 << 20},
                     "topology": {"nodes": 2, "gpusPerNode": 2}, "replicas": 12,
                     "algorithm": algorithm, "rebalancePolicy": {"mode": "Auto"}}}


def _reconcile(ctx, api, apply: bool):
    """One reconcile of the object as the apiserver holds it; its status written back."""
    obj = api.get_namespaced_custom_object(GROUP, VERSION, NS, "expertplacements", NAME)
    out = reconcile_placement(ctx, obj, apply=apply)
    api.patch_namespaced_custom_object_status(GROUP, VERSION, NS, "expertplacements", NAME,
                                              {"status": out.status})
    return out, api.get_namespaced_custom_object(GROUP, VERSION, NS, "expertplacements", NAME)


def test_a_failed_replan_is_owed_and_done_at_the_next_reconcile(apiserver, controller,  # noqa: F811
                                                                 monkeypatch):
    api_client = kubernetes.config.new_client_from_config(config_file=apiserver.kubeconfig)
    api = kubernetes.client.CustomObjectsApi(api_client)
    address = f"127.0.0.1:{controller.port}"
    ctx = OperatorContext(ControllerClient(address), Kube(api_client), address)
    pname = f"{NS}-{NAME}"
    try:
        apiserver.apply(_doc("deepseek"))
        out, obj = _reconcile(ctx, api, apply=True)
        assert obj["status"]["planVersion"] == 1 and "replanOwed" not in obj["status"]

        apiserver.apply(_doc("balanced"))
        real = ctx.client.trigger_rebalance

        def slow(*args, **kwargs):
            raise ControllerCallError("TriggerRebalance", grpc.StatusCode.DEADLINE_EXCEEDED,
                                      "Deadline Exceeded")
        monkeypatch.setattr(ctx.client, "trigger_rebalance", slow)
        out, obj = _reconcile(ctx, api, apply=True)
        assert ctx.client.placement_state(pname).spec.algorithm == "balanced"   # spec taken
        assert obj["status"]["replanOwed"] == ["spec.algorithm"]      # kept by the schema
        assert not [e for e in out.events if e[1] in ("Replanned", "NotReplanned")]
        degraded = next(c for c in obj["status"]["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "ControllerUnavailable"

        monkeypatch.setattr(ctx.client, "trigger_rebalance", real)
        out, obj = _reconcile(ctx, api, apply=False)                  # a periodic refresh
        assert ("Normal", "Replanned", "spec.algorithm changed: plan v2 rolling out") in out.events, out.status["conditions"]
        assert "replanOwed" not in obj["status"]
        state = ctx.client.placement_state(pname)
        assert state.plan_version == 2 and state.spec.algorithm == "balanced"
        out, obj = _reconcile(ctx, api, apply=False)                  # nothing owed any more
        assert not [e for e in out.events if e[1] in ("Replanned", "NotReplanned")]
        assert ctx.client.placement_state(pname).plan_version == 2
    finally:
        apiserver.kubectl("delete", "expertplacement", NAME, "-n", NS, "--wait=false",
                          check=False)
        api_client.close()
