"""Least privilege in manifests/: what each ServiceAccount may do, resolved from the Roles,
ClusterRoles and their bindings, compared with the exact list the components need."""

from __future__ import annotations

from pathlib import Path

import yaml

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
NAMESPACE = "expertplane-system"

# (apiGroup, resource, verb, resourceName or "*", namespace or "cluster") the operator needs
OPERATOR = {
    *{("expertplane.io", r, v, "*", "cluster") for r in ("expertplacements", "pipelineplans")
      for v in ("get", "list", "watch", "patch")},
    *{("expertplane.io", f"{r}/status", v, "*", "cluster") for r in ("expertplacements",
                                                                      "pipelineplans")
      for v in ("get", "patch")},
    *{("", "configmaps", v, "*", "cluster") for v in ("get", "create", "update", "patch",
                                                       "delete")},
    ("", "pods", "list", "*", "cluster"),
    *{(g, "events", v, "*", "cluster") for g in ("", "events.k8s.io") for v in ("create", "patch")},
    ("coordination.k8s.io", "leases", "create", "*", NAMESPACE),
    *{("coordination.k8s.io", "leases", v, "expertplane-operator", NAMESPACE)
      for v in ("get", "update")},
}


def documents() -> list[dict]:
    return [d for f in sorted(MANIFESTS.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())
            if isinstance(d, dict)]


def permissions() -> dict[str, set[tuple]]:
    """ServiceAccount name -> every (group, resource, verb, resourceName, scope) it is granted."""
    docs = documents()
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
             for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out: dict[str, set[tuple]] = {d["metadata"]["name"]: set() for d in docs
                                  if d["kind"] == "ServiceAccount"}
    for b in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        ns = b["metadata"].get("namespace")
        ref = b["roleRef"]
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        scope = ns if b["kind"] == "RoleBinding" else "cluster"
        for subject in b["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NAMESPACE
            for rule in role["rules"]:
                for g in rule["apiGroups"]:
                    for r in rule["resources"]:
                        for v in rule["verbs"]:
                            for n in rule.get("resourceNames", ["*"]):
                                out.setdefault(subject["name"], set()).add((g, r, v, n, scope))
    return out


def test_each_service_account_has_exactly_what_it_needs():
    perms = permissions()
    table = "\n".join(f"{sa}: {sorted(p)}" for sa, p in sorted(perms.items()))
    print(table)                                      # the listing, for the record (-s)
    assert set(perms) == {"expertplane-operator", "expertplane-controller", "expertplane-agent"}
    assert perms["expertplane-operator"] == OPERATOR, table
    assert perms["expertplane-controller"] == set() and perms["expertplane-agent"] == set()


def test_no_wildcards_no_secrets_no_escalation():
    for d in documents():
        for rule in d.get("rules", []) if d["kind"] in ("Role", "ClusterRole") else []:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], (d["metadata"]["name"], rule)
            assert "secrets" not in rule["resources"], (d["metadata"]["name"], rule)
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
            assert not {"roles", "clusterroles", "rolebindings", "clusterrolebindings",
                        "serviceaccounts/token"} & set(rule["resources"]), rule


def test_pods_run_as_their_own_account_and_only_the_operator_gets_a_token():
    docs = {d["metadata"]["name"]: d for d in documents()
            if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")}
    accounts = {}
    for name, d in docs.items():
        spec = d["spec"]["template"]["spec"]
        accounts[spec["serviceAccountName"]] = spec.get("automountServiceAccountToken", True)
    assert accounts == {"expertplane-operator": True, "expertplane-controller": False,
                        "expertplane-agent": False}, accounts
