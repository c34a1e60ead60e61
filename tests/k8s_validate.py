"""Validates FaceScale's rendered Kubernetes manifests offline: schemas (``k8s_schema``) plus deployment policy.

Policy, beyond what the schemas and KubeRay check:

- the RayJob entrypoint names a job in ``jobs/`` and a pipeline in ``pipelines/`` that exist, runs from the
  image's WORKDIR, and the pipeline ConfigMap mounted over ``pipelines/`` carries that very pipeline;
- one image reference (with a tag, not ``latest``) in every container; ``rayVersion`` equals the ray pin;
- every ConfigMap / ServiceAccount reference resolves; Secrets are only the documented external ones;
- security: the Pod Security Standard "restricted" profile (non-root, no privilege escalation, ALL capabilities
  dropped, RuntimeDefault seccomp, no host namespaces or hostPath), secrets only through ``secretKeyRef``, no
  credential in a ConfigMap, an env ``value`` or a container argument;
- Ray pods mount a memory-backed ``/dev/shm``; GPU pods tolerate the ``nvidia.com/gpu`` taint;
- the job's config, loaded by the library exactly as the job loads it, validates; its Ray Train workers fit the
  cluster's CPUs/GPUs; every absolute local path it names is a volume mounted in every Ray pod.

Usage: ``python tests/k8s_validate.py [OVERLAY ...]`` (default: every overlay); exits 1 on any finding.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from k8s_schema import (
    REPO,
    Finding,
    check_gpus,
    containers,
    pod_specs,
    render_overlay,
    resource_name,
    validate_core,
    validate_kuberay,
)

OVERLAYS = REPO / "k8s" / "overlays"
# The image's WORKDIR (Dockerfile): Ray containers start there, so the entrypoint's relative paths resolve.
IMAGE_WORKDIR = "/home/ray/facescale"
# Created out of band (README "Run on a cluster"); manifests may reference only these Secrets and keys.
EXTERNAL_SECRETS = {"facescale-s3": {"access-key-id", "secret-access-key"}, "facescale-mlflow-db": {"uri"}}
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
# A URL with user:password@, an AWS secret key setting, or a PEM block.
CREDENTIAL_VALUE = re.compile(r"://[^/\s:@]+:[^/\s@]+@|aws_secret_access_key|-----BEGIN", re.IGNORECASE)
# Pod Security Standards, "restricted" profile (kubernetes.io/docs/concepts/security/pod-security-standards).
ALLOWED_ADDED_CAPABILITIES = {"NET_BIND_SERVICE"}
SECCOMP_OK = {"RuntimeDefault", "Localhost"}


def ray_pin(requirements: Path = REPO / "requirements.txt") -> str | None:
    """The ray version pinned in requirements.txt (``ray[...]==X``), or None."""
    m = re.search(r"^ray(\[[^\]]*\])?==(\S+)", requirements.read_text(), re.MULTILINE)
    return m.group(2) if m else None


def _ray_pods(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Head and worker pod specs of a RayJob / RayCluster (not the submitter)."""
    return [(p, pod) for p, pod in pod_specs(doc) if "submitterPodTemplate" not in p]


def check_security(docs: list[dict[str, Any]]) -> list[Finding]:
    """Restricted pod security, and Secrets that reach containers only through ``secretKeyRef``."""
    out = []
    for doc in docs:
        res = resource_name(doc)
        if doc.get("kind") == "Secret":
            out.append(Finding(res, "", "Secrets are created out of band, never rendered from the repository"))
        if doc.get("kind") == "ConfigMap":
            for key, value in (doc.get("data") or {}).items():
                if CREDENTIAL_NAME.search(key) or CREDENTIAL_VALUE.search(str(value)):
                    out.append(Finding(res, f"data.{key}", "looks like a credential; use a Secret and secretKeyRef"))
        for pod_path, pod in pod_specs(doc):
            out += _check_pod(res, pod_path, pod)
    return out


def _check_pod(res: str, pod_path: str, pod: dict[str, Any]) -> list[Finding]:
    out = []
    psc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(Finding(res, f"{pod_path}.{field}", "host namespaces are not allowed"))
    for i, vol in enumerate(pod.get("volumes") or []):
        where = f"{pod_path}.volumes[{i}]"
        if "hostPath" in vol:
            out.append(Finding(res, where, "hostPath volumes are not allowed"))
        sources = [vol] + [s for s in (vol.get("projected") or {}).get("sources", [])]
        if any("secret" in s for s in sources):
            out.append(Finding(res, where, "Secrets reach containers only through env secretKeyRef"))
    for c_path, c in containers(pod):
        where = f"{pod_path}.{c_path}"
        csc = c.get("securityContext") or {}
        if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot"))):
            out.append(Finding(res, where, "runAsNonRoot must be true (pod or container securityContext)"))
        if csc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(Finding(res, where, "runAsUser 0 is root"))
        if csc.get("privileged"):
            out.append(Finding(res, f"{where}.securityContext.privileged", "privileged containers are not allowed"))
        if csc.get("allowPrivilegeEscalation") is not False:
            out.append(Finding(res, f"{where}.securityContext", "allowPrivilegeEscalation must be false"))
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(Finding(res, f"{where}.securityContext.capabilities", "must drop ALL"))
        if set(caps.get("add") or []) - ALLOWED_ADDED_CAPABILITIES:
            out.append(Finding(res, f"{where}.securityContext.capabilities.add", "only NET_BIND_SERVICE may be added"))
        seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in SECCOMP_OK:
            out.append(Finding(res, where, "seccompProfile must be RuntimeDefault (pod or container)"))
        out += _check_env(res, where, c)
    return out


def _check_env(res: str, where: str, c: dict[str, Any]) -> list[Finding]:
    out = []
    for i, env in enumerate(c.get("env") or []):
        name, at = env.get("name", ""), f"{where}.env[{i}]"
        if "value" in env and (CREDENTIAL_NAME.search(name) or CREDENTIAL_VALUE.search(str(env["value"]))):
            out.append(Finding(res, at, f"{name} looks like a credential; take it from a Secret with secretKeyRef"))
        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
        if ref is not None and ref.get("key") not in EXTERNAL_SECRETS.get(ref.get("name"), set()):
            out.append(Finding(res, at, f"secret {ref.get('name')}/{ref.get('key')} is not one of the documented "
                                        f"external Secrets {sorted(EXTERNAL_SECRETS)}"))
    for i, src in enumerate(c.get("envFrom") or []):
        if "secretRef" in src:
            out.append(Finding(res, f"{where}.envFrom[{i}]", "envFrom secretRef exposes a whole Secret; "
                                                             "use secretKeyRef"))
    for field in ("command", "args"):
        if any(CREDENTIAL_VALUE.search(str(a)) for a in c.get(field) or []):
            out.append(Finding(res, f"{where}.{field}", "a credential in the command line is visible to everyone"))
    return out


def check_references(docs: list[dict[str, Any]]) -> list[Finding]:
    """ConfigMap (and keys), PVC, ServiceAccount and Service-selector references resolve within the rendered set."""
    config_maps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d.get("kind") == "ConfigMap"}
    accounts = {d["metadata"]["name"] for d in docs if d.get("kind") == "ServiceAccount"}
    claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    pod_labels = [d["spec"]["template"].get("metadata", {}).get("labels", {}) for d in docs
                  if d.get("kind") == "Deployment"]
    out = []
    for doc in docs:
        res = resource_name(doc)
        if doc.get("kind") == "Service":
            selector = doc.get("spec", {}).get("selector") or {}
            if not any(selector.items() <= labels.items() for labels in pod_labels):
                out.append(Finding(res, "spec.selector", f"{selector} selects no pod template in the overlay"))
        for pod_path, pod in pod_specs(doc):
            account = pod.get("serviceAccountName")
            if account is not None and account not in accounts:
                out.append(Finding(res, f"{pod_path}.serviceAccountName", f"no ServiceAccount {account!r}"))
            for i, vol in enumerate(pod.get("volumes") or []):
                claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
                if claim is not None and claim not in claims:
                    out.append(Finding(res, f"{pod_path}.volumes[{i}]", f"no PersistentVolumeClaim {claim!r}"))
            refs = [(f"volumes[{i}]", v["configMap"].get("name"), None, v["configMap"].get("optional"))
                    for i, v in enumerate(pod.get("volumes") or []) if "configMap" in v]
            for c_path, c in containers(pod):
                refs += [(f"{c_path}.envFrom[{i}]", s["configMapRef"].get("name"), None,
                          s["configMapRef"].get("optional")) for i, s in enumerate(c.get("envFrom") or [])
                         if "configMapRef" in s]
                for i, env in enumerate(c.get("env") or []):
                    ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                    if ref:
                        refs.append((f"{c_path}.env[{i}]", ref.get("name"), ref.get("key"), ref.get("optional")))
            for where, name, key, optional in refs:
                if optional:
                    continue
                if name not in config_maps:
                    out.append(Finding(res, f"{pod_path}.{where}", f"no ConfigMap {name!r} in the overlay"))
                elif key is not None and key not in config_maps[name]:
                    out.append(Finding(res, f"{pod_path}.{where}", f"ConfigMap {name!r} has no key {key!r}"))
    return out


def check_images(docs: list[dict[str, Any]]) -> list[Finding]:
    """One image reference for every container of the overlay, pinned by a tag (not ``latest``) or a digest."""
    images: dict[str, str] = {}
    for doc in docs:
        for pod_path, pod in pod_specs(doc):
            for c_path, c in containers(pod):
                images.setdefault(c.get("image", ""), f"{resource_name(doc)} {pod_path}.{c_path}")
    out = []
    if len(images) > 1:
        out.append(Finding("<overlay>", "", f"several images: {sorted(images)}; every container runs one build"))
    for image, where in images.items():
        last = image.rsplit("/", 1)[-1]
        if "@" not in last and (":" not in last or last.endswith(":latest")):
            out.append(Finding(where, "image", f"{image!r} needs an explicit tag other than latest (or a digest)"))
    return out


def check_rayjobs(docs: list[dict[str, Any]], repo: Path = REPO) -> list[Finding]:
    """RayJob entrypoint, working directory, pipeline ConfigMap, cleanup, Ray version, shm and GPU tolerations."""
    config_maps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d.get("kind") == "ConfigMap"}
    pin = ray_pin(repo / "requirements.txt")
    out = []
    for doc in docs:
        if doc.get("kind") not in ("RayJob", "RayCluster"):
            continue
        res, spec = resource_name(doc), doc.get("spec", {})
        cluster = spec.get("rayClusterSpec", {}) if doc["kind"] == "RayJob" else spec
        if cluster.get("rayVersion") != pin:
            out.append(Finding(res, "rayVersion", f"{cluster.get('rayVersion')!r} != ray=={pin} in requirements.txt"))
        for pod_path, pod in _ray_pods(doc):
            out += _check_ray_pod(res, pod_path, pod)
        if doc["kind"] == "RayJob":
            if spec.get("shutdownAfterJobFinishes") is not True or "ttlSecondsAfterFinished" not in spec:
                out.append(Finding(res, "spec", "set shutdownAfterJobFinishes: true and ttlSecondsAfterFinished "
                                                "so a finished job gives its GPUs back"))
            out += _check_entrypoint(res, spec, config_maps, repo)
    return out


def _check_ray_pod(res: str, pod_path: str, pod: dict[str, Any]) -> list[Finding]:
    out = []
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    gpu = False
    for c_path, c in containers(pod):
        where = f"{pod_path}.{c_path}"
        gpu |= any(k.endswith("/gpu") for k in ((c.get("resources") or {}).get("limits") or {}))
        if c.get("workingDir") != IMAGE_WORKDIR:
            out.append(Finding(res, f"{where}.workingDir", f"must be the image WORKDIR {IMAGE_WORKDIR}"))
        if c_path.startswith("initContainers"):
            continue
        shm = [m for m in c.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"]
        if not shm or (volumes.get(shm[0].get("name"), {}).get("emptyDir") or {}).get("medium") != "Memory":
            out.append(Finding(res, where, "mount an emptyDir with medium: Memory at /dev/shm (64 MiB by default)"))
    tolerated = {t.get("key") for t in pod.get("tolerations") or []}
    if gpu and "nvidia.com/gpu" not in tolerated:
        out.append(Finding(res, f"{pod_path}.tolerations", "GPU pods must tolerate the nvidia.com/gpu taint"))
    return out


def _check_entrypoint(res: str, spec: dict[str, Any], config_maps: dict[str, dict], repo: Path) -> list[Finding]:
    argv = shlex.split(spec.get("entrypoint", ""))
    if len(argv) < 2 or argv[0] not in ("python", "python3") or not re.fullmatch(r"jobs/[\w-]+\.py", argv[1]):
        return [Finding(res, "spec.entrypoint", f"expected `python jobs/<job>.py ...`, got {argv!r}")]
    out = []
    if not (repo / argv[1]).is_file():
        out.append(Finding(res, "spec.entrypoint", f"{argv[1]} does not exist in the repository"))
    pipeline = argv[argv.index("--pipeline") + 1] if "--pipeline" in argv[:-1] else None
    if pipeline is None or not re.fullmatch(r"pipelines/[\w.-]+\.ya?ml", pipeline):
        return out + [Finding(res, "spec.entrypoint", "needs --pipeline pipelines/<name>.yaml")]
    repo_file = repo / pipeline
    if not repo_file.is_file():
        out.append(Finding(res, "spec.entrypoint", f"{pipeline} does not exist in the repository"))
    if spec.get("backoffLimit", 0) > 0 and "--run-id" not in argv:
        out.append(Finding(res, "spec.entrypoint", "with backoffLimit > 0 pass --run-id so a retry resumes"))
    # The pipeline ConfigMap is mounted over <WORKDIR>/pipelines on the head, hiding the image's copies.
    head = spec.get("rayClusterSpec", {}).get("headGroupSpec", {}).get("template", {}).get("spec", {})
    volumes = {v.get("name"): v for v in head.get("volumes") or []}
    for c_path, c in containers(head):
        for m in c.get("volumeMounts") or []:
            if m.get("mountPath", "").rstrip("/") != f"{IMAGE_WORKDIR}/pipelines":
                continue
            cm_name = (volumes.get(m.get("name"), {}).get("configMap") or {}).get("name")
            data = config_maps.get(cm_name, {})
            key, where = Path(pipeline).name, f"spec.rayClusterSpec.headGroupSpec.template.spec.{c_path}"
            if key not in data:
                out.append(Finding(res, where, f"ConfigMap {cm_name!r} mounted over pipelines/ has no {key!r}"))
            elif repo_file.is_file() and yaml.safe_load(data[key]) != yaml.safe_load(repo_file.read_text()):
                out.append(Finding(res, where, f"ConfigMap {cm_name!r} key {key!r} differs from {pipeline}; copy "
                                               f"the repository file into the kustomization's pipelines/ folder"))
    return out


def _quantity(value: Any) -> float:
    """A CPU or count quantity ("72", "500m", 8) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _pod_capacity(group: dict[str, Any]) -> tuple[float, float]:
    """(CPUs, GPUs) Ray advertises for one pod of a group: rayStartParams first, else the container limits."""
    params = group.get("rayStartParams") or {}
    limits = (group["template"]["spec"]["containers"][0].get("resources") or {}).get("limits") or {}
    cpus = _quantity(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return cpus, gpus


def _stage_configs(argv: list[str], repo: Path) -> dict[str, Any]:
    """The training configs the entrypoint will run, parsed and validated by the library as the job does."""
    from facescale.cli import build_parser
    from facescale.config import load_config
    from facescale.distill.pipeline import load_pipeline, stage_configs

    args = build_parser().parse_args([Path(argv[1]).stem, *argv[2:]])  # jobs/<x>.py runs `facescale <x>`
    with contextlib.chdir(repo):  # the job's relative paths (base_config) resolve in the image's WORKDIR
        if args.command == "distill":
            spec = load_pipeline(args.pipeline, args.overrides)
            configs = stage_configs(spec, source=args.pipeline)
            return {"cache_dir": spec.cache_dir, **configs}
        return {"train": load_config(args.config, args.overrides)}


def check_pipeline_fits(docs: list[dict[str, Any]], repo: Path = REPO) -> list[Finding]:
    """The RayJob's pipeline loads and validates; its Ray Train workers fit the cluster; its local paths are mounted.

    Every stage needs ``scaling.num_workers`` workers of ``cpus_per_worker`` CPUs (and one GPU with ``use_gpu``);
    every absolute local path it names (data, verification sets, storage, caches) must be a volume mounted in
    every Ray pod, since the driver checks them on the head and the workers read them.
    """
    out = []
    for doc in docs:
        if doc.get("kind") != "RayJob":
            continue
        res, argv = resource_name(doc), shlex.split(doc["spec"].get("entrypoint", ""))
        try:
            configs = _stage_configs(argv, repo)
        except (SystemExit, Exception) as e:  # noqa: BLE001 -- any failure to load is the finding
            out.append(Finding(res, "spec.entrypoint", f"the job's config does not load: {type(e).__name__}: {e}"))
            continue
        cluster = doc["spec"]["rayClusterSpec"]
        groups = [(cluster["headGroupSpec"], 1)] + [(g, g.get("replicas", g.get("minReplicas", 0)))
                                                    for g in cluster.get("workerGroupSpecs", [])]
        paths = {configs.pop("cache_dir", None)}
        for stage, cfg in configs.items():
            sc, need_gpu = cfg.scaling, 1 if cfg.scaling.use_gpu else 0
            fits = sum(n * int(min(cpus // sc.cpus_per_worker, gpus if need_gpu else float("inf")))
                       for (cpus, gpus), n in ((_pod_capacity(g), n) for g, n in groups))
            if fits < sc.num_workers:
                out.append(Finding(res, "spec.rayClusterSpec", f"stage {stage}: {sc.num_workers} workers of "
                                   f"{sc.cpus_per_worker} CPU{' + 1 GPU' if need_gpu else ''} do not fit; "
                                   f"the cluster holds {fits}"))
            paths |= {cfg.data.root, *cfg.data.val_bins, sc.storage_path, cfg.train.resume_from,
                      cfg.train.init_from, cfg.distill.teacher_cache}
        local = sorted(p for p in paths if p and p.startswith("/"))
        for pod_path, pod in _ray_pods(doc):
            mounts = [m["mountPath"].rstrip("/") for m in pod["containers"][0].get("volumeMounts") or []]
            for path in local:
                if not any(path == m or path.startswith(m + "/") for m in mounts):
                    out.append(Finding(res, pod_path, f"the pipeline reads {path}, which no volume mounts here"))
    return out


def validate_manifests(docs: list[dict[str, Any]], repo: Path = REPO) -> list[Finding]:
    """Every check (schemas, KubeRay rules, policy) over one overlay's rendered resources."""
    return (validate_core(docs) + validate_kuberay(docs) + check_gpus(docs) + check_security(docs)
            + check_references(docs) + check_images(docs) + check_rayjobs(docs, repo) + check_pipeline_fits(docs, repo))


def validate_overlay(overlay: str | Path) -> list[Finding]:
    """Renders ``overlay`` with kubectl kustomize and validates it."""
    return validate_manifests(render_overlay(overlay))


def main(argv: list[str]) -> int:
    """Command line: validate the given overlays (default: all), print findings, return 1 if any."""
    overlays = argv or sorted(str(p) for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file())
    failed = False
    for overlay in overlays:
        findings = validate_overlay(overlay)
        failed |= bool(findings)
        print(f"{overlay}: {'OK' if not findings else f'{len(findings)} problem(s)'}")
        for f in findings:
            print(f"  {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
