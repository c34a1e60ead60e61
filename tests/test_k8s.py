"""Kubernetes manifests, validated offline: every overlay renders and passes the schemas, KubeRay's rules and the
deployment policy (tests/k8s_validate.py); the negative cases of issue 8 fail it; the MLflow server starts with
the rendered command line and answers the Service's host name."""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from facescale.cli import build_parser
from facescale.parallel.dist import free_loopback_port
from k8s_schema import KUBERAY_SCHEMAS, check_gpus, render_overlay, validate_core, validate_kuberay
from k8s_validate import (
    REPO,
    check_images,
    check_pipeline_fits,
    check_rayjobs,
    check_references,
    check_security,
    validate_manifests,
)

OVERLAYS = ["dev", "gpu-cluster"]
SHARED_SCHEMAS = REPO.parent / "shared" / "schemas" / KUBERAY_SCHEMAS.name


def _kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind)


def _messages(findings: list[Any]) -> str:
    return "\n".join(map(str, findings))


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render_overlay(REPO / "k8s" / "overlays" / name) for name in OVERLAYS}


@pytest.fixture
def gpu(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A private copy of the gpu-cluster overlay for a negative case to break."""
    return copy.deepcopy(rendered["gpu-cluster"])


def test_kubectl_is_installed() -> None:
    # NOTE: a missing kubectl must fail CI, not skip it: without it no manifest is checked at all.
    assert shutil.which("kubectl"), ("kubectl is needed to render k8s/overlays with `kubectl kustomize`; install "
                                     "kubectl >= 1.27 on the CI image")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_valid(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    findings = validate_manifests(rendered[overlay])
    assert findings == [], f"k8s/overlays/{overlay}:\n{_messages(findings)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_every_part(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    # Generated ConfigMaps carry a content hash suffix (so a change rolls the MLflow Deployment).
    names = {re.sub(r"-[a-z0-9]{10}$", "", f"{d['kind']}/{d['metadata']['name']}") if d["kind"] == "ConfigMap"
             else f"{d['kind']}/{d['metadata']['name']}" for d in rendered[overlay]}
    assert names == {"ConfigMap/facescale-env", "ConfigMap/facescale-pipeline", "Deployment/facescale-mlflow",
                     "PersistentVolumeClaim/facescale-shared", "PersistentVolumeClaim/facescale-val",
                     "RayCluster/facescale-interactive", "RayJob/facescale-distill", "Service/facescale-mlflow",
                     "ServiceAccount/facescale"}


def test_gpu_cluster_shape(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["gpu-cluster"]
    job = _kind(docs, "RayJob")
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in workers)
    assert gpus == 16 and all(g["minReplicas"] == g["maxReplicas"] == g["replicas"] for g in workers)
    for kind in ("RayJob", "RayCluster"):
        assert _kind(docs, kind)["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "facescale-gpu"
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert {"NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING"} <= env.keys()
    mlflow = _kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--serve-artifacts" in mlflow["args"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in mlflow["env"] if "valueFrom" in e}
    assert refs["MLFLOW_BACKEND_STORE_URI"] == {"name": "facescale-mlflow-db", "key": "uri"}


def test_dev_runs_on_cpu_without_secrets(rendered: dict[str, list[dict[str, Any]]]) -> None:
    text = json.dumps(rendered["dev"])
    assert "nvidia.com/gpu" not in text
    # Every Secret reference is optional, so `kubectl apply -k k8s/overlays/dev` works on a bare kind cluster.
    refs = [e["valueFrom"]["secretKeyRef"] for d in rendered["dev"] for e in _all_env(d)
            if "secretKeyRef" in e.get("valueFrom", {})]
    assert refs and all(r.get("optional") for r in refs)
    job = _kind(rendered["dev"], "RayJob")["spec"]
    assert "pipelines/demo.yaml" in job["entrypoint"]
    # The image has no data: the head's init container writes the demo's synthetic set with the real CLI.
    (init,) = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["initContainers"]
    assert init["command"][0] == "facescale"
    args = build_parser().parse_args(init["command"][1:])
    assert (args.command, args.data_command) == ("data", "synth")


def _all_env(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        found = list(node["env"]) if isinstance(node.get("env"), list) else []
        return found + [e for v in node.values() for e in _all_env(v)]
    if isinstance(node, list):
        return [e for v in node for e in _all_env(v)]
    return []


def test_kuberay_list_patches_are_json6902() -> None:
    for kustomization in (REPO / "k8s" / "overlays").glob("*/kustomization.yaml"):
        for patch in yaml.safe_load(kustomization.read_text()).get("patches", []):
            if patch.get("target", {}).get("group") == "ray.io":
                ops = yaml.safe_load((kustomization.parent / patch["path"]).read_text())
                assert isinstance(ops, list) and all({"op", "path"} <= op.keys() for op in ops), patch["path"]


def test_vendored_schemas_match_the_shared_copy() -> None:
    if not SHARED_SCHEMAS.is_dir():
        pytest.skip(f"{SHARED_SCHEMAS} is not beside this checkout")
    for shared in SHARED_SCHEMAS.glob("*.json"):
        assert (KUBERAY_SCHEMAS / shared.name).read_bytes() == shared.read_bytes(), shared.name


# --- the negative cases of issue 8 -------------------------------------------------------------------------------

def test_worker_group_without_group_name_fails(gpu: list[dict[str, Any]]) -> None:
    del _kind(gpu, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    assert "'groupName' is a required property" in _messages(validate_kuberay(gpu))


def test_gpu_in_requests_only_fails(gpu: list[dict[str, Any]]) -> None:
    worker = _kind(gpu, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    resources = worker["containers"][0]["resources"]
    resources["requests"]["nvidia.com/gpu"] = resources["limits"].pop("nvidia.com/gpu")
    assert "nvidia.com/gpu is in requests only" in _messages(check_gpus(gpu))


@pytest.mark.parametrize(("length", "ok"), [(47, True), (48, False)])
def test_rayjob_name_length(gpu: list[dict[str, Any]], length: int, ok: bool) -> None:
    _kind(gpu, "RayJob")["metadata"]["name"] = ("facescale-" + "x" * 60)[:length]
    findings = [f for f in validate_kuberay(gpu) if f.path == "metadata.name"]
    assert (findings == []) is ok


@pytest.mark.parametrize("where", ["rayjob-spec", "rayjob-container", "deployment"])
def test_misspelt_field_fails_strict_validation(gpu: list[dict[str, Any]], where: str) -> None:
    job = _kind(gpu, "RayJob")
    if where == "rayjob-spec":
        job["spec"]["shutdownAfterJobFinish"] = True
    elif where == "rayjob-container":
        job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    else:
        _kind(gpu, "Deployment")["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    findings = validate_kuberay(gpu) + validate_core(gpu)
    assert "Additional properties are not allowed" in _messages(findings)


# --- further rules: each mutation must produce a finding ---------------------------------------------------------

def _job(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _kind(docs, "RayJob")["spec"]


def _worker_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _job(docs)["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


def _head(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _job(docs)["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _mlflow(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _kind(docs, "Deployment")["spec"]["template"]["spec"]


BREAKAGES = {
    "ttl-without-shutdown": (validate_kuberay, lambda d: _job(d).update(shutdownAfterJobFinishes=False)),
    "suspend-without-shutdown": (validate_kuberay,
                                 lambda d: _job(d).update(suspend=True, shutdownAfterJobFinishes=False)),
    "replicas-above-max": (validate_kuberay,
                           lambda d: _job(d)["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas=9)),
    "runtime-env-not-yaml": (validate_kuberay, lambda d: _job(d).update(runtimeEnvYAML="env_vars: [a, {")),
    "bad-submission-mode": (validate_kuberay, lambda d: _job(d).update(submissionMode="K8sJob")),
    "privileged": (check_security, lambda d: _head(d)["securityContext"].update(privileged=True)),
    "host-network": (check_security, lambda d: _mlflow(d).update(hostNetwork=True)),
    "root": (check_security, lambda d: _mlflow(d)["securityContext"].update(runAsNonRoot=False)),
    "secret-in-env-value": (check_security,
                            lambda d: _head(d)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"})),
    "password-in-configmap": (check_security, lambda d: _kind(d, "ConfigMap")["data"].update(
        DB="postgresql+psycopg://mlflow:hunter2@db:5432/mlflow")),
    "envfrom-secret": (check_security, lambda d: _head(d)["envFrom"].append({"secretRef": {"name": "facescale-s3"}})),
    "secret-volume": (check_security,
                      lambda d: _mlflow(d)["volumes"].append({"name": "s", "secret": {"secretName": "x"}})),
    "rendered-secret": (check_security, lambda d: d.append({"apiVersion": "v1", "kind": "Secret",
                                                            "metadata": {"name": "facescale-s3"}})),
    "unknown-secret": (check_security, lambda d: _head(d)["env"].append(
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "other", "key": "k"}}})),
    "missing-configmap": (check_references, lambda d: _head(d)["envFrom"].append({"configMapRef": {"name": "nope"}})),
    "missing-pvc": (check_references, lambda d: _worker_pod(d)["volumes"].append(
        {"name": "x", "persistentVolumeClaim": {"claimName": "nope"}})),
    "missing-service-account": (check_references, lambda d: _worker_pod(d).update(serviceAccountName="nope")),
    "two-images": (check_images, lambda d: _head(d).update(image="registry.example.com/ml/facescale:0.2.0")),
    "latest-tag": (check_images, lambda d: [c.update(image="facescale:latest") for p in (_mlflow(d),)
                                           for c in p["containers"]]),
    "missing-job": (check_rayjobs, lambda d: _job(d).update(
        entrypoint="python jobs/nope.py --pipeline pipelines/vargfacenet_rkd.yaml --run-id r")),
    "missing-pipeline": (check_rayjobs, lambda d: _job(d).update(
        entrypoint="python jobs/distill.py --pipeline pipelines/nope.yaml --run-id r")),
    "retry-without-run-id": (check_rayjobs, lambda d: _job(d).update(
        entrypoint=_job(d)["entrypoint"].split(" --run-id")[0])),
    "pipeline-configmap-drift": (check_rayjobs, lambda d: [
        c["data"].update({k: v + "\nextra_key: 1\n" for k, v in c["data"].items()})
        for c in d if c["kind"] == "ConfigMap" and c["metadata"]["name"].startswith("facescale-pipeline")]),
    "wrong-working-dir": (check_rayjobs, lambda d: _head(d).update(workingDir="/app")),
    "ray-version": (check_rayjobs, lambda d: _job(d)["rayClusterSpec"].update(rayVersion="2.9.0")),
    "no-shm": (check_rayjobs, lambda d: _worker_pod(d)["containers"][0].update(volumeMounts=[])),
    "gpu-without-toleration": (check_rayjobs, lambda d: _worker_pod(d).update(tolerations=[])),
    "too-few-gpus": (check_pipeline_fits, lambda d: _job(d)["rayClusterSpec"]["workerGroupSpecs"][0].update(
        replicas=1, minReplicas=1)),
    "val-not-mounted": (check_pipeline_fits, lambda d: _worker_pod(d)["containers"][0].update(volumeMounts=[
        m for m in _worker_pod(d)["containers"][0]["volumeMounts"] if m["mountPath"] != "/data/val"])),
    "bad-pipeline-override": (check_pipeline_fits, lambda d: _job(d).update(
        entrypoint=_job(d)["entrypoint"] + " config.scaling.num_workerz=4")),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_breakage_is_reported(gpu: list[dict[str, Any]], case: str) -> None:
    check, breaks = BREAKAGES[case]
    before = set(map(str, check(gpu)))
    breaks(gpu)
    new = set(map(str, check(gpu))) - before
    assert new, f"{case}: {check.__name__} reported nothing new"


# --- the MLflow server starts with the rendered command line -----------------------------------------------------


def _status(port: int, path: str, host: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.integration
def test_mlflow_server_accepts_the_service_host(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """Runs `mlflow server` with the dev Deployment's command, args and env (store paths moved into tmp_path):
    the flags parse, /health answers, and a request addressed to the Service name is allowed while a foreign
    Host header is refused (MLflow 3's DNS-rebinding guard would otherwise reject in-cluster clients)."""
    container = _mlflow(rendered["dev"])["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env |= {"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",
            "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts")}
    port = free_loopback_port()
    args = [a if a != "0.0.0.0" else "127.0.0.1" for a in container["args"]]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--workers") + 1] = "1"  # two CPU cores here
    exe = Path(sys.executable).parent / container["command"][0]
    proc = subprocess.Popen([str(exe), *container["command"][1:], *args], env=os.environ | env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"mlflow server exited: {proc.stderr.read()[-2000:]}"
            try:
                if _status(port, "/health", f"127.0.0.1:{port}") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 120 s"
            time.sleep(0.5)
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(port, search, "facescale-mlflow:5000") == 200
        assert _status(port, search, "facescale-mlflow.facescale-dev.svc.cluster.local:5000") == 200
        assert _status(port, search, "evil.example.com") == 403
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
