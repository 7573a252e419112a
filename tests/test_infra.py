"""Every deployment file under infra/ (and ray_cluster.yaml) passes its schema check offline, and the checks
reject the mistakes they exist for: unknown fields, wrong types, a bad schedule, pins that drift."""

from __future__ import annotations

import copy
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
    for kind in ("RayCluster/", "RayJob/", "CronJob/", "Deployment/mlflow", "StatefulSet/mlflow-db", "ConfigMap/",
                 "Secret/"):
        assert kind in kinds
    assert {"infra/vm/prouigan-retrain.service", "infra/vm/prouigan-retrain.timer", "infra/docker/Dockerfile",
            "ray_cluster.yaml"} <= set(checked)


@pytest.mark.parametrize("file,mutate,message", [
    ("mlflow.yaml", lambda d: d[3]["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always"),
     "imagePullPolicyy"),
    ("cronjob-retrain.yaml", lambda d: d[0]["spec"].update(concurrencyPolicy=3), "concurrencyPolicy"),
    ("raycluster.yaml", lambda d: d[0]["spec"]["workerGroupSpecs"][0].update(replica=2), "replica"),
    ("raycluster.yaml", lambda d: d[0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .update(resources={"limits": {"cpu": [4]}}), "headGroupSpec.template"),
    ("rayjob-train.yaml", lambda d: d[0]["spec"].pop("clusterSelector"), "is not valid under any of the given"),
])
def test_the_checks_reject_broken_manifests(file, mutate, message):
    docs = copy.deepcopy(_docs(file))
    mutate(docs)
    with pytest.raises(infra.Invalid, match=message):
        for d in docs:
            infra.validate_k8s_document(d, file)


def test_a_bad_timer_schedule_and_a_drifted_pin_are_caught(tmp_path):
    timer = tmp_path / "t.timer"
    timer.write_text((REPO / "infra/vm/prouigan-retrain.timer").read_text().replace("02:00:00", "25:99:00"))
    if infra.shutil.which("systemd-analyze"):
        with pytest.raises(infra.Invalid, match="OnCalendar"):
            infra.validate_systemd(timer)
    docker = tmp_path / "Dockerfile"
    docker.write_text((REPO / "infra/docker/Dockerfile").read_text().replace("ray:2.60.0", "ray:2.40.0"))
    with pytest.raises(infra.Invalid, match="is not Ray 2.60.0"):
        infra.validate_dockerfile(docker)
