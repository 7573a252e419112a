"""Evaluation, the registry gate, serving and `restore`, on a few real faces from ../shared/faces and the real
stack (S3 bucket, MLflow server and registry).

Two generators with known quality stand in for trained ones, so the gate's verdicts are certain: "good" is
the tiny generator with its RGB heads zeroed (each stage is then exactly a bilinear x2: a blurry but faithful
face), "bad" is the same network with its RGB heads amplified (loud noise over the face)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from prouigan_platform import run_names as names
from prouigan_platform.storage import boto3_client
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.stack
MODEL = "prouigan-gate-test"


def _generator_file(kind: str, path) -> str:
    from prouigan.generator import ProUIGANGenerator
    from prouigan.inference import save_generator
    from prouigan.presets import generator_config

    torch.manual_seed(0)
    g = ProUIGANGenerator(generator_config("tiny"))
    with torch.no_grad():
        for stage in g.stages:
            if kind == "good":
                stage.to_rgb.weight.zero_()
                stage.to_rgb.bias.zero_()
            else:
                stage.to_rgb.weight.mul_(30.0)
    save_generator(g, path)
    return str(path)


def _register(stack, kind: str, tmp_path, model: str = MODEL) -> str:
    """A new registered version of ``model`` holding the ``kind`` generator; returns its version number."""
    from prouigan_platform.registry import log_and_register

    os.environ.update(stack.env())
    mlflow.set_tracking_uri(stack.mlflow_uri)
    mlflow.set_experiment("gate-test")
    with mlflow.start_run(run_name=f"{kind}-generator") as run:
        pass
    gen = _generator_file(kind, tmp_path / f"{kind}.pt")
    return log_and_register(gen, run.info.run_id, model, "challenger").version


@pytest.fixture(scope="module")
def faces(stack, shared_faces, tmp_path_factory):
    """A 24-face dataset version of real HELEN faces in the bucket, half of them in the test split."""
    src = tmp_path_factory.mktemp("faces24")
    for f in sorted((shared_faces / "helen_train").glob("*.jpg"))[:24]:
        for p in (f, f.with_suffix(".pts")):
            (src / p.name).symlink_to(p)
    root = f"s3://{stack.bucket}/datasets/eval-test"
    out = run_cli(stack, "shard", "-c", "smoke", f"data.sources=[{{kind: 300w, path: {src}}}]", f"data.output={root}",
                  "data.val_fraction=0.2", "data.test_fraction=0.5")
    assert out.returncode == 0, out.stderr[-3000:]
    return f"{root}/manifests/v0001.json"


@pytest.fixture(scope="module")
def versions(stack, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gens")
    return {"bad": _register(stack, "bad", tmp), "good": _register(stack, "good", tmp)}


def _evaluate(stack, model: str, data: str, out, *extra: str):
    return run_cli(stack, "evaluate", "-c", "smoke", "--model", model, "--data", data, "--output", str(out), *extra)


def test_evaluation_reports_every_metric_for_model_and_bicubic(stack, faces, versions, tmp_path):
    out = _evaluate(stack, f"models:/{MODEL}/{versions['good']}", faces, tmp_path / "ev")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["split"] == "test" and m["complete"] and m["faces"] == m["expected_faces"] >= 6
    regions = {f"region_psnr_{r}" for r in ("eyes", "brows", "nose", "mouth", "skin")}
    common = {"psnr", "ssim", "psnr_occluded", "nme", "identity_distance", "match_rate"} | regions
    assert common <= set(m["methods"]["bicubic"])
    assert common | {"prior_nme"} <= set(m["methods"]["model"])
    assert all(np.isfinite(v) for r in m["methods"].values() for v in r.values())
    b, g = m["methods"]["bicubic"], m["methods"]["model"]
    assert 10 < b["psnr"] < 30 and 0 < b["nme"] < 1 and 0 <= b["match_rate"] <= 1
    assert abs(g["psnr"] - b["psnr"]) < 1.5  # bilinear x2 x3 is close to bicubic x8, not identical
    assert g["psnr"] != b["psnr"]
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "| bicubic |" in report and "| original |" in report  # the originals: the ceiling of NME
    assert 0 < m["methods"]["original"]["nme"] < b["nme"] and "psnr" not in m["methods"]["original"]
    # no judge stored in this stack: the paper's parsing and expression columns say how to get them
    assert "parse_f1: not measured — no face parser stored: train one with `prouigan judges train parser`" in report
    assert "expression_accuracy: not measured — no expression classifier stored" in report
    assert Image.open(tmp_path / "ev" / "cases.png").size[0] == 128 * 6  # input, bicubic, 3 stages, original
    client = mlflow.MlflowClient(stack.mlflow_uri)
    run_id = client.get_model_version(MODEL, versions["good"]).run_id
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval_test_psnr"] == pytest.approx(g["psnr"]) and "eval_test_bicubic_nme" in metrics
    assert {"report.md", "report.html", "cases.png", "metrics.json"} <= {
        os.path.basename(a.path) for a in client.list_artifacts(run_id, "evaluation/test")}


def _broken_copy(stack, manifest: str) -> str:
    """The dataset copied to another prefix with its first test shard truncated (the others intact)."""
    s3 = boto3_client()
    src = manifest.split(f"s3://{stack.bucket}/", 1)[1].rsplit("/manifests/", 1)[0]
    dst = src + "-broken"
    truncated = False
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=src + "/"):
        for o in page.get("Contents", []):
            body = s3.get_object(Bucket=stack.bucket, Key=o["Key"])["Body"].read()
            if "/shards/test-" in o["Key"] and not truncated:
                body, truncated = body[: len(body) // 3], True
            s3.put_object(Bucket=stack.bucket, Key=dst + o["Key"][len(src):], Body=body)
    return f"s3://{stack.bucket}/{dst}/manifests/v0001.json"


@pytest.mark.slow  # about a minute or more on 2 cores: `make test-slow` and CI
def test_the_gate_promotes_better_models_only_and_never_on_a_partial_evaluation(stack, faces, versions, tmp_path):
    client = mlflow.MlflowClient(stack.mlflow_uri)
    champion = lambda: client.get_model_version_by_alias(MODEL, "champion").version  # noqa: E731
    # no champion yet: a complete evaluation promotes
    out = _evaluate(stack, f"models:/{MODEL}/{versions['bad']}", faces, tmp_path / "a", "--promote")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert champion() == versions["bad"] and "no champion yet" in out.stdout
    # a better model, but its test shard is truncated: partial evaluation, refused, champion unchanged
    out = _evaluate(stack, f"models:/{MODEL}/{versions['good']}", _broken_copy(stack, faces), tmp_path / "b",
                    "--promote")
    assert out.returncode == 1 and "partial evaluation" in out.stdout, (out.stdout + out.stderr)[-4000:]
    assert champion() == versions["bad"]
    tags = client.get_model_version(MODEL, versions["good"]).tags
    assert tags["gate.decision"] == "refused" and "could not be read" in tags["gate.reason"]
    # the same model on the complete split beats the champion on PSNR and NME: promoted
    out = _evaluate(stack, f"models:/{MODEL}/{versions['good']}", faces, tmp_path / "c", "--promote")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert champion() == versions["good"], out.stdout[-3000:]
    tags = client.get_model_version(MODEL, versions["good"]).tags
    assert tags["gate.decision"] == "promoted" and tags["gate.champion_version"] == versions["bad"]
    assert float(tags["gate.candidate.psnr"]) > float(tags["gate.champion.psnr"])
    assert float(tags["gate.candidate.nme"]) < float(tags["gate.champion.nme"])
    # a worse model is refused with its numbers
    worse = _register(stack, "bad", tmp_path)
    out = _evaluate(stack, f"models:/{MODEL}/{worse}", faces, tmp_path / "d", "--promote")
    assert out.returncode == 0 and "refused" in out.stdout, (out.stdout + out.stderr)[-4000:]
    assert champion() == versions["good"]
    tags = client.get_model_version(MODEL, worse).tags
    assert tags["gate.decision"] == "refused" and "does not beat champion" in tags["gate.reason"]
    # an evaluation that fails (its dataset is gone) is recorded on the version and changes nothing
    gone = faces.replace("/eval-test/", "/no-such-dataset/")
    out = _evaluate(stack, f"models:/{MODEL}/{versions['bad']}", gone, tmp_path / "e", "--promote")
    assert out.returncode != 0 and "no-such-dataset" in out.stderr, (out.stdout + out.stderr)[-3000:]
    assert champion() == versions["good"]
    assert client.get_model_version(MODEL, versions["bad"]).tags["gate.reason"].startswith("evaluation failed")


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _post(port: int, payload: dict) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_champion_serves_over_http(stack, faces, versions, tmp_path):
    from prouigan_platform.stack import free_port

    client = mlflow.MlflowClient(stack.mlflow_uri)
    client.set_registered_model_alias(MODEL, "champion", versions["good"])
    port = free_port()
    # as the docs tell a user: `prouigan serve` checks the version's files, then becomes `mlflow models serve`
    proc = subprocess.Popen([sys.executable, "-m", "prouigan_platform.cli", "serve", "--model",
                             f"models:/{MODEL}@champion", "--port", str(port)], env={**os.environ, **stack.env()},
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    proc.kill()
                    pytest.fail("the model server did not come up:\n" + proc.stdout.read()[-3000:])
                time.sleep(1)
        faces16 = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps({"inputs": faces16.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            got = np.asarray(json.loads(r.read())["predictions"])
        assert got.shape == (2, 128, 128, 3)
        os.environ.update(stack.env())
        want = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(faces16)
        np.testing.assert_array_equal(got, want)
        # image-native: a PNG file of a 16x16 face in (base64 in MLflow's JSON), a 128x128 PNG out, as from arrays
        png = tmp_path / "face16.png"
        Image.fromarray(faces16[0]).save(png)
        code, body = _post(port, {"inputs": [base64.b64encode(png.read_bytes()).decode()]})
        assert code == 200, body[:2000]
        out = Image.open(io.BytesIO(base64.b64decode(json.loads(body)["predictions"][0])))
        assert out.format == "PNG" and out.size == (128, 128)
        np.testing.assert_array_equal(np.asarray(out.convert("RGB")), want[0])
        # a bad image is a 400 with one line saying what is wrong, not a stack trace
        for bad, why in (("bm90IGFuIGltYWdl", "not a readable PNG or JPEG"),
                         (base64.b64encode(_png((20, 16))).decode(), "20x16 pixels, expected 16x16")):
            code, body = _post(port, {"inputs": [bad]})
            error = json.loads(body)
            assert code == 400 and why in error["message"], body[:2000]
            assert "stack_trace" not in error and "Traceback" not in body
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_restore_pastes_hallucinated_faces_back_into_photos(stack, shared_faces, tmp_path):
    photo = sorted((shared_faces / "helen_train").glob("*.jpg"))[3]
    Image.new("RGB", (200, 150), (90, 120, 200)).save(tmp_path / "no_face.png")
    model = _generator_file("bad", tmp_path / "bad.pt")  # loud, so every pasted pixel visibly changes
    out = run_cli(stack, "restore", str(photo), str(tmp_path / "no_face.png"), "-o", str(tmp_path / "out"),
                  "--model", model, "--thumbnail-only")  # the model's own face, not corrected towards the photo
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "no_face.png: no face found" in out.stderr and "restored 1 of 2" in out.stdout
    assert not (tmp_path / "out" / "no_face.png").exists()
    before = np.asarray(Image.open(photo).convert("RGB")).astype(int)
    after = np.asarray(Image.open(tmp_path / "out" / f"{photo.stem}.png")).astype(int)
    assert after.shape == before.shape
    changed = np.abs(after - before).sum(-1) > 0
    assert 0.05 < changed.mean() < 0.8  # the face region, not the whole photo
    assert np.abs(after - before)[changed].mean() > 20
    # every changed pixel lies around the annotated face: within its landmarks' box grown by half its size
    from tests.conftest import read_pts

    lm = read_pts(photo.with_suffix(".pts"))
    (x0, y0), (x1, y1) = lm.min(0), lm.max(0)
    grow = 0.5 * max(x1 - x0, y1 - y0)
    ys, xs = np.nonzero(changed)
    assert xs.min() >= x0 - grow and xs.max() <= x1 + grow and ys.min() >= y0 - grow and ys.max() <= y1 + grow
    assert abs(xs.mean() - lm[:, 0].mean()) < 0.25 * (x1 - x0) and abs(ys.mean() - lm[:, 1].mean()) < 0.25 * (y1 - y0)


def test_restore_uses_the_thumbnail_the_user_gives(stack, shared_faces, tmp_path):
    photo = sorted((shared_faces / "helen_train").glob("*.jpg"))[3]
    model = _generator_file("good", tmp_path / "good.pt")  # bilinear: the output follows the thumbnail
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    runs = {}
    for name, extra in (("own", []), ("given", ["--thumbnail", str(tmp_path / "red.png")])):
        out = run_cli(stack, "restore", str(photo), "-o", str(tmp_path / name), "--model", model, *extra)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        runs[name] = np.asarray(Image.open(tmp_path / name / f"{photo.stem}.png")).astype(int)
    changed = np.abs(runs["given"] - runs["own"]).sum(-1) > 0
    assert changed.any()
    red = runs["given"][changed]
    assert red[:, 0].mean() > red[:, 1].mean() + 40  # the pasted face is the red thumbnail's
    Image.new("RGB", (20, 16)).save(tmp_path / "wide.png")
    out = run_cli(stack, "restore", str(photo), "-o", str(tmp_path / "x"), "--model", model,
                  "--thumbnail", str(tmp_path / "wide.png"))
    assert out.returncode == 2 and "expected 16x16" in out.stderr


def test_a_registered_versions_files_changed_in_the_artifact_store_are_refused_before_loading(stack, tmp_path):
    """At registration the sha256 of every file of the version is recorded (in the platform's store, and its digest
    as a version tag); a load checks them first: `serving.py` rewritten in the artifact store (the code MLflow would
    run) is refused in one line, nothing of the version loaded."""
    from prouigan_platform import registry, storage
    from prouigan_platform.errors import UserError

    name = "prouigan-files-test"
    number = _register(stack, "good", tmp_path, model=name)
    client = mlflow.MlflowClient(stack.mlflow_uri)
    v = client.get_model_version(name, number)
    rec = json.loads(storage.read_bytes(registry._record_uri(name, number)))
    assert {"MLmodel", "artifacts/generator.pt"} <= set(rec["files"])
    assert any(k.endswith("serving.py") for k in rec["files"])
    assert v.tags[names.FILES_SHA256] == registry._digest(rec["files"])
    registry.resolve_model(f"models:/{name}/{number}")  # as registered: loads
    model_id = v.model_id or v.source.removeprefix("models:/").split("/")[0]  # source: models:/<logged model id>
    loc = mlflow.get_logged_model(model_id).artifact_location  # mlflow-artifacts:/…, served from the bucket
    bucket, prefix = stack.bucket, "mlflow-artifacts/" + loc.split(":", 1)[1].lstrip("/")
    s3 = boto3_client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    code = next(k for k in keys if k.endswith("serving.py"))
    s3.put_object(Bucket=bucket, Key=code, Body=b"import os; os.system('echo pwned')\n")
    with pytest.raises(UserError, match=r"files are not the ones registered: .*serving\.py \(changed\)"):
        registry.resolve_model(f"models:/{name}/{number}")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "in" / "t.png")
    out = run_cli(stack, "hallucinate", "--model", f"models:/{name}/{number}", "--input", str(tmp_path / "in"),
                  "--output", str(tmp_path / "out"))
    assert out.returncode == 1 and "files are not the ones registered" in out.stderr, out.stderr[-2000:]
    out = run_cli(stack, "serve", "--model", f"models:/{name}/{number}", "--port", "1")
    assert out.returncode == 1 and "files are not the ones registered" in out.stderr, out.stderr[-2000:]
