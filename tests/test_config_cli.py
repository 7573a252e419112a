"""The one configuration: files, overrides, validation errors (one line, exit 2), and the CLI around it."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from prouigan_platform.config import Config, ConfigError, load_config
from tests.conftest import REPO


def test_every_shipped_config_loads():
    for path in sorted((REPO / "pipelines" / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, Config) and cfg.name


def test_overrides_are_typed_and_applied():
    cfg = load_config("smoke", ["train.steps=17", "loss.tv=0.5", "data.occlusion.kinds=[rectangle]",
                                "model.overrides.attn_dim=4", "train.dataset=null"])
    assert cfg.train.steps == 17 and cfg.loss.tv == 0.5 and cfg.data.occlusion.kinds == ["rectangle"]
    assert cfg.model.overrides == {"attn_dim": 4} and cfg.train.dataset is None


def test_extends_merges_files(tmp_path):
    (tmp_path / "child.yaml").write_text(f"extends: {REPO}/pipelines/configs/smoke.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.steps == 9 and cfg.model.preset == "tiny" and cfg.train.batch_size == 4


@pytest.mark.parametrize("overrides, fragment", [
    (["train.stpes=3"], "unknown config key 'train.stpes' (did you mean 'train.steps'?)"),
    (["train.steps=many"], "config key 'train.steps'"),
    (["model.preset=huge"], "config key 'model.preset'"),
    (["model.overrides.width=3"], "unknown generator field(s) ['width']"),
    (["data.occlusion.kinds=[laser]"], "config key 'data.occlusion.kinds.0'"),
    (["noequals"], "not of the form key=value"),
    (["data.final_fraction=0.3"], "final_fraction > 0 needs final_source_weights"),
    (["data.final_source_weights={a: -1}"], "config key 'data.final_source_weights"),
])
def test_bad_values_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("smoke", overrides)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_missing_file_is_a_config_error():
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        load_config("nowhere.yaml")


def test_config_travels_pickled_and_flattens_for_mlflow():
    cfg = load_config("smoke", ["seed=3"])
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and back.digest() == cfg.digest()
    flat = cfg.to_flat_dict()
    assert flat["train.steps"] == 4 and flat["seed"] == 3 and "data.occlusion.coverage" in flat
    assert load_config("smoke", ["seed=4"]).digest() != cfg.digest()


@pytest.mark.parametrize("args", [["config", "-c", "smoke", "train.bogus=1"], ["config", "-c", "missing"],
                                  ["config", "train.steps=x"]])
def test_cli_bad_config_exits_2_with_one_line(args):
    out = subprocess.run([sys.executable, "-m", "prouigan_platform.cli", *args], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prouigan config: error:")


def test_cli_prints_resolved_config():
    out = subprocess.run([sys.executable, "-m", "prouigan_platform.cli", "config", "-c", "smoke", "train.steps=11"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and "steps: 11" in out.stdout


def test_stdlib_platform_is_not_shadowed_from_repo_root():
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.python_version())"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == ".".join(map(str, sys.version_info[:3]))
    assert not (REPO / "platform" / "__init__.py").exists()
