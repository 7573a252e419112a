"""Registering the generator as an MLflow model, the card a person reads in the registry, and resolving a MODEL
argument.

The model is logged as code (``serving.py``, MLflow's models-from-code) with the generator's weights as its one
artifact: it takes 16x16 PNG/JPEG faces (base64 in JSON) or (B, 16, 16, 3) arrays and gives 128x128 PNGs or
arrays.  Registered versions get aliases (``challenger`` after training; ``champion`` is moved by the evaluation
gate; stages are deprecated), a description (``ModelCard``: dataset, recipe, scores beside bicubic's, how to load
and serve it) and tags.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from prouigan.inference import Hallucinator
from prouigan_platform import run_names as names
from prouigan_platform import storage
from prouigan_platform.config import Config
from prouigan_platform.dataset.manifest import Manifest
from prouigan_platform.errors import BadInput, UserError
from prouigan_platform.paths import store_root
from prouigan_platform.tracking import dataset_name as tracking_dataset_name
from prouigan_platform.training import checkpoints

SERVING_CODE = Path(__file__).with_name("serving.py")
MODEL_DESCRIPTION = (
    "Pro-UIGAN: 128x128 faces from occluded 16x16 thumbnails (8x upsampling and inpainting). Each version is "
    "registered by `prouigan train` with alias @challenger; `prouigan evaluate --promote` moves @champion to a "
    "version that beats the champion on held-out faces. Each version's description names its dataset, recipe and "
    "validation scores beside bicubic's.")


def _example_thumbnail() -> str:
    """A grey 16x16 PNG, base64: the input example the registry shows (and MLflow's serving example)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class ModelCard:
    """What a person needs to know about a registered version, from the run that trained it."""

    cfg: Config
    manifest: Manifest
    metrics: dict  # the best checkpoint's report: val_* (model), val_bicubic_*, step
    run_id: str
    checkpoint: str

    def dataset_name(self) -> str:
        return tracking_dataset_name(self.manifest)

    def tags(self) -> dict[str, str]:
        """A few, for the registry's version list; the description has the rest."""
        m = self.metrics
        tags = {"recipe": self.cfg.name, "dataset": self.dataset_name(),
                names.DATASET_DIGEST: self.manifest.digest}
        for k in (names.VAL["psnr"], names.VAL["bicubic_psnr"]):
            if isinstance(m.get(k), (int, float)):
                tags[k] = f"{m[k]:.2f}"
        return tags

    def description(self, name: str, version: str) -> str:
        m, man = self.metrics, self.manifest
        counts = man.counts
        by_source = "; ".join(f"{src}: " + ", ".join(f"{c.get(s, 0):,} {s}" for s in ("train", "val", "test"))
                              for src, c in man.counts_by_source.items())

        def row(label: str, key: str, fmt: str, better: str) -> str:
            have, bic = m.get(f"val_{key}"), m.get(f"val_bicubic_{key}")
            if not isinstance(have, (int, float)):
                return ""
            return (f"| {label} | {have:{fmt}} | " + (f"{bic:{fmt}}" if isinstance(bic, (int, float)) else "–")
                    + f" | {better} |\n")

        uri = f"models:/{name}/{version}"
        summary = f"Pro-UIGAN {self.cfg.model.preset}, recipe {self.cfg.name}, dataset {self.dataset_name()}"
        psnr, bicubic = m.get(names.VAL["psnr"]), m.get(names.VAL["bicubic_psnr"])
        if isinstance(psnr, (int, float)) and isinstance(bicubic, (int, float)):
            summary += f": val PSNR {psnr:.2f} dB (bicubic {bicubic:.2f} dB)"
        lines = [
            summary + ".",
            f"Trained by MLflow run `{self.run_id}`; best checkpoint at step {m.get('step', '?')}: "
            f"`{self.checkpoint}`.",
            f"**Dataset** `{man.uri}` (version {man.version}, digest `{man.digest}`): "
            f"{counts.get('train', 0):,} train / {counts.get('val', 0):,} val / {counts.get('test', 0):,} test faces"
            + (f" ({by_source})" if by_source else "") + ".",
            f"**Validation** during training ({self.cfg.train.val_samples} val faces, never trained on; the same "
            "occluded 16x16 inputs for both):\n\n| metric | this model | bicubic | better |\n|---|---|---|---|\n"
            + row("PSNR (dB)", "psnr", ".2f", "higher")
            + row("occluded-region PSNR (dB)", "psnr_occluded", ".2f", "higher")
            + row("SSIM", "ssim", ".3f", "higher") + row("landmark NME", "nme", ".4f", "lower"),
            f"Held-out scores: `prouigan evaluate --model {uri} --split test` (logged to the run as `eval_test_*`).",
            f'**Load**: `mlflow.pyfunc.load_model("{uri}").predict([png_bytes, ...])`, or `(B, 16, 16, 3)` uint8 '
            f"arrays; `prouigan hallucinate --model {uri} --input DIR --output DIR`.",
            f"**Serve**: `prouigan serve --model {uri}` (checks this version's files against their record, then runs "
            "`mlflow models serve` on 127.0.0.1:5001), then "
            "`curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' "
            "-d '{\"inputs\": [\"<base64 PNG of a 16x16 face>\"]}'` answers "
            "`{\"predictions\": [\"<base64 PNG, 128x128>\"]}` (docs/evaluation.md, \"Serving\").",
        ]
        return "\n\n".join(lines) + "\n"


def generator_only(checkpoint_file: str | Path, out: Path) -> Path:
    """The generator part of a training checkpoint (what serving needs), as a small file; a generator file as is."""
    state = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "step" in state:  # a training checkpoint (else a generator file already)
        state = checkpoints.TrainingState.from_dict(state, str(checkpoint_file)).generator
    torch.save({k: state[k] for k in ("format", "generator_config", "generator")}, out)
    return out


def log_and_register(checkpoint_file: str | Path, run_id: str, name: str, alias: str = "challenger",
                     card: ModelCard | None = None):
    """Log the generator under ``run_id`` as a model (code + weights), register a new version with its card,
    point ``alias`` at it."""
    client = mlflow.MlflowClient()
    # recorded, not shown: MLflow warns that it does not validate an input hinted Any (serving.as_faces does)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True):
        gen = generator_only(checkpoint_file, Path(tmp) / "generator.pt")
        # log_model links the model to the fluent API's active run, whose context would end the training's run
        # FINISHED on the way out: the run is put back to RUNNING at once, and its pipeline's run_scope ends it
        # with the pipeline's outcome
        status = client.get_run(run_id).info.status
        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(name="model", python_model=str(SERVING_CODE),
                                               artifacts={"generator": str(gen)},
                                               input_example=[_example_thumbnail()])
        finally:
            if status == "RUNNING":
                client.update_run(run_id, status="RUNNING")
    try:
        client.create_registered_model(name, description=MODEL_DESCRIPTION)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    with tempfile.TemporaryDirectory() as tmp:  # what was stored, as the store holds it
        files = files_sha256(Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=tmp)))
    version = client.create_model_version(name, info.model_uri, run_id=run_id, model_id=info.model_id,
                                          tags={**(card.tags() if card else {}), names.FILES_SHA256: _digest(files)})
    storage.create_exclusive(_record_uri(name, version.version), json.dumps(
        {"name": name, "version": version.version, "source": info.model_uri, "files": files}, indent=1).encode())
    if card is not None:
        client.update_model_version(name, version.version, description=card.description(name, version.version))
    client.set_registered_model_alias(name, alias, version.version)
    return version




# written by the MLflow client into what it downloads through a models:/NAME/VERSION URI (the name and version it
# was asked for), not a file of the stored version
CLIENT_FILES = {"registered_model_meta"}


def files_sha256(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (a model version's files as MLflow stores them)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and str(p.relative_to(root)) not in CLIENT_FILES}


def _digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _record_uri(name: str, version: str | int) -> str:
    """Where the platform keeps a version's file record: its own store (private), not the MLflow artifact store."""
    return storage.join(store_root(), "registry", name, f"v{int(version):05d}.json")


def verified_files(model: str, version, dst: Path) -> Path:
    """A registered version's files downloaded to ``dst`` and checked against the sha256 recorded when it was
    registered, before anything in them is loaded; a UserError naming the first file that changed (or was added or
    removed).  A version registered before records existed is loaded with a warning."""
    root = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}", dst_path=str(dst)))
    uri = _record_uri(version.name, version.version)
    if not storage.exists(uri):
        print(f"[prouigan] WARNING: {model} (v{version.version}) has no file record in {uri} (registered before "
              "records existed): its files cannot be checked", file=sys.stderr)
        return root
    want = json.loads(storage.read_bytes(uri))["files"]
    have = files_sha256(root)
    changed = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    tag = (version.tags or {}).get(names.FILES_SHA256)
    if changed or (tag is not None and tag != _digest(want)):
        what = ", ".join(f"{k} ({'added' if k not in want else 'removed' if k not in have else 'changed'})"
                         for k in changed[:3]) or f"its {names.FILES_SHA256} tag"
        raise UserError(f"{model} (v{version.version}): its files are not the ones registered: {what}; refused "
                        "(nothing of it was loaded). Register it again from its checkpoint")
    return root


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when torch sees a GPU, else cpu; ``cuda`` without one is a UserError, not a crash later."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: torch sees no CUDA device on this machine; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise BadInput(f"--device {device}: expected cpu, cuda, cuda:N or auto")
    return device


def resolve_model(model: str, device: str = "cpu") -> Hallucinator:
    """A checkpoint path (local), a ``runs:/`` or ``models:/name@alias`` URI -> Hallucinator.  A registered
    version's files are checked against their record first (``verified_files``).  A model that does not exist or
    is not a generator checkpoint is a UserError naming it."""
    with tempfile.TemporaryDirectory(prefix="prouigan-model-") as tmp:
        if model.startswith(("runs:/", "models:/")):
            try:
                if model.startswith("models:/"):
                    version = registered_version(model)  # a missing name, version or alias: one clear line
                    p = verified_files(model, version, Path(tmp)) / "artifacts" / "generator.pt"
                else:
                    p = Path(mlflow.artifacts.download_artifacts(
                        artifact_uri=model.rstrip("/") + "/artifacts/generator.pt", dst_path=tmp))
            except MlflowException as e:
                raise UserError(f"model {model} not found in the registry: {e.message.splitlines()[0]}") from None
        else:
            p = Path(model)
            if p.is_dir():
                p = p / "state.pt"
            if not p.is_file():
                raise UserError(f"model not found: {model} (a checkpoint file or folder, runs:/... or models:/...)")
        try:
            return Hallucinator.load(p, device)
        except Exception as e:  # a text file, a foreign pickle, a truncated download
            raise UserError(f"{model} is not a Pro-UIGAN generator checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def registered_version(model: str):
    """The registry version a ``models:/name@alias`` or ``models:/name/version`` URI names (else None)."""
    if not model.startswith("models:/"):
        return None
    ref = model[len("models:/"):].rstrip("/")
    client = mlflow.MlflowClient()
    name, _, version = ref.partition("/")
    if "@" not in ref and not version.isdigit():
        raise BadInput(f"expected models:/NAME@ALIAS or models:/NAME/VERSION, got {model}")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise UserError(f"{model} is not in the registry ({e.message.splitlines()[0][:200]})") from None
        raise


def alias_version(name: str, alias: str):
    """The version ``alias`` points at, or None when the alias (or the model) does not exist."""
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
