"""Leader election of the operator on a coordination.k8s.io Lease, against a real kube-apiserver:
the protocol (acquire, standby, expiry take-over, release) and two operator processes of which
only the leader reconciles, the standby taking over when the leader stops."""

from __future__ import annotations

import asyncio
import time

import kubernetes
import pytest

from expertplane.controller.operator.leader import LeaseElector

from tests.k8s_fixture import (  # noqa: F401  (pytest fixtures)
    NAMESPACE,
    REPO,
    OperatorProcess,
    apiserver,
    condition,
    controller,
    operator_kubeconfig,
    wait_for,
)

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def api(apiserver):
    cfg = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=apiserver.kubeconfig, client_configuration=cfg)
    client = kubernetes.client.ApiClient(cfg)
    yield client
    client.close()


def test_lease_protocol(api):
    def elector(identity):
        return LeaseElector(api, "default", "protocol-test", identity, lease_duration=2,
                            renew_deadline=1.5, retry_period=0.2)
    a, b = elector("a"), elector("b")
    assert a.try_acquire_or_renew()            # creates the Lease
    assert not b.try_acquire_or_renew()        # held and fresh
    assert a.try_acquire_or_renew()            # renewal
    lease = a.api.read_namespaced_lease("protocol-test", "default")
    assert lease.spec.holder_identity == "a" and lease.spec.lease_transitions == 0
    time.sleep(2.3)                            # a stops renewing: the Lease expires
    assert b.try_acquire_or_renew()
    assert not a.try_acquire_or_renew()
    lease = a.api.read_namespaced_lease("protocol-test", "default")
    assert lease.spec.holder_identity == "b" and lease.spec.lease_transitions == 1
    b.release()                                # a clean hand-over needs no expiry
    assert a.try_acquire_or_renew()
    assert a.api.read_namespaced_lease("protocol-test", "default").spec.lease_transitions == 2


def test_hold_returns_when_the_lease_is_taken(api):
    async def scenario():
        a = LeaseElector(api, "default", "hold-test", "a", lease_duration=2, renew_deadline=1.5,
                         retry_period=0.2)
        stop = asyncio.Event()
        assert await a.acquire(stop)
        holding = asyncio.create_task(a.hold(stop))
        await asyncio.sleep(0.5)
        assert not holding.done()
        # Someone overwrites the Lease (as after a partition): the holder must notice and step down.
        lease = await asyncio.to_thread(a.api.read_namespaced_lease, "hold-test", "default")
        lease.spec.holder_identity = "intruder"
        await asyncio.to_thread(a.api.replace_namespaced_lease, "hold-test", "default", lease)
        await asyncio.wait_for(holding, 3)
        assert not stop.is_set()
    asyncio.run(scenario())


def _placement(name):
    return {"apiVersion": "expertplane.io/v1alpha1", "kind": "ExpertPlacement",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"model": {"layers": 2, "experts": 4}, "topology": {"nodes": 1, "gpusPerNode": 2},
                     "replicas": 4, "rebalancePolicy": {"mode": "Off"}}}


def _reconciled(apiserver, name):
    return lambda: (c := condition(apiserver.get("expertplacement", name), "Ready")) and c["status"] == "True"


def test_only_the_leader_reconciles_and_the_standby_takes_over(apiserver, operator_kubeconfig,
                                                              controller, tmp_path):
    args = ["--controller", f"127.0.0.1:{controller.port}", "--kubeconfig", operator_kubeconfig,
            "--namespace", "default", "--refresh-seconds", "1", "--lease-namespace", NAMESPACE,
            "--lease-duration-seconds", "4", "--renew-deadline-seconds", "3",
            "--retry-period-seconds", "0.5"]
    first = OperatorProcess(tmp_path / "first.log", *args, "--identity", "first")
    second = None
    try:
        wait_for(lambda: "first leads" in first.log(), timeout=60, what="first operator leads")
        second = OperatorProcess(tmp_path / "second.log", *args, "--identity", "second")
        wait_for(lambda: "second is standing by" in second.log(), timeout=60, what="second stands by")
        apiserver.apply(_placement("led"))
        wait_for(_reconciled(apiserver, "led"), what="reconciled by the leader")
        assert "kopf" not in second.log()                 # the standby never started handlers
        assert first.stop() == 0                          # releases the Lease on the way out
        wait_for(lambda: "second leads" in second.log(), timeout=30, what="second takes over")
        apiserver.apply(_placement("after-failover"))
        wait_for(_reconciled(apiserver, "after-failover"), what="reconciled by the new leader")
        lease = apiserver.get("lease", "expertplane-operator", NAMESPACE)
        assert lease["spec"]["holderIdentity"] == "second"
        apiserver.kubectl("delete", "expertplacement", "led", "after-failover", "--wait=true",
                          "--timeout=60s")
        assert second.stop() == 0
        own_code = f'File "{REPO / "controller" / "operator"}'
        assert own_code not in first.log() + second.log(), first.log() + second.log()
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_operator_thread_runs_in_process_and_stops(apiserver, operator_kubeconfig, controller):
    from expertplane.controller.operator import OperatorConfig, OperatorThread

    config = OperatorConfig(controller=f"127.0.0.1:{controller.port}", kubeconfig=operator_kubeconfig,
                            namespaces=("default",), refresh_seconds=1, lease_namespace=NAMESPACE,
                            identity="in-process", lease_duration_seconds=4,
                            renew_deadline_seconds=3, retry_period_seconds=0.5)
    thread = OperatorThread(config).start()
    try:
        apiserver.apply(_placement("threaded"))
        wait_for(_reconciled(apiserver, "threaded"), timeout=60, what="reconciled in-process")
        apiserver.kubectl("delete", "expertplacement", "threaded", "--wait=true", "--timeout=60s")
    finally:
        assert thread.stop(30) == 0 and thread.error is None
    assert not thread.is_alive()
    lease = apiserver.get("lease", "expertplane-operator", NAMESPACE)
    assert not lease["spec"].get("holderIdentity")          # released on the way out
