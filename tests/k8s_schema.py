"""Rendering and schema validation of FaceScale's Kubernetes manifests, offline (no cluster).

- core kinds against the Kubernetes OpenAPI schemas with ``kubernetes-validate`` in strict mode;
- ``RayJob`` / ``RayCluster`` against the vendored KubeRay v1.7.0 CRD schemas, closed the way the API server's
  strict field validation closes them (an unknown field is an error), plus the operator rules listed in
  ``k8s/schemas/kuberay-v1.7.0/SOURCE.md`` that a schema cannot express.

FaceScale's own deployment rules (security, image, entrypoint, references) are in ``k8s_validate.py``, which
also is the command line. Every check returns :class:`Finding` objects; an empty list means valid.

NOTE: this lives in ``tests/`` rather than in the ``facescale`` package: it needs kubectl and two test-only
packages (``kubernetes-validate``, ``jsonschema`` in requirements-dev.txt), and the library never deploys itself.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[1]
KUBERAY_SCHEMAS = REPO / "k8s" / "schemas" / "kuberay-v1.7.0"
# The oldest Kubernetes minor the manifests must work on (kubectl on the CI image is 1.32).
KUBERNETES_VERSION = "1.32"
RAYJOB_NAME_MAX = 47  # KubeRay: the RayJob name prefixes generated names that must stay within 63 characters.
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# A minimal, closed ObjectMeta: the CRD schemas leave `metadata` open; the API server does not.
_METADATA_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {k: {"type": "string"} for k in ("name", "namespace", "generateName")}
    | {k: {"type": "object", "additionalProperties": {"type": "string"}} for k in ("labels", "annotations")},
}


@dataclass(frozen=True)
class Finding:
    """One validation failure: which resource, where in it, and what is wrong."""

    resource: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.resource}: {self.path or '<root>'}: {self.message}"


class KubectlNotFoundError(RuntimeError):
    """kubectl (which embeds kustomize) is needed to render the overlays and is not on PATH."""


def render_overlay(overlay: str | Path) -> list[dict[str, Any]]:
    """Renders a kustomize overlay with ``kubectl kustomize`` (no cluster needed).

    Args:
        overlay: Kustomization directory, e.g. ``k8s/overlays/dev``.

    Returns:
        The rendered resources, in order.

    Raises:
        KubectlNotFoundError: kubectl is not installed.
        RuntimeError: kustomize failed; the message carries its stderr and the overlay path.
    """
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise KubectlNotFoundError(
            "kubectl is not on PATH: the k8s tests render overlays with `kubectl kustomize` (kustomize v5 is built "
            "in). Install kubectl >= 1.27 (e.g. `apt-get install kubectl` from the Kubernetes apt repository).")
    proc = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed: {proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def resource_name(doc: dict[str, Any]) -> str:
    """``Kind/name`` of a rendered resource, for messages."""
    return f"{doc.get('kind', '?')}/{doc.get('metadata', {}).get('name', '?')}"


def _is_kuberay(doc: dict[str, Any]) -> bool:
    return str(doc.get("apiVersion", "")).startswith("ray.io/")


def _json_path(parts: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def validate_core(docs: list[dict[str, Any]], version: str = KUBERNETES_VERSION) -> list[Finding]:
    """Validates every non-KubeRay resource against the Kubernetes schemas, strict (unknown fields are errors)."""
    findings = []
    for doc in docs:
        if _is_kuberay(doc):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            findings.append(Finding(resource_name(doc), _json_path(e.path), e.message))
        except kubernetes_validate.SchemaNotFoundError as e:
            findings.append(Finding(resource_name(doc), "", e.message))
    return findings


def _closed(schema: Any) -> Any:
    """Copy of a CRD schema in which every object with declared properties rejects undeclared ones.

    NOTE: this mirrors the API server's strict field validation (``kubectl apply --validate=strict``, the default
    since 1.27): a structural schema prunes or rejects unknown fields unless x-kubernetes-preserve-unknown-fields.
    """
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def kuberay_validator(kind: str) -> jsonschema.Draft4Validator:
    """A strict validator for ``RayJob`` or ``RayCluster`` built from the vendored CRD schema."""
    path = KUBERAY_SCHEMAS / f"{kind.lower()}-ray-v1.json"
    schema = _closed(json.loads(path.read_text()))
    schema["properties"]["metadata"] = _METADATA_SCHEMA
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft4Validator(schema)


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc.get("spec", {})
    return spec.get("rayClusterSpec", {}) if doc.get("kind") == "RayJob" else spec


def validate_kuberay(docs: list[dict[str, Any]]) -> list[Finding]:
    """Validates RayJob / RayCluster resources: strict CRD schema, then the operator's own rules."""
    findings = []
    for doc in docs:
        kind = doc.get("kind")
        if not _is_kuberay(doc):
            continue
        if kind not in ("RayJob", "RayCluster"):
            findings.append(Finding(resource_name(doc), "kind", f"no vendored schema for {kind}"))
            continue
        res = resource_name(doc)
        for err in sorted(kuberay_validator(kind).iter_errors(doc), key=lambda e: list(map(str, e.path))):
            findings.append(Finding(res, _json_path(err.path), err.message))
        findings += _operator_rules(doc)
    return findings


def _operator_rules(doc: dict[str, Any]) -> list[Finding]:
    """The checks KubeRay's validating code applies that the schema cannot express (SOURCE.md)."""
    res, kind, spec = resource_name(doc), doc["kind"], doc.get("spec", {})
    name = doc.get("metadata", {}).get("name", "")
    out = []
    max_len = RAYJOB_NAME_MAX if kind == "RayJob" else 63
    if not DNS_1035.match(name) or len(name) > max_len:
        out.append(Finding(res, "metadata.name", f"{name!r} must be a DNS-1035 label of at most {max_len} characters"))
    if kind == "RayJob":
        finishes = spec.get("shutdownAfterJobFinishes", False)
        if spec.get("suspend") and not finishes:
            out.append(Finding(res, "spec.suspend", "suspend: true needs shutdownAfterJobFinishes: true"))
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not finishes:
            out.append(Finding(res, "spec.ttlSecondsAfterFinished", "needs shutdownAfterJobFinishes: true"))
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            out.append(Finding(res, "spec.submissionMode", f"{mode!r} is not one of {sorted(SUBMISSION_MODES)}"))
        try:
            env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
            if not isinstance(env, dict):
                out.append(Finding(res, "spec.runtimeEnvYAML", "must be a YAML mapping"))
        except yaml.YAMLError as e:
            out.append(Finding(res, "spec.runtimeEnvYAML", f"does not parse as YAML: {e}"))
    prefix = "spec.rayClusterSpec" if kind == "RayJob" else "spec"
    cluster = _cluster_spec(doc)
    head = cluster.get("headGroupSpec", {})
    if not head.get("template", {}).get("spec", {}).get("containers"):
        out.append(Finding(res, f"{prefix}.headGroupSpec", "the head template needs at least one container"))
    seen = set()
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        where = f"{prefix}.workerGroupSpecs[{i}]"
        gname = group.get("groupName")
        if gname in seen:
            out.append(Finding(res, f"{where}.groupName", f"duplicate worker group name {gname!r}"))
        seen.add(gname)
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        replicas = group.get("replicas", lo)
        if not lo <= replicas <= hi:
            out.append(Finding(res, where, f"needs minReplicas <= replicas <= maxReplicas, got {lo}, {replicas}, {hi}"))
        if not group.get("template", {}).get("spec", {}).get("containers"):
            out.append(Finding(res, f"{where}.template", "a worker group needs at least one container"))
    return out


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec inside a resource (Deployment template, RayJob head/workers/submitter, ...) with its path."""

    def walk(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                yield path, node
                return
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}" if path else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{path}[{i}]")

    yield from walk(doc.get("spec", {}), "spec")


def containers(pod: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(relative path, container)`` for init and app containers of a pod spec."""
    for field in ("initContainers", "containers"):
        for i, c in enumerate(pod.get(field) or []):
            yield f"{field}[{i}]", c


def check_gpus(docs: list[dict[str, Any]]) -> list[Finding]:
    """GPUs are extended resources: they must be in limits, and requests (if given) must equal limits."""
    out = []
    for doc in docs:
        for pod_path, pod in pod_specs(doc):
            for c_path, c in containers(pod):
                res = c.get("resources") or {}
                limits, requests = res.get("limits") or {}, res.get("requests") or {}
                where = f"{pod_path}.{c_path}.resources"
                for key in sorted(k for k in requests if k.endswith("/gpu")):
                    if key not in limits:
                        out.append(Finding(resource_name(doc), where, f"{key} is in requests only; put it in limits"))
                    elif str(requests[key]) != str(limits[key]):
                        out.append(Finding(resource_name(doc), where, f"{key} requests differ from limits"))
    return out
