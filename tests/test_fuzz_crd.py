"""Fuzzing invalid custom resources against the real kube-apiserver (issue #10).

Hypothesis mutates the samples ``manifests/samples/deepseek-v3-placement.yaml`` (ExpertPlacement)
and ``deepseek-v3-pipeline.yaml`` (PipelinePlan): wrong types, negative/zero/huge numbers, missing
required fields, unknown fields, bad names and enum values, wrong nesting, strings where numbers
go, oversized lists. Every mutant is created with ``dry_run="All"`` (validated, defaulted and
pruned by the apiserver, never stored) and must end in exactly one of:

* ``schema``: refused with 400/422 whose message names the mutated field or one of its parents;
* ``operator``: accepted, then refused by the operator's own spec validation (the code its
  handlers run; the ``SpecError`` becomes the InvalidSpec condition message) naming a field
  of the CRD's schema;
* ``no-workers``: accepted, names a ``workerSelector`` that matches no pod (the NoWorkers
  condition), since the fuzz cluster runs no worker pods;
* ``valid``: accepted and turned into a controller message by the operator.

Anything else (an unexpected exception from the operator's validation, an error naming no field)
is a gap and fails the test. The two it found (a memoryLimit beyond uint64, an unparsable
workerSelector) are fixed; their minimal examples are kept as regression tests.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import kubernetes
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes.client.exceptions import ApiException

from expertplane.controller.operator.crd import (
    GROUP,
    PIPELINES,
    PLACEMENTS,
    VERSION,
    SpecError,
    label_selector,
    pipeline_request_from_cr,
    placement_from_cr,
    placement_name,
)
from expertplane.controller.operator.kube import Kube, NoWorkers
from expertplane.controller.operator.placement import read_spec
from expertplane.controller.operator.plan_form import plan_form_from_spec
from expertplane.controller.operator.reconcile import OperatorContext

from tests.k8s_fixture import REPO, apiserver  # noqa: F401  (pytest fixture)

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]
NAMESPACE = "default"
MIN_MUTANTS = 300          # per kind
EXAMPLES = 600             # hypothesis examples per kind (duplicates are not re-run)

Path = tuple[str | int, ...]


def _load(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


SAMPLES = {PLACEMENTS: _load("manifests/samples/deepseek-v3-placement.yaml"),
           PIPELINES: _load("manifests/samples/deepseek-v3-pipeline.yaml")}
SCHEMAS = {plural: _load(f"manifests/crds/{plural}.yaml")["spec"]["versions"][0]["schema"]
           ["openAPIV3Schema"] for plural in (PLACEMENTS, PIPELINES)}


# ------------------------------------------------------------------ paths and the schema


def schema_paths(schema: dict, prefix: Path = ()) -> list[tuple[Path, dict]]:
    """Every (path, sub-schema) below ``schema``; array items appear at index 0."""
    out = []
    for key, sub in (schema.get("properties") or {}).items():
        out.append(((*prefix, key), sub))
        out.extend(schema_paths(sub, (*prefix, key)))
    items = schema.get("items")
    if items:
        out.append(((*prefix, 0), items))
        out.extend(schema_paths(items, (*prefix, 0)))
    return out


SPEC_PATHS = {plural: [(p, s) for p, s in schema_paths(schema) if p[0] == "spec"]
              for plural, schema in SCHEMAS.items()}


def dotted(path: Path) -> str:
    """The apiserver's spelling of a path: ``spec.profile.layers.forward`` (no list indexes)."""
    return ".".join(str(p) for p in path if not isinstance(p, int))


def schema_has(plural: str, field: str) -> bool:
    """True if ``field`` (dotted, no indexes) is a property path of the kind's schema."""
    return field == "metadata.name" or any(dotted(p) == field for p, _ in SPEC_PATHS[plural])


# ------------------------------------------------------------------ mutations


@dataclass(frozen=True)
class Mutation:
    """One edit of a document at ``path``: ``op`` is ``set`` (to ``value``, creating missing
    parents), ``delete``, or ``grow`` (a list to ``value`` copies of its first item)."""

    op: str
    path: Path
    value: Any = None

    def edited(self, doc: dict) -> Path:
        """The outermost path of ``doc`` this mutation changes: ``path``, or its first parent
        missing from ``doc`` (created by ``apply``)."""
        for depth in range(1, len(self.path)):
            if _at(doc, self.path[:depth]) is None:
                return self.path[:depth]
        return self.path

    def apply(self, doc: dict) -> None:
        """Edit ``doc`` in place."""
        parent = doc
        for step, nxt in zip(self.path[:-1], self.path[1:]):
            if isinstance(parent, list):
                while len(parent) <= step:
                    parent.append([] if isinstance(nxt, int) else {})
            elif not isinstance(parent.get(step), (dict, list)):
                parent[step] = [] if isinstance(nxt, int) else {}
            parent = parent[step]
        last = self.path[-1]
        if isinstance(parent, list):
            while len(parent) <= last:
                parent.append({})
        if self.op == "set":
            parent[last] = self.value
        elif self.op == "delete":
            if isinstance(parent, dict):
                parent.pop(last, None)
            else:
                del parent[last]
        else:
            items = parent.get(last) if isinstance(parent, dict) else parent[last]
            seed = items[0] if isinstance(items, list) and items else 0
            parent[last] = [copy.deepcopy(seed) for _ in range(self.value)]


_EDGE_INTS = [0, -1, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30]
HOSTILE = st.one_of(
    st.sampled_from(_EDGE_INTS),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-10, 10**6).map(str),                      # strings where numbers go
    st.text(max_size=12),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text("abcxyz", min_size=1, max_size=4), st.integers(-3, 3), max_size=2),
)
# Legal enum values, near misses (case, spelling) and strangers.
ENUM_WORDS = ["Auto", "auto", "Manual", "Off", "off", "deepseek", "DeepSeek", "balanced",
              "topology", "1f1b", "1F1B", "zb1p", "dualpipe", "dualpipev", "DualPipe", "embedding",
              "dense", "moe", "MoE", "head", "In", "NotIn", "Exists", "DoesNotExist", "in", ""]
# Quantities of every magnitude (mantissa x 10**0..24, or a decimal) with legal and bad suffixes.
MAGNITUDES = st.builds(lambda mantissa, exponent: mantissa * 10**exponent,
                       st.integers(0, 999), st.integers(0, 24))
QUANTITIES = st.builds("{}{}".format, st.one_of(MAGNITUDES, st.decimals(0, 10**6, places=3)),
                       st.sampled_from(["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T",
                                        "P", "E", "m", "Gb", " Gi"]))
LABELS = st.from_regex(r"[a-zA-Z0-9][-a-zA-Z0-9_./ ,=!]{0,20}", fullmatch=True)


def values_for(schema: dict) -> st.SearchStrategy:
    """Values worth trying at a field of this sub-schema: legal-looking ones and hostile ones."""
    kind = schema.get("type")
    near = []
    if "enum" in schema:
        near.append(st.sampled_from(ENUM_WORDS))
    if schema.get("x-kubernetes-int-or-string"):
        near.append(QUANTITIES)
    if kind == "integer":
        near.append(st.integers(-2, 5000))
    if kind == "number":
        near.append(st.floats(-1, 1e6, allow_nan=False))
    if kind == "string" and "enum" not in schema:
        near.append(LABELS)
    if kind == "array":            # ragged, empty, oversized matrices and lists
        near.append(st.lists(st.lists(st.floats(-1, 10, allow_nan=False), max_size=300),
                             max_size=5))
    if kind == "object":
        near.append(st.dictionaries(LABELS, st.one_of(LABELS, st.integers(0, 3)), max_size=3))
    return st.one_of(*near, HOSTILE)


# The one-of branch each sample leaves out, as whole values: worker pods chosen by a label
# selector (ExpertPlacement), a profile read from a ConfigMap (PipelinePlan).
SELECTOR = st.fixed_dictionaries({}, optional={
    "matchLabels": st.dictionaries(LABELS, LABELS, max_size=2),
    "matchExpressions": st.lists(st.fixed_dictionaries(
        {"key": LABELS, "operator": st.sampled_from(ENUM_WORDS)},
        optional={"values": st.lists(LABELS, max_size=2)}), max_size=2)})
ALTERNATIVES = {
    PLACEMENTS: (("spec", "topology"), st.fixed_dictionaries(
        {"workerSelector": SELECTOR}, optional={"gpusPerNode": st.integers(-1, 65),
                                                "gpuResource": LABELS})),
    PIPELINES: (("spec", "profile"), st.fixed_dictionaries({"configMapRef": st.fixed_dictionaries(
        {"name": LABELS, "key": LABELS})})),
}


@st.composite
def mutations(draw, plural: str) -> Mutation:
    if draw(st.integers(0, 9)) == 0:
        path, value = ALTERNATIVES[plural]
        return Mutation("set", path, draw(value))
    path, schema = draw(st.sampled_from(SPEC_PATHS[plural] + [(("metadata", "name"), {})]))
    if path == ("metadata", "name"):
        name = draw(st.one_of(st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,80}[a-z0-9])?", fullmatch=True),
                              st.text(max_size=20), st.just("x" * 254)))
        return Mutation("set", path, name)
    extra = {"array": ["grow"], "object": ["unknown"]}.get(schema.get("type"), [])
    ops = ["set", "set", "set", "delete", "wrap", *extra]
    op = draw(st.sampled_from(ops))
    if op == "set":
        return Mutation("set", path, draw(values_for(schema)))
    if op == "unknown":            # an unknown field inside this object (pruned by the apiserver)
        key = draw(st.sampled_from(["bogus", "Layers", "replica", "x-extra"]))
        return Mutation("set", (*path, key), draw(HOSTILE))
    if op == "wrap":               # wrong nesting: the sample's value put one level too deep
        value = _at(SAMPLES[plural], path)
        return Mutation("set", path, draw(st.sampled_from([[value], {"value": value}])))
    if op == "grow":
        return Mutation("grow", path, draw(st.one_of(st.sampled_from([0, 4096, 4097]),
                                                     st.integers(0, 64))))
    return Mutation("delete", path)


def _at(doc: Any, path: Path) -> Any:
    for step in path:
        try:
            doc = doc[step]
        except (KeyError, IndexError, TypeError):
            return None
    return doc


# ------------------------------------------------------------------ submission and validation


@dataclass
class Verdict:
    outcome: str               # schema | operator | no-workers | valid | gap
    detail: str


def operator_validate(kube: Kube, plural: str, obj: dict) -> None:
    """What the operator's handlers do with an object's spec before talking to the controller:
    build the controller message (ExpertPlacement: ``read_spec`` and ``placement_from_cr``
    on the pods' topology, then the plan ConfigMap's form; PipelinePlan: read the
    profile ConfigMap if referenced, then ``pipeline_request_from_cr``). Raises ``SpecError``
    (the InvalidSpec condition) or ``NoWorkers``. Spec validation never calls the controller."""
    meta, spec = obj["metadata"], obj["spec"]
    if plural == PLACEMENTS:
        ctx = OperatorContext(client=None, kube=kube, controller_address="")
        inputs = read_spec(ctx, NAMESPACE, spec)
        if inputs.observed is None:
            raise NoWorkers(f"no worker pods match "
                            f"{label_selector(spec['topology']['workerSelector'])!r}")
        placement_from_cr(placement_name(NAMESPACE, meta["name"]), spec, inputs.observed,
                          int(meta.get("generation", 1)), inputs.initial,
                          load_field=inputs.load_field)
        plan_form_from_spec(spec)
        return
    text = None
    ref = spec["profile"].get("configMapRef")
    if ref:
        text, _ = kube.read_config_value(NAMESPACE, ref, "spec.profile.configMapRef")
    pipeline_request_from_cr(spec, text)


def names_field(message: str, path: Path) -> bool:
    """True if ``message`` names ``path``, one of its parents (the object whose rule failed,
    e.g. ``"spec" must not validate the schema (not)``) or one of its children (a required
    field missing from the value set there), also with an index (``spec.model.moeLayers[1]:
    Duplicate value``)."""
    parts = [p for p in path if not isinstance(p, int)]
    fields = [".".join(parts[:depth]) for depth in range(len(parts), 0, -1)]
    below = re.escape(fields[0]) + r"\.[\w.-]+"         # keys below may hold '-' (x-extra)
    pattern = "|".join([below, *map(re.escape, fields)])
    return re.search(rf'(^|[\s"\[])({pattern})([\s":,\[\]]|$)', message) is not None


def judge(api, kube: Kube, plural: str, mutation: Mutation) -> Verdict:
    """Create the mutant (dry run) and classify it; see the module docstring."""
    doc = copy.deepcopy(SAMPLES[plural])
    mutation.apply(doc)
    try:
        obj = api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural, doc,
                                                  dry_run="All")
    except ApiException as exc:
        message = json.loads(exc.body).get("message", "") if exc.body else ""
        if exc.status in (400, 422) and names_field(message, mutation.edited(SAMPLES[plural])):
            return Verdict("schema", message)
        return Verdict("gap", f"apiserver {exc.status} naming no mutated field: {message}")
    try:
        operator_validate(kube, plural, obj)
    except ApiException as exc:
        return Verdict("gap", f"operator got {exc.status} from the apiserver: {exc.body}")
    except SpecError as exc:
        if schema_has(plural, exc.field) and str(exc).startswith(f"{exc.field}: "):
            return Verdict("operator", str(exc))
        return Verdict("gap", f"SpecError naming no schema field: {exc}")
    except NoWorkers as exc:
        return Verdict("no-workers", str(exc))
    except Exception as exc:  # noqa: BLE001  (the point: anything else is a gap)
        return Verdict("gap", f"{type(exc).__name__}: {exc}")
    return Verdict("valid", "")


@pytest.fixture(scope="module")
def clients(apiserver):  # noqa: F811  (pytest fixture)
    api_client = kubernetes.config.new_client_from_config(config_file=apiserver.kubeconfig)
    yield kubernetes.client.CustomObjectsApi(api_client), Kube(api_client)
    api_client.close()


def fuzz(clients, plural: str, strategy: st.SearchStrategy,
         examples: int) -> tuple[Counter, list[tuple[Mutation, Verdict]]]:
    """Judge ``examples`` mutants of ``plural`` drawn from ``strategy``; returns the outcome
    counts and the gaps."""
    api, kube = clients
    counts: Counter = Counter()
    unexplained: list[tuple[Mutation, Verdict]] = []

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(mutation):
        verdict = judge(api, kube, plural, mutation)
        counts[verdict.outcome] += 1
        if verdict.outcome == "gap":
            unexplained.append((mutation, verdict))

    run()
    return counts, unexplained


@pytest.mark.parametrize("plural", [PLACEMENTS, PIPELINES])
def test_mutants_are_rejected_with_a_field_or_valid(clients, plural):
    counts, unexplained = fuzz(clients, plural, mutations(plural), EXAMPLES)
    print(plural, dict(counts))
    assert not unexplained, "\n".join(f"{m}: {v.detail}" for m, v in unexplained[:10])
    assert sum(counts.values()) >= MIN_MUTANTS, counts
    # Each way out is exercised, the schema's most.
    assert counts["schema"] >= MIN_MUTANTS // 3, counts
    assert counts["operator"] >= 5 and counts["valid"] >= 20, counts


def test_memory_limit_quantities(clients):
    """A field with a wide domain of its own: quantities of every magnitude and suffix."""
    strategy = QUANTITIES.map(lambda q: Mutation("set", ("spec", "memoryLimit"), q))
    counts, unexplained = fuzz(clients, PIPELINES, strategy, 150)
    print("memoryLimit", dict(counts))
    assert not unexplained, "\n".join(f"{m}: {v.detail}" for m, v in unexplained[:10])
    assert counts["schema"] >= 5 and counts["valid"] >= 20, counts


# ------------------------------------------------------------------ gaps found by this fuzzing (fixed)


def test_memory_limit_beyond_uint64_is_a_spec_error(clients):
    verdict = judge(*clients, PIPELINES, Mutation("set", ("spec", "memoryLimit"), "16Ei"))
    assert verdict.outcome == "operator" and verdict.detail.startswith("spec.memoryLimit: "), verdict


def test_unparsable_worker_selector_is_a_spec_error(clients):
    mutation = Mutation("set", ("spec", "topology"),
                        {"workerSelector": {"matchLabels": {"a": "b c"}}, "gpusPerNode": 8})
    verdict = judge(*clients, PLACEMENTS, mutation)
    assert verdict.outcome == "operator" and "spec.topology.workerSelector" in verdict.detail, verdict


def test_indexed_schema_messages_name_the_field(clients):
    """A set-typed list refuses a duplicate as ``spec.model.moeLayers[1]: Duplicate value``."""
    verdict = judge(*clients, PLACEMENTS, Mutation("set", ("spec", "model", "moeLayers"), [0, 0]))
    assert verdict.outcome == "schema" and "spec.model.moeLayers[1]: Duplicate value" in verdict.detail, verdict


def test_engine_sglang_without_hidden_layers_is_a_spec_error(clients):
    verdict = judge(*clients, PLACEMENTS, Mutation("set", ("spec", "engine"), "sglang"))
    assert verdict.outcome == "operator" and verdict.detail.startswith(
        "spec.model.hiddenLayers: required with engine sglang"), verdict
