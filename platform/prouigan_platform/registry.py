"""The generator as an MLflow pyfunc model, its registration, and resolving a MODEL argument.

Model input: uint8 array (B, 16, 16, 3); output: uint8 array (B, 128, 128, 3).  Registered versions get
aliases (``challenger`` after training; ``champion`` is moved by the evaluation gate) — stages are deprecated.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from prouigan.inference import Hallucinator
from prouigan_platform.errors import UserError

SIGNATURE = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 16, 16, 3))]),
                           outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 128, 128, 3))]))


class ProUIGANModel(mlflow.pyfunc.PythonModel):
    # the input is a uint8 array checked by ``predict`` itself (and by SIGNATURE): no type-hint wrapping
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.hallucinator = Hallucinator.load(context.artifacts["generator"], device=device)

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, dict) and len(model_input) == 1:
            model_input = next(iter(model_input.values()))
        arr = np.asarray(model_input)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (16, 16, 3):
            raise ValueError(f"expected uint8 (B, 16, 16, 3) faces, got {arr.dtype} {arr.shape}")
        return self.hallucinator.to_uint8(arr)


def generator_only(checkpoint_file: str | Path, out: Path) -> Path:
    """The generator part of a training checkpoint (what serving needs), as a small file."""
    state = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    torch.save({k: state[k] for k in ("format", "generator_config", "generator")}, out)
    return out


def log_and_register(checkpoint_file: str | Path, run_id: str, name: str, alias: str = "challenger"):
    """Log the generator under ``run_id`` as a pyfunc model, register a new version, point ``alias`` at it."""
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        gen = generator_only(checkpoint_file, Path(tmp) / "generator.pt")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=ProUIGANModel(),
                                           artifacts={"generator": str(gen)}, signature=SIGNATURE,
                                           input_example=np.zeros((1, 16, 16, 3), np.uint8))
    version = mlflow.register_model(info.model_uri, name)
    client.set_registered_model_alias(name, alias, version.version)
    return version


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when torch sees a GPU, else cpu; ``cuda`` without one is a UserError, not a crash later."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch sees no CUDA device on this machine; use --device cpu", code=2)
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device {device}: expected cpu, cuda, cuda:N or auto", code=2)
    return device


def resolve_model(model: str, device: str = "cpu") -> Hallucinator:
    """A checkpoint path (local), a ``runs:/`` or ``models:/name@alias`` URI -> Hallucinator.
    A model that does not exist or is not a generator checkpoint is a UserError naming it."""
    if model.startswith(("runs:/", "models:/")):
        try:
            if model.startswith("models:/"):
                registered_version(model)  # a missing name, version or alias: one clear line
            path = mlflow.artifacts.download_artifacts(artifact_uri=model.rstrip("/") + "/artifacts/generator.pt")
        except MlflowException as e:
            raise UserError(f"model {model} not found in the registry: {e.message.splitlines()[0]}") from None
        p = Path(path)
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
        raise UserError(f"expected models:/NAME@ALIAS or models:/NAME/VERSION, got {model}", code=2)
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
