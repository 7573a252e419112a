"""Validate every deployment file under infra/ and ray_cluster.yaml, offline.

    python infra/validate.py            # prints one line per document; exit 1 on the first invalid file
    python infra/validate.py --release  # and every image pinned by its digest (what is applied to a cluster)

- Kubernetes objects: the Kubernetes OpenAPI schemas bundled with ``kubernetes-validate`` (strict: unknown
  fields are errors), for the Kubernetes version below.
- KubeRay objects (RayCluster, RayJob; ray.io/v1): the subset of the KubeRay v1 API these manifests use, as a
  JSON schema written here (unknown fields are errors), and every pod template inside them as a Kubernetes
  ``PodTemplate``.  The operator's own CRD is not needed, and nothing is fetched.
- ray_cluster.yaml: Ray's own cluster-launcher validation (``ray.autoscaler``), as ``ray up`` runs it; every
  ``ray start`` with token auth and the token file on every node; the dashboard on the head's loopback.
- systemd units: ``systemd-analyze verify``-style checks that need no systemd: sections and keys, and the
  timer's calendar expression through ``systemd-analyze calendar`` where that tool exists.
- Dockerfile: the base image's Ray version matches pyproject.toml; every package from infra/docker/requirements.lock
  with ``--require-hashes`` (no other pip install brings a dependency), and the lock pins, each with its sha256, a
  version of every requirement of pyproject.toml (core + ``eval``) that satisfies it.
- Images: with ``--release``, every ``image:`` by its ``@sha256:`` digest.
- Security, on every file: pods run as non-root with no privilege escalation and every capability dropped; no
  secret value or secret variable on a command line; no Secret with a placeholder value; MLflow behind its
  basic-auth app; Ray pods with token authentication and the token from a Secret; the dashboard / Jobs API on
  the head pod's loopback (``dashboard-host: 127.0.0.1``; KubeRay's default is every interface), so a RayJob
  submits from beside the head (SidecarMode); a default-deny NetworkPolicy with policies for MLflow, its database
  and the Ray cluster.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33.0"

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"]}  # checked in full by the Kubernetes schema
_WORKER_GROUP = {
    "type": "object", "additionalProperties": False, "required": ["groupName", "rayStartParams", "template"],
    "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
                   "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
                   "numOfHosts": {"type": "integer", "minimum": 1}, "suspend": {"type": "boolean"},
                   "rayStartParams": _STR_MAP, "template": _POD_TEMPLATE,
                   "scaleStrategy": {"type": "object"}, "idleTimeoutSeconds": {"type": "integer"}},
}
_CLUSTER_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "suspend": {"type": "boolean"},
        "headServiceAnnotations": _STR_MAP,
        "headGroupSpec": {
            "type": "object", "additionalProperties": False, "required": ["rayStartParams", "template"],
            "properties": {"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                           "enableIngress": {"type": "boolean"}, "rayStartParams": _STR_MAP,
                           "template": _POD_TEMPLATE, "headService": {"type": "object"}},
        },
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    },
}
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}}
KUBERAY_SCHEMAS = {
    "RayCluster": {"type": "object", "additionalProperties": False,
                   "required": ["apiVersion", "kind", "metadata", "spec"],
                   "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"},
                                  "metadata": _META, "spec": _CLUSTER_SPEC}},
    "RayJob": {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": _META,
            "spec": {
                "type": "object", "additionalProperties": False, "required": ["entrypoint"],
                "oneOf": [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}],
                "properties": {
                    "entrypoint": {"type": "string", "minLength": 1}, "runtimeEnvYAML": {"type": "string"},
                    "jobId": {"type": "string"}, "metadata": _STR_MAP,
                    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "backoffLimit": {"type": "integer", "minimum": 0}, "suspend": {"type": "boolean"},
                    "rayClusterSpec": _CLUSTER_SPEC, "clusterSelector": _STR_MAP,
                    "submitterPodTemplate": _POD_TEMPLATE, "entrypointNumCpus": {"type": "number"},
                    "entrypointNumGpus": {"type": "number"}, "entrypointResources": {"type": "string"},
                },
            },
        },
    },
}


class Invalid(ValueError):
    pass


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"]
    clusters = [spec] if doc["kind"] == "RayCluster" else [spec.get("rayClusterSpec") or {}]
    out = []
    for c in clusters:
        if "headGroupSpec" in c:
            out.append(("headGroupSpec.template", c["headGroupSpec"]["template"]))
        for g in c.get("workerGroupSpecs", []):
            out.append((f"workerGroupSpecs[{g['groupName']}].template", g["template"]))
    if "submitterPodTemplate" in spec:
        out.append(("submitterPodTemplate", spec["submitterPodTemplate"]))
    return out


def validate_k8s_document(doc: dict, where: str) -> str:
    import jsonschema
    import kubernetes_validate

    kind = doc.get("kind")
    try:
        if kind in KUBERAY_SCHEMAS:
            jsonschema.validate(doc, KUBERAY_SCHEMAS[kind])
            for path, tmpl in _pod_templates(doc):
                pt = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": tmpl}
                try:
                    kubernetes_validate.validate(pt, K8S_VERSION, strict=True)
                except kubernetes_validate.ValidationError as e:
                    raise Invalid(f"{where}: {kind} {path}: {e.message}") from None
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except jsonschema.ValidationError as e:
        raise Invalid(f"{where}: {kind} at {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}") from None
    except kubernetes_validate.ValidationError as e:
        raise Invalid(f"{where}: {kind}: {e.message} (at {'/'.join(map(str, e.path))})") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise Invalid(f"{where}: no Kubernetes schema for {doc.get('apiVersion')}/{kind}: {e}") from None
    return f"{kind}/{doc['metadata']['name']}"


PLACEHOLDER = re.compile(r"replace|change.?me|todo|example|your[_-]|xxx|^$|^(password|secret|admin|token)$", re.I)
SECRET_ON_CMDLINE = re.compile(r"\$\{?[A-Z_]*(PASSWORD|SECRET|TOKEN|KEY)[A-Z_]*\}?|://[^/\s:@]+:[^@\s]+@")


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod a document makes."""
    kind = doc.get("kind")
    if kind in KUBERAY_SCHEMAS:
        return [(path, t["spec"]) for path, t in _pod_templates(doc)]
    spec = doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [("template", spec["template"]["spec"])]
    if kind == "CronJob":
        return [("jobTemplate.template", spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "Pod":
        return [("pod", spec)]
    return []


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _clusters(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    return [spec] if doc.get("kind") == "RayCluster" else [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []


def check_dashboard(doc: dict, where: str) -> None:
    """The Jobs API runs any code it is sent: the head's dashboard listens on its loopback, and a RayJob that
    creates its cluster submits from beside the head."""
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
    for c in _clusters(doc):
        host = c.get("headGroupSpec", {}).get("rayStartParams", {}).get("dashboard-host")
        if host not in LOOPBACK_HOSTS:
            raise Invalid(f"{where}: {kind}/{name}: headGroupSpec.rayStartParams.dashboard-host is {host!r}; set "
                          "\"127.0.0.1\" (KubeRay's default is 0.0.0.0: the Jobs API, which runs any code it is sent, "
                          "on the pod network) and reach it with kubectl port-forward")
        if kind == "RayJob" and doc["spec"].get("submissionMode", "K8sJobMode") not in ("SidecarMode",
                                                                                      "InteractiveMode"):
            raise Invalid(f"{where}: RayJob/{name}: a {doc['spec'].get('submissionMode', 'K8sJobMode')} submitter "
                          "cannot reach a dashboard on the head's loopback; use submissionMode: SidecarMode")


def check_ray_cluster_launcher(config: dict, where: str = "ray_cluster.yaml") -> None:
    """Every node starts Ray with token auth and has the cluster's token; the head's dashboard stays on loopback; the
    checkout is synced without the state folder and the outputs; packages come from the hashed lock only."""
    mounts = config.get("file_mounts") or {}
    if not any(str(dst).endswith(".ray/auth_token") for dst in mounts):
        raise Invalid(f"{where}: no file_mounts entry copies the cluster's token to ~/.ray/auth_token on every node "
                      "(`ray get-auth-token --generate` makes it locally)")
    if any(str(src).strip() in (".", "./") or not str(src).startswith("~") for src in mounts.values()):
        excluded = " ".join(config.get("rsync_exclude") or [])
        missing = [d for d in (".platform", "outputs") if d not in excluded]
        if missing:
            raise Invalid(f"{where}: file_mounts syncs the checkout but rsync_exclude does not leave out "
                          f"{', '.join(missing)} (the state folder holds the registry, tokens and shards; outputs "
                          "holds reports of research-licensed faces)")
    for cmd in config.get("setup_commands") or []:
        if "pip install" in cmd and "--no-deps" not in cmd and not (
                "--require-hashes" in cmd and "infra/docker/requirements.lock" in cmd):
            raise Invalid(f"{where}: setup_commands: `{cmd}` installs packages outside the hashed lock "
                          "(pip install --require-hashes -r infra/docker/requirements.lock, then the project "
                          "--no-deps)")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in config.get(key) or []:
            if "ray start" not in cmd:
                continue
            if "RAY_AUTH_MODE=token" not in cmd:
                raise Invalid(f"{where}: {key}: `{cmd}` starts Ray without token auth (prefix RAY_AUTH_MODE=token)")
            m = re.search(r"--dashboard-host[= ](\S+)", cmd)
            if m and m.group(1).strip("'\"") not in LOOPBACK_HOSTS:
                raise Invalid(f"{where}: {key}: --dashboard-host={m.group(1)} puts the Jobs API, which runs any code "
                              "it is sent, on the network; keep it on 127.0.0.1 (`ray dashboard ray_cluster.yaml`)")


def check_security(doc: dict, where: str) -> None:
    """Non-root pods without privileges, credentials only from Secrets and never on a command line."""
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
    if kind == "Secret":
        for key, value in {**doc.get("stringData", {}), **doc.get("data", {})}.items():
            if PLACEHOLDER.search(str(value)):
                raise Invalid(f"{where}: Secret/{name} key {key} holds a placeholder ({value!r}): secrets are created "
                              "from a secret manager (kubectl create secret ...), never committed with stand-ins")
    for path, pod in pod_specs(doc):
        at = f"{where}: {kind}/{name} {path}"
        if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
            raise Invalid(f"{at}: the pod must set securityContext.runAsNonRoot: true")
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            sc = c.get("securityContext") or {}
            if sc.get("privileged") or sc.get("allowPrivilegeEscalation") is not False:
                raise Invalid(f"{at} container {c['name']}: set securityContext.allowPrivilegeEscalation: false")
            if "ALL" not in (sc.get("capabilities") or {}).get("drop", []):
                raise Invalid(f"{at} container {c['name']}: drop every capability (capabilities.drop: [ALL])")
            cmdline = " ".join(map(str, (c.get("command") or []) + (c.get("args") or [])))
            if SECRET_ON_CMDLINE.search(cmdline):
                raise Invalid(f"{at} container {c['name']}: a credential on the command line "
                              f"({SECRET_ON_CMDLINE.search(cmdline).group(0)!r}); pass it as an environment "
                              "variable from a Secret (secretKeyRef) instead")
            for e in c.get("env", []):
                if re.search(r"PASSWORD|SECRET|TOKEN|_KEY", e["name"]) and "value" in e and e["name"] != "HOME":
                    raise Invalid(f"{at} container {c['name']}: {e['name']} has a literal value; use secretKeyRef")
            if kind in KUBERAY_SCHEMAS and c["name"].startswith("ray-") and not any(
                    e["name"] == "RAY_AUTH_TOKEN" and "secretKeyRef" in e.get("valueFrom", {})
                    for e in c.get("env", [])):
                raise Invalid(f"{at} container {c['name']}: Ray needs RAY_AUTH_TOKEN from a Secret (token auth)")
    if kind == "Deployment" and name == "mlflow":
        cmd = doc["spec"]["template"]["spec"]["containers"][0].get("command", [])
        if "--app-name" not in cmd or cmd[cmd.index("--app-name") + 1] != "basic-auth":
            raise Invalid(f"{where}: Deployment/mlflow must run behind MLflow's basic-auth app (--app-name basic-auth)")
    if kind == "ConfigMap" and name == "prouigan-env" and doc.get("data", {}).get("RAY_AUTH_MODE") != "token":
        raise Invalid(f"{where}: ConfigMap/prouigan-env must set RAY_AUTH_MODE: token")
    if kind in KUBERAY_SCHEMAS:
        check_dashboard(doc, where)
        check_ray_pods(doc, where)


RAY_NODE_LABEL = ("prouigan.io/ray-node", "true")  # what the NetworkPolicies select every Ray pod by
HEAD_SECRET = "prouigan-secrets"  # the drivers' keys: register models, move the champion (gate)


def check_ray_pods(doc: dict, where: str) -> None:
    """Every Ray pod carries the label the NetworkPolicies select; every Ray container has a read-only root with a
    writable /tmp; worker pods (which run training, never the gate) take no key from the head's Secret."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    for path, tmpl in _pod_templates(doc):
        if path == "submitterPodTemplate":
            continue
        at = f"{where}: {kind}/{name} {path}"
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        if labels.get(RAY_NODE_LABEL[0]) != RAY_NODE_LABEL[1]:
            raise Invalid(f"{at}: label the pods {RAY_NODE_LABEL[0]}: \"{RAY_NODE_LABEL[1]}\" (the NetworkPolicies "
                          "select Ray pods by it; unlabelled, default-deny cuts them off)")
        pod = tmpl["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("containers", []):
            if not c["name"].startswith("ray-"):
                continue
            if not (c.get("securityContext") or {}).get("readOnlyRootFilesystem"):
                raise Invalid(f"{at} container {c['name']}: set securityContext.readOnlyRootFilesystem: true (and "
                              "mount an emptyDir at /tmp for Ray's session and caches)")
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
                raise Invalid(f"{at} container {c['name']}: a read-only root needs an emptyDir mounted at /tmp")
            if path.startswith("workerGroupSpecs"):
                refs = {(e.get("valueFrom") or {}).get("secretKeyRef", {}).get("name") for e in c.get("env", [])}
                refs |= {(f.get("secretRef") or {}).get("name") for f in c.get("envFrom", [])}
                if HEAD_SECRET in refs:
                    raise Invalid(f"{at} container {c['name']}: worker pods take keys from {HEAD_SECRET} (the "
                                  "drivers' MLflow user may move @champion); give them prouigan-worker-secrets")


def _internet(peer: dict) -> bool:
    return (peer.get("ipBlock") or {}).get("cidr") == "0.0.0.0/0"


def check_network_policies(docs: list[dict]) -> None:
    """A default deny of ingress and egress for the namespace, DNS allowed, a policy for each service that listens
    and for each kind of pod that sends, and no egress rule open to everything."""
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    for direction in ("Ingress", "Egress"):
        if not any(d["spec"].get("podSelector") == {} and direction in d["spec"].get("policyTypes", []) and
                   not d["spec"].get(direction.lower()) for d in policies):
            raise Invalid(f"infra/k8s: no default-deny {direction.lower()} NetworkPolicy (podSelector: {{}}, "
                          f"policyTypes: [{direction}], no rules)")
    if not any(p.get("port") == 53 for d in policies if d["spec"].get("podSelector") == {}
               for rule in d["spec"].get("egress", []) for p in rule.get("ports", [])):
        raise Invalid("infra/k8s: default-deny egress without a rule for DNS (port 53): no pod could resolve a name")
    for d in policies:
        for rule in d["spec"].get("egress", []):
            if not rule.get("to"):
                raise Invalid(f"infra/k8s: NetworkPolicy/{d['metadata']['name']} has an egress rule to anywhere")
            if not rule.get("ports") and any(_internet(t) for t in rule["to"]):
                raise Invalid(f"infra/k8s: NetworkPolicy/{d['metadata']['name']} lets pods send to the internet on "
                              "any port; name the port (443 for the object store)")
    for direction in ("Ingress", "Egress"):
        selected = [d["spec"].get("podSelector", {}).get("matchLabels", {}) for d in policies
                    if direction in d["spec"].get("policyTypes", []) and d["spec"].get(direction.lower())]
        need = [{"app": "mlflow"}, {"app": "mlflow-db"}, {RAY_NODE_LABEL[0]: RAY_NODE_LABEL[1]}]
        if direction == "Egress":
            need.remove({"app": "mlflow-db"})  # the database sends nothing but answers
        for pods in need:
            if pods not in selected:
                raise Invalid(f"infra/k8s: no {direction.lower()} NetworkPolicy selects the pods {pods}")


def validate_k8s_file(path: Path) -> list[str]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if not docs:
        raise Invalid(f"{path}: no documents")
    out = []
    for d in docs:
        out.append(validate_k8s_document(d, str(path.relative_to(ROOT))))
        check_security(d, str(path.relative_to(ROOT)))
    return out


def validate_ray_cluster(path: Path) -> str:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    try:
        validate_config(prepare_config(config))
    except Exception as e:
        raise Invalid(f"{path.name}: {e}") from None
    check_ray_cluster_launcher(config, path.name)
    return "ray cluster launcher config, token auth, dashboard on loopback"


def validate_systemd(path: Path) -> str:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string(path.read_text())
    need = {".service": {"Unit": ["Description"], "Service": ["ExecStart", "Type"]},
            ".timer": {"Unit": ["Description"], "Timer": ["OnCalendar"], "Install": ["WantedBy"]}}[path.suffix]
    for section, keys in need.items():
        for k in keys:
            if not cp.has_option(section, k):
                raise Invalid(f"{path.name}: [{section}] {k} is missing")
    if path.suffix == ".timer" and shutil.which("systemd-analyze"):
        cal = cp.get("Timer", "OnCalendar")
        r = subprocess.run(["systemd-analyze", "calendar", cal], capture_output=True, text=True)
        if r.returncode != 0:
            raise Invalid(f"{path.name}: OnCalendar={cal!r}: {r.stderr.strip() or r.stdout.strip()}")
    if path.suffix == ".service" and "prouigan retrain" not in cp.get("Service", "ExecStart"):
        raise Invalid(f"{path.name}: ExecStart does not run `prouigan retrain`")
    return "systemd unit"


def validate_dockerfile(path: Path, lock: Path | None = None) -> str:
    text = path.read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)
    base = re.search(r"^ARG BASE=(\S+)", text, re.M)
    if not base or not re.search(r"^FROM \$\{BASE\}", text, re.M):
        raise Invalid(f"{path.name}: expected `ARG BASE=...` and `FROM ${{BASE}}`")
    if f":{ray_pin}-" not in base.group(1):
        raise Invalid(f"{path.name}: base image {base.group(1)} is not Ray {ray_pin} (pyproject's pin)")
    installs = [" ".join(line.split()) for line in re.findall(r"^RUN (.*pip install.*)$", text, re.M)]
    hashed = [i for i in installs if "--require-hashes" in i and "-r /tmp/requirements.lock" in i]
    if not hashed or not re.search(r"^COPY .*infra/docker/requirements\.lock /tmp/requirements\.lock$", text, re.M):
        raise Invalid(f"{path.name}: does not install infra/docker/requirements.lock with --require-hashes")
    loose = [i for i in installs if i not in hashed and "--no-deps" not in i]
    if loose:
        raise Invalid(f"{path.name}: a pip install outside the hashed lock: {loose[0]!r} "
                      "(add the package to infra/docker/requirements.in and run `make infra-lock`)")
    n = check_lock(lock or path.parent / "requirements.lock")
    return f"image on {base.group(1)}, {n} packages pinned with their sha256"


def check_lock(lock: Path) -> int:
    """The image's lock pins, with a sha256 each, a version of every requirement of pyproject.toml's core and
    ``eval`` extra and of requirements.in that satisfies it (a pin that drifted from pyproject is caught here)."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for entry in re.split(r"\n(?=[A-Za-z0-9])", lock.read_text()):
        m = re.match(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)", entry)
        if not m:
            continue
        name = canonicalize_name(m.group(1).split("[")[0])
        if "--hash=sha256:" not in entry:
            raise Invalid(f"{lock.name}: {name}=={m.group(2)} has no sha256")
        pins[name] = m.group(2)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["eval"],
              *[line for line in (lock.parent / "requirements.in").read_text().splitlines()
                if line.strip() and not line.startswith("#")]]
    for spec in wanted:
        req = Requirement(spec)
        if req.marker and not req.marker.evaluate({"platform_machine": "x86_64", "sys_platform": "linux",
                                                  "python_version": "3.11"}):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            raise Invalid(f"{lock.name}: {req.name} ({spec}) is not pinned: run `make infra-lock`")
        if req.specifier and not req.specifier.contains(pins[name], prereleases=True):
            raise Invalid(f"{lock.name}: {name}=={pins[name]} does not satisfy {spec!r} (pyproject.toml / "
                          "requirements.in): run `make infra-lock`")
    return len(pins)


def image_refs(docs: list[dict]) -> list[str]:
    """Every container image the manifests name."""
    return sorted({c["image"] for d in docs for _, pod in pod_specs(d)
                   for c in pod.get("containers", []) + pod.get("initContainers", [])})


def unpinned_images(docs: list[dict]) -> list[str]:
    """Images named by a tag, which a registry can move, not by their digest."""
    return [i for i in image_refs(docs) if not re.search(r"@sha256:[0-9a-f]{64}$", i)]


def validate_all(release: bool = False) -> list[tuple[str, str]]:
    """-> [(file, what it holds)] for every deployment file; raises Invalid on the first bad one.  ``release``: every
    image must be pinned by digest too (what is applied to a cluster; the files kept here name the tags you build)."""
    out = [("ray_cluster.yaml", validate_ray_cluster(ROOT / "ray_cluster.yaml"))]
    infra = ROOT / "infra"
    for p in sorted((infra / "k8s").glob("*.yaml")):
        out.append((str(p.relative_to(ROOT)), ", ".join(validate_k8s_file(p))))
    docs = [d for p in sorted((infra / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    check_network_policies(docs)
    for p in sorted((infra / "vm").glob("*.service")) + sorted((infra / "vm").glob("*.timer")):
        out.append((str(p.relative_to(ROOT)), validate_systemd(p)))
    out.append(("infra/docker/Dockerfile", validate_dockerfile(infra / "docker" / "Dockerfile")))
    loose = unpinned_images(docs)
    if loose and release:
        raise Invalid(f"images named by a tag, not a digest: {', '.join(loose)} (pin each to the @sha256: digest "
                      "its registry gave when it was pushed)")
    out.append(("images", f"{len(image_refs(docs))} named; "
                          + (f"by tag, to pin before release: {', '.join(loose)}" if loose else "all by digest")))
    return out


if __name__ == "__main__":
    release = "--release" in sys.argv[1:]
    try:
        for f, what in validate_all(release=release):
            print(f"ok  {f}: {what}")
    except Invalid as e:
        print(f"INVALID  {e}", file=sys.stderr)
        sys.exit(1)
