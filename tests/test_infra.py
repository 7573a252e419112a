"""Every deployment file under infra/ (and ray_cluster.yaml) passes its schema check offline, and the checks
reject the mistakes they exist for: unknown fields, wrong types, a bad schedule, pins that drift."""

from __future__ import annotations

import copy
import re
import sys

import pytest
import yaml

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "infra"))
import validate as infra  # noqa: E402


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / "infra" / "k8s" / name).read_text()) if d]


def test_every_infra_file_validates():
    checked = dict(infra.validate_all())
    kinds = " ".join(checked.values())
    for kind in ("RayCluster/", "RayJob/", "Deployment/mlflow", "StatefulSet/mlflow-db", "ConfigMap/",
                 "NetworkPolicy/prouigan-default-deny"):
        assert kind in kinds
    assert "Secret/" not in kinds  # secrets come from a secret manager, never from the repository
    assert {"infra/vm/prouigan-retrain.service", "infra/vm/prouigan-retrain.timer", "infra/docker/Dockerfile",
            "ray_cluster.yaml"} <= set(checked)


@pytest.mark.parametrize("file,mutate,message", [
    ("mlflow.yaml", lambda d: d[3]["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always"),
     "imagePullPolicyy"),
    ("mlflow.yaml", lambda d: d[3]["spec"].update(replicas="one"), "replicas"),
    ("raycluster.yaml", lambda d: d[0]["spec"]["workerGroupSpecs"][0].update(replica=2), "replica"),
    ("raycluster.yaml", lambda d: d[0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .update(resources={"limits": {"cpu": [4]}}), "headGroupSpec.template"),
    ("rayjob-train.yaml", lambda d: d[0]["spec"].pop("rayClusterSpec"), "is not valid under any of the given"),
])
def test_the_checks_reject_broken_manifests(file, mutate, message):
    docs = copy.deepcopy(_docs(file))
    mutate(docs)
    with pytest.raises(infra.Invalid, match=message):
        for d in docs:
            infra.validate_k8s_document(d, file)


def _ray_head(d):
    return d[0]["spec"]["headGroupSpec"]["template"]["spec"]


def _ray_worker(d):
    return d[0]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _mlflow_container(d):
    return d[3]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("file,mutate,message", [
    ("mlflow.yaml", lambda d: d[3]["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
    ("mlflow.yaml", lambda d: _mlflow_container(d)["securityContext"].update(allowPrivilegeEscalation=True),
     "allowPrivilegeEscalation"),
    ("mlflow.yaml", lambda d: _mlflow_container(d).update(command=["mlflow", "server", "--backend-store-uri",
                                                                   "postgresql://mlflow:${POSTGRES_PASSWORD}@db/x"]),
     "credential on the command line"),
    ("mlflow.yaml", lambda d: _mlflow_container(d).update(command=["mlflow", "server", "--host", "0.0.0.0"]),
     "basic-auth"),
    ("mlflow.yaml", lambda d: _mlflow_container(d)["env"].append({"name": "MLFLOW_AUTH_ADMIN_PASSWORD",
                                                                  "value": "hunter2"}), "literal value"),
    ("raycluster.yaml", lambda d: d[0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("env"),
     "RAY_AUTH_TOKEN"),
    ("prouigan-env.yaml", lambda d: d[0]["data"].update(RAY_AUTH_MODE="disabled"), "RAY_AUTH_MODE"),
    ("raycluster.yaml", lambda d: d[0]["spec"]["headGroupSpec"]["rayStartParams"].update({"dashboard-host": "0.0.0.0"}),
     "dashboard-host is '0.0.0.0'"),
    ("raycluster.yaml", lambda d: d[0]["spec"]["headGroupSpec"]["rayStartParams"].pop("dashboard-host"),
     "dashboard-host is None"),
    ("rayjob-train.yaml", lambda d: d[0]["spec"].update(submissionMode="K8sJobMode"), "SidecarMode"),
    ("raycluster.yaml", lambda d: _ray_head(d)["containers"][0]["securityContext"].pop("readOnlyRootFilesystem"),
     "readOnlyRootFilesystem"),
    ("raycluster.yaml", lambda d: _ray_head(d)["containers"][0].pop("volumeMounts"), "emptyDir mounted at /tmp"),
    ("rayjob-train.yaml", lambda d: d[0]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
     .pop("prouigan.io/ray-node"), "prouigan.io/ray-node"),
    ("raycluster.yaml", lambda d: _ray_worker(d)["env"][1]["valueFrom"]["secretKeyRef"].update(name="prouigan-secrets"),
     "worker pods take keys from prouigan-secrets"),
])
def test_the_security_checks_reject_weakened_manifests(file, mutate, message):
    docs = copy.deepcopy(_docs(file))
    mutate(docs)
    with pytest.raises(infra.Invalid, match=message):
        for d in docs:
            infra.check_security(d, file)


def test_placeholder_secrets_and_a_missing_default_deny_are_rejected():
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
              "stringData": {"AWS_SECRET_ACCESS_KEY": "REPLACE_ME"}}
    with pytest.raises(infra.Invalid, match="placeholder"):
        infra.check_security(secret, "x.yaml")
    infra.check_security({**secret, "stringData": {"AWS_SECRET_ACCESS_KEY": "k3J9q0vX2m"}}, "x.yaml")
    policies = _docs("networkpolicy.yaml")
    infra.check_network_policies(policies)
    with pytest.raises(infra.Invalid, match="default-deny"):
        infra.check_network_policies(policies[1:])
    with pytest.raises(infra.Invalid, match="mlflow"):
        infra.check_network_policies([p for p in policies if p["metadata"]["name"] != "mlflow"])


def test_a_bad_timer_schedule_and_a_drifted_pin_are_caught(tmp_path):
    timer = tmp_path / "t.timer"
    timer.write_text((REPO / "infra/vm/prouigan-retrain.timer").read_text().replace("02:00:00", "25:99:00"))
    if infra.shutil.which("systemd-analyze"):
        with pytest.raises(infra.Invalid, match="OnCalendar"):
            infra.validate_systemd(timer)
    docker = tmp_path / "Dockerfile"
    docker.write_text((REPO / "infra/docker/Dockerfile").read_text().replace("ray:2.60.0", "ray:2.40.0"))
    with pytest.raises(infra.Invalid, match="is not Ray 2.60.0"):
        infra.validate_dockerfile(docker, LOCK)


LOCK = REPO / "infra/docker/requirements.lock"


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.replace("--require-hashes ", ""), "with --require-hashes"),
    (lambda t: t.replace("ENV PYTHONUNBUFFERED", 'RUN pip install "psycopg2-binary>=2.9"\nENV PYTHONUNBUFFERED'),
     "a pip install outside the hashed lock"),
    (lambda t: t.replace("--no-deps --no-build-isolation -e .", "-e ."), "a pip install outside the hashed lock"),
])
def test_the_image_installs_only_what_the_hashed_lock_pins(tmp_path, mutate, message):
    docker = tmp_path / "Dockerfile"
    docker.write_text(mutate((REPO / "infra/docker/Dockerfile").read_text()))
    with pytest.raises(infra.Invalid, match=message):
        infra.validate_dockerfile(docker, LOCK)


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.replace("torch==2.13.0", "torch==2.12.0"), r"torch==2.12.0 does not satisfy 'torch==2.13.0'"),
    (lambda t: t.replace("\nmlflow==", "\nnot-mlflow=="), "mlflow.* is not pinned"),
    (lambda t: re.sub(r"(yuface==2023\.5\.1) \\\n(    --hash=\S+(?: \\)?\n)+", r"\1\n", t),
     "yuface==2023.5.1 has no sha256"),
])
def test_a_lock_that_drifted_from_pyproject_or_lost_a_hash_is_caught(tmp_path, mutate, message):
    (tmp_path / "requirements.in").write_text((LOCK.parent / "requirements.in").read_text())
    lock = tmp_path / "requirements.lock"
    text = LOCK.read_text()
    assert mutate(text) != text
    lock.write_text(mutate(text))
    assert infra.check_lock(LOCK) > 100  # the real one holds
    with pytest.raises(infra.Invalid, match=message):
        infra.check_lock(lock)


def test_images_by_tag_are_named_and_refused_for_release():
    docs = [d for p in sorted((REPO / "infra/k8s").glob("*.yaml")) for d in infra.yaml.safe_load_all(p.read_text())
            if d]
    assert "postgres:17" in infra.unpinned_images(docs)
    digest = "@sha256:" + "0" * 64
    for d in docs:
        for _, pod in infra.pod_specs(d):
            for c in pod["containers"] + pod.get("initContainers", []):
                c["image"] = c["image"].split(":")[0] + digest
    assert infra.unpinned_images(docs) == [] and infra.image_refs(docs)
    with pytest.raises(infra.Invalid, match="by a tag, not a digest"):
        infra.validate_all(release=True)


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c["head_start_ray_commands"].__setitem__(1, c["head_start_ray_commands"][1].replace(
        "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")), "--dashboard-host=0.0.0.0"),
    (lambda c: c["worker_start_ray_commands"].__setitem__(1, "ray start --address=$RAY_HEAD_IP:6379"), "token auth"),
    (lambda c: c["file_mounts"].pop("/home/ubuntu/.ray/auth_token"), "auth_token"),
    (lambda c: c.pop("rsync_exclude"), "does not leave out .platform, outputs"),
    (lambda c: c["setup_commands"].append("~/venv/bin/pip install -q requests"), "outside the hashed lock"),
    (lambda c: c["setup_commands"].__setitem__(1, c["setup_commands"][1].replace(" --require-hashes", "")),
     "outside the hashed lock"),
    (lambda c: c.__setitem__("rsync_exclude", ["**/.venv"]), "does not leave out .platform, outputs"),
])
def test_the_cluster_launcher_config_must_keep_token_auth_and_a_loopback_dashboard(mutate, message):
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    infra.check_ray_cluster_launcher(config)
    mutate(config)
    with pytest.raises(infra.Invalid, match=message):
        infra.check_ray_cluster_launcher(config)


def _policies() -> list[dict]:
    return [d for p in sorted((REPO / "infra" / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _policy(docs: list[dict], name: str) -> dict:
    return next(d for d in docs if d.get("kind") == "NetworkPolicy" and d["metadata"]["name"] == name)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: _policy(d, "prouigan-default-deny")["spec"].update(policyTypes=["Ingress"]), "default-deny egress"),
    (lambda d: _policy(d, "dns")["spec"]["egress"][0]["ports"].clear(), "DNS"),
    (lambda d: _policy(d, "ray-nodes")["spec"]["egress"].append({}), "egress rule to anywhere"),
    (lambda d: _policy(d, "ray-nodes")["spec"]["egress"][2].pop("ports"), "to the internet on any port"),
    (lambda d: _policy(d, "mlflow")["spec"].pop("egress"), "no egress NetworkPolicy selects the pods {'app': 'ml"),
])
def test_the_network_checks_reject_open_egress(mutate, message):
    docs = copy.deepcopy(_policies())
    infra.check_network_policies(docs)
    mutate(docs)
    with pytest.raises(infra.Invalid, match=message):
        infra.check_network_policies(docs)
