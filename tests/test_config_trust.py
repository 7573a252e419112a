"""What a config may carry into MLflow and back: a config read back from MLflow is never expanded (a planted
``${AWS_SECRET_ACCESS_KEY}`` stays a refusal, not a leak), and credentials in URLs are masked in everything logged."""

from __future__ import annotations

import pytest

from prouigan_platform.config import ConfigError, load_config
from prouigan_platform.paths import redact


def test_a_config_read_back_from_mlflow_is_never_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    planted = tmp_path / "best.yaml"
    planted.write_text("name: x\ntrain:\n  storage: s3://evil/${AWS_SECRET_ACCESS_KEY}\n")
    with pytest.raises(ConfigError, match="'train.storage' names a variable.*never expanded") as e:
        load_config(planted, trusted=False)
    assert "wJalrXUtnFEMI" not in str(e.value)
    (tmp_path / "other.yaml").write_text("name: y\n")
    planted.write_text(f"extends: {tmp_path / 'other.yaml'}\nname: x\n")
    with pytest.raises(ConfigError, match="'extends' in a config read back from MLflow is refused"):
        load_config(planted, trusted=False)
    # the user's own file and overrides: expanded as ever
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: x\ntrain:\n  storage: /data/${AWS_SECRET_ACCESS_KEY}\n")
    assert load_config(mine).train.storage == "/data/wJalrXUtnFEMI"
    planted.write_text("name: x\n")
    cfg = load_config(planted, ["train.storage=/ck/${AWS_SECRET_ACCESS_KEY}"], trusted=False)
    assert cfg.train.storage == "/ck/wJalrXUtnFEMI"


def test_credentials_in_urls_are_masked_in_what_is_logged():
    assert redact("postgresql://optuna:s3cret@db:5432/study") == "postgresql://optuna:***@db:5432/study"
    assert redact("s3://bucket/p?endpoint_override=h:9000&secret_key=abc&scheme=http") == \
        "s3://bucket/p?endpoint_override=h:9000&secret_key=***&scheme=http"
    assert redact("http://h/x?X-Amz-Signature=f00&token=t1") == "http://h/x?X-Amz-Signature=***&token=***"
    assert redact("/plain/path:with:colons") == "/plain/path:with:colons"
    cfg = load_config("smoke", ["tune.study_storage=postgresql://optuna:s3cret@db/study"])
    assert cfg.tune.study_storage.endswith(":s3cret@db/study")  # what the run itself uses
    flat, text = cfg.to_flat_dict(redacted=True), cfg.to_yaml(redacted=True)
    assert flat["tune.study_storage"] == "postgresql://optuna:***@db/study"
    assert "s3cret" not in text and "s3cret" not in str(flat)
