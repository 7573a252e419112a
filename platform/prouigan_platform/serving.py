"""The registered model's code: MLflow logs this file itself (models-from-code), never a pickle of an object, so
loading or serving a model runs this code and reads the generator's weights (``generator.pt``, loaded with
``torch.load(weights_only=True)``); nothing in the artifact store is unpickled.

What it takes (``mlflow models serve``: ``{"inputs": [...]}``; in Python: ``model.predict(...)``):

- images: PNG or JPEG bytes of 16x16 faces, base64 in JSON (``{"inputs": ["iVBORw0KGgo..."]}``), or ``bytes`` in
  Python, or a DataFrame with an ``image`` column (``dataframe_records``) -> a list of 128x128 PNGs (bytes; base64
  in JSON);
- arrays: integers 0-255 shaped (B, 16, 16, 3) -> a uint8 array (B, 128, 128, 3).

A bad input is an MLflow error with one line (HTTP 400), never a stack trace; more than ``MAX_FACES`` faces in one
request is one.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image, UnidentifiedImageError

SIZE = 16
MAX_FACES = 1024  # faces in one request: more is refused before anything is decoded (each one costs ~1 MB of work)


def bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_image(item, i: int) -> np.ndarray:
    """One PNG/JPEG (bytes, or base64 text) -> (16, 16, 3) uint8."""
    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=False)
        except (binascii.Error, ValueError) as e:
            raise bad_input(f"image {i}: not base64 ({e})") from None
    if not isinstance(item, (bytes, bytearray)):
        raise bad_input(f"image {i}: expected PNG/JPEG bytes (base64 in JSON), got {type(item).__name__}")
    try:
        with Image.open(io.BytesIO(item)) as im:
            if im.format not in ("PNG", "JPEG"):
                raise bad_input(f"image {i}: {im.format} is not PNG or JPEG")
            if im.size != (SIZE, SIZE):
                raise bad_input(f"image {i}: {im.size[0]}x{im.size[1]} pixels, expected {SIZE}x{SIZE}")
            return np.asarray(im.convert("RGB"), np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise bad_input(f"image {i}: not a readable PNG or JPEG ({type(e).__name__})") from None


def encode_png(face: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(face).save(buf, format="PNG")
    return buf.getvalue()


def as_faces(model_input) -> tuple[np.ndarray, bool]:
    """-> ((B, 16, 16, 3) uint8, whether the input was images)."""
    if hasattr(model_input, "columns"):  # a DataFrame (dataframe_records / dataframe_split)
        if "image" not in model_input.columns:
            raise bad_input(f"a table input needs an 'image' column, got {list(model_input.columns)}")
        model_input = list(model_input["image"])
    if isinstance(model_input, (str, bytes, bytearray)):
        model_input = [model_input]
    n = len(model_input) if hasattr(model_input, "__len__") else 0
    if n > MAX_FACES:
        raise bad_input(f"{n} faces in one request; the limit is {MAX_FACES}: send them in several requests")
    if isinstance(model_input, (list, tuple)) and model_input and all(
            isinstance(x, (str, bytes, bytearray)) for x in model_input):
        return np.stack([decode_image(x, i) for i, x in enumerate(model_input)]), True
    try:
        arr = np.asarray(model_input)
    except ValueError as e:  # ragged nested lists
        raise bad_input(f"expected (B, {SIZE}, {SIZE}, 3) integers or a list of PNG/JPEG images ({e})") from None
    if arr.ndim != 4 or arr.shape[1:] != (SIZE, SIZE, 3) or arr.dtype.kind not in "ui":
        raise bad_input(f"expected (B, {SIZE}, {SIZE}, 3) integers 0-255 or a list of PNG/JPEG images, got "
                        f"{arr.dtype} {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise bad_input(f"pixel values must lie in 0-255, got {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8), False


class ProUIGANModel(mlflow.pyfunc.PythonModel):
    # the type hints give the signature (any list: images or arrays) and let MLflow pass the input through as sent;
    # ``as_faces`` checks it
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch

        from prouigan.inference import Hallucinator

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.hallucinator = Hallucinator.load(context.artifacts["generator"], device=device)

    def predict(self, context, model_input: list[Any]) -> list[Any]:
        faces, images = as_faces(model_input)
        out = self.hallucinator.to_uint8(faces)
        return [encode_png(f) for f in out] if images else out


mlflow.models.set_model(ProUIGANModel())
