"""ExpertPlacement custom resources read from files, without Kubernetes.

The same YAML that ``kubectl apply`` takes (``apiVersion: expertplane.io/v1alpha1``,
``kind: ExpertPlacement``, ``metadata.name``, ``spec``) is validated against the CRD's own
OpenAPI schema (``manifests/crds/expertplacements.yaml``) and then turned into a ``Placement`` by
the operator's conversion (``operator/crd.py``), so a file means the same thing with and without
a cluster. Differences, since no apiserver is there:

* the placement is named ``metadata.name`` (the operator, which serves many namespaces, names it
  ``<namespace>-<name>``);
* ``spec.topology.workerSelector`` and ``spec.initialLoadFrom`` need the cluster and are
  refused naming the field; give ``nodes``/``gpusPerNode`` and ``initialLoad.values``;
* ``spec.engine`` and the model's ``hiddenLayers``/``moeLayers`` say how the operator's plan
  ConfigMap is written: checked as the operator checks them, no ConfigMap is written.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Mapping

import jsonschema
import yaml

from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb

API_VERSION = "expertplane.io/v1alpha1"
KIND = "ExpertPlacement"
CRD_FILE = pathlib.Path(__file__).resolve().parent.parent / "manifests" / "crds" / "expertplacements.yaml"


def is_custom_resource(doc: Mapping) -> bool:
    """True for a Kubernetes object (it has ``apiVersion`` or ``kind``)."""
    return "apiVersion" in doc or "kind" in doc


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    """The ``openAPIV3Schema`` of the served version of the ExpertPlacement CRD."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == API_VERSION.split("/")[1])
    return version["schema"]["openAPIV3Schema"]


def _validate(doc: Mapping) -> None:
    errors = list(jsonschema.Draft7Validator(_schema()).iter_errors(doc))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        raise FieldError(".".join(str(p) for p in err.absolute_path) or "(document)",
                              err.message)


def placement_from_resource(doc: Mapping) -> pb.Placement:
    """The ``Placement`` of one ExpertPlacement object (a parsed YAML document).

    Raises ``FieldError`` whose field is the object's path (``spec.model.layers``).
    """
    from expertplane.controller.operator.crd import (initial_load_source, load_matrix,
                                                     placement_from_cr, topology_from_spec)
    from expertplane.controller.operator.plan_form import plan_form_from_spec

    if doc.get("apiVersion") != API_VERSION:
        raise FieldError("apiVersion", f"must be {API_VERSION}, got {doc.get('apiVersion')!r}")
    if doc.get("kind") != KIND:
        raise FieldError("kind", f"must be {KIND}, got {doc.get('kind')!r}")
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), Mapping) else None
    if not name:
        raise FieldError("metadata.name", "is required")
    _validate(doc)
    spec = doc["spec"]
    topology = topology_from_spec(spec)
    if topology is None:
        raise FieldError("spec.topology.workerSelector", "needs Kubernetes (the operator counts "
                         "the worker pods); without it give nodes and gpusPerNode")
    source = initial_load_source(spec)
    if source is not None and source[0] != "spec.initialLoad.values":
        raise FieldError("spec.initialLoadFrom", "needs Kubernetes; without it give "
                         "initialLoad.values")
    initial = load_matrix(source[1], source[0]) if source else None
    generation = int(doc["metadata"].get("generation", 0))
    placement = placement_from_cr(str(name), spec, topology, generation, initial)
    plan_form_from_spec(spec)
    return placement
