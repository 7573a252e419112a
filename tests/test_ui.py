"""The MLflow UI as a person sees it, in a real browser (Debian's chromium, driven by Playwright), logged in with the
stack's MLflow login (a browser without it gets 401): after a real training on the stack, the registry page shows
the model's description and the version's alias, the version page its card (dataset, recipe, scores beside
bicubic's, how to load and serve it), and the run page the dataset it was trained on. Screenshots:
outputs/screenshots/mlflow-*.png."""

from __future__ import annotations

import mlflow
import pytest

from prouigan_platform import stack as st
from tests.browser import browser, shot
from tests.conftest import run_cli

pytestmark = pytest.mark.stack
MODEL = "prouigan-ui-test"


@pytest.fixture(scope="module")
def trained(stack):
    b = stack.bucket
    common = ["-c", "smoke", f"data.output=s3://{b}/datasets/ui-test", f"train.storage=s3://{b}/ui-ckpt",
              "name=ui-test", "tracking.experiment=ui-test", f"tracking.registered_model={MODEL}"]
    out = run_cli(stack, "shard", *common)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_cli(stack, "train", *common, "train.steps=4")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    client = mlflow.MlflowClient(stack.mlflow_uri)
    version = client.get_model_version_by_alias(MODEL, "challenger")
    return stack, client, version


def test_the_registry_version_and_run_pages_show_aliases_card_and_dataset(trained):
    stack, client, version = trained
    run = client.get_run(version.run_id)
    login = st.mlflow_login(stack)
    with browser() as b:
        # a browser without the stack's login gets MLflow's 401, and no page
        from playwright.sync_api import Error as PlaywrightError  # installed: browser() skips otherwise

        stranger = b.new_page()
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):  # headless: the prompt refused
            stranger.goto(f"{stack.mlflow_uri}/#/models/{MODEL}")
        assert stranger.request.get(f"{stack.mlflow_uri}/").status == 401
        stranger.close()
        # the login a user types into the browser's prompt (from `prouigan platform env`)
        page = b.new_context(http_credentials={"username": login["MLFLOW_TRACKING_USERNAME"],
                                               "password": login["MLFLOW_TRACKING_PASSWORD"]},
                             viewport={"width": 1400, "height": 1000}).new_page()
        page.goto(f"{stack.mlflow_uri}/#/models/{MODEL}")
        page.wait_for_selector("text=challenger", timeout=60_000)
        assert "128x128 faces from occluded 16x16 thumbnails" in page.inner_text("body")
        shot(page, "mlflow-registry")

        page.goto(f"{stack.mlflow_uri}/#/models/{MODEL}/versions/{version.version}")
        page.wait_for_selector("text=Validation", timeout=60_000)
        body = page.inner_text("body")
        for words in ("recipe ui-test", "ui-test@v0001", "bicubic", "prouigan serve", "Load", "challenger",
                      version.tags["data_manifest_digest"]):
            assert words in body, words
        shot(page, "mlflow-version")

        page.goto(f"{stack.mlflow_uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
        page.wait_for_selector("text=ui-test@v0001", timeout=60_000)
        body = page.inner_text("body")
        assert "Training" in body and "System metrics" in body
        shot(page, "mlflow-run")
    # what the pages showed is what the run recorded: its dataset input, one name per metric, grids by step
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["ui-test@v0001"]
    assert not any(k.startswith("train_") for k in run.data.metrics), sorted(run.data.metrics)
    assert any(k.startswith("system/node_0/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(p.startswith("images/val_grid+step+") and p.endswith(".png") for p in images), images
