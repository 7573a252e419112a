"""ray_cluster.yaml passes Ray's own cluster-launcher validation (offline: schema only, no cloud calls)."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO


def _validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_ray_cluster_yaml_is_accepted_by_rays_validation():
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    _validate(config)
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert any("pip install" in c and "prouigan" in c for c in config["setup_commands"])


def test_the_validation_would_catch_a_broken_config():
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    config["available_node_types"]["head"]["bogus_key"] = 1
    with pytest.raises(Exception, match="bogus_key"):
        _validate(config)
