"""The one typed configuration that travels from the CLI to every Ray worker.

Loading is a pure function: YAML file(s) + ``key=value`` overrides -> validated ``Config``.
It reads no argv, starts nothing and seeds nothing.  A YAML file may name ``extends: other.yaml``
(relative to itself) to start from another file.  Every error is a ``ConfigError`` whose message is
one line naming the bad key or value; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.resources
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prouigan.presets import PRESETS, generator_config
from prouigan.vocabulary import GATE_METRICS, OCCLUSION_KINDS, SEARCH_METRICS
from prouigan_platform.paths import expand, redact


def config_dir() -> Path:
    """The recipes shipped with the package (``pipelines/configs``, package data): found by import, so a plain
    ``pip install`` works from any folder, as an editable one does from the repository."""
    return Path(str(importlib.resources.files("pipelines").joinpath("configs")))


# the vocabularies, defined once elsewhere (prouigan.vocabulary, prouigan.presets), as the config's types
OcclusionKind = Literal[OCCLUSION_KINDS]
PresetName = Literal[tuple(PRESETS)]
SearchMetric = Literal[SEARCH_METRICS]

class ConfigError(ValueError):
    """A configuration problem, described in one line."""


def _expand(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return expand(value)
    except KeyError as e:
        raise ValueError(e.args[0]) from None


# a path or URI; ``${PROUIGAN_STORE}`` (the platform's store: local disk, or s3:// when configured) and ``${VAR}``
# are expanded when the config is loaded, so every Ray worker gets the same absolute location
PathStr = Annotated[str, AfterValidator(_expand)]
STORE = "${PROUIGAN_STORE}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class SourceConfig(_Section):
    kind: Literal["300w", "celeba", "photos", "synthetic"] = "300w"
    path: PathStr = "../shared/faces"  # folder (300w/celeba/photos); ignored for synthetic
    count: int = Field(default=64, ge=1)  # synthetic only: how many faces to draw
    name: str | None = None  # prefix of sample keys; defaults to the folder name
    limit: int | None = Field(default=None, ge=1)  # only the first N inputs in file order (demos, tests, benches)
    groups: PathStr | None = None  # photos: CSV sidecar `file,group` naming who is in each photo (default groups.csv)
    val_fraction: float | None = Field(default=None, ge=0.0, lt=1.0)  # this source's own split sizes
    test_fraction: float | None = Field(default=None, ge=0.0, lt=1.0)  # (default: data.val/test_fraction)


class OcclusionConfig(_Section):
    kinds: list[OcclusionKind] = list(OCCLUSION_KINDS)
    coverage: tuple[float, float] = (0.1, 0.35)  # fraction of the 128x128 face hidden
    probability: float = Field(default=1.0, ge=0.0, le=1.0)  # chance a training face is occluded at all
    # training faces occluded and degraded a batch at a time on the training device (prouigan.batched_occlusion)
    # instead of one by one in the reader processes; val and test faces keep their seeded per-sample occlusions
    on_device: bool = False

    @field_validator("coverage")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] <= v[1] <= 1.0:
            raise ValueError("must be [low, high] with 0 <= low <= high <= 1")
        return v


class DegradationConfig(_Section):
    noise_std: float = Field(default=0.0, ge=0.0)  # gaussian noise on the 16x16 input, in [0,1] units
    jpeg_quality: int | None = Field(default=None, ge=1, le=100)  # JPEG round trip of the 16x16 input


class AlignJitterConfig(_Section):
    """Training faces seen through a misplaced alignment square, as a face detector places one on a photo (restore):
    per face, a shift, a scale and a turn of the square drawn from normal distributions (cut at 3 sigma).  The
    defaults of a recipe come from the detector's measured error (docs/restoring.md)."""
    shift_mean: tuple[float, float] = (0.0, 0.0)  # x, y, in pixels of the 16x16 thumbnail
    shift_std: tuple[float, float] = (0.0, 0.0)
    scale_mean: float = Field(default=1.0, gt=0.5, lt=2.0)  # the square's side over the true one
    scale_std: float = Field(default=0.0, ge=0.0, le=0.5)
    rotation_std: float = Field(default=0.0, ge=0.0, le=45.0)  # degrees
    probability: float = Field(default=1.0, ge=0.0, le=1.0)  # the share of training faces misplaced; the rest exact

    @field_validator("shift_std")
    @classmethod
    def _nonnegative(cls, v: tuple[float, float]) -> tuple[float, float]:
        if min(v) < 0:
            raise ValueError("standard deviations must be >= 0")
        return v

    def draw(self, rng) -> tuple[tuple[float, float], float, float] | None:
        """(shift, scale, rotation) for one face; None: this face keeps its exact alignment."""
        z = np.clip(rng.standard_normal(4), -3, 3)
        if rng.random() >= self.probability:
            return None
        shift = (self.shift_mean[0] + self.shift_std[0] * z[0], self.shift_mean[1] + self.shift_std[1] * z[1])
        return shift, float(np.clip(self.scale_mean + self.scale_std * z[2], 0.5, 2.0)), \
            float(self.rotation_std * z[3])


class DataConfig(_Section):
    sources: list[SourceConfig] = [SourceConfig()]
    output: PathStr = Field(default=f"{STORE}/datasets/faces", validate_default=True)  # dataset root: path or s3://
    image_size: Literal[128] = 128
    min_native_px: int = Field(default=128, ge=1)  # faces smaller than this natively are quarantined
    shard_max_samples: int = Field(default=256, ge=1)
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    shuffle_buffer: int = Field(default=256, ge=0)
    # DataLoader processes per training worker that decode, occlude and degrade faces (0: in the worker itself)
    reader_processes: int = Field(default=1, ge=0)
    # training mix by source name (as the shard summary prints them): {} reads every source in proportion to its
    # size; otherwise every source of the dataset must be named, and a weight of 0 leaves that source out
    source_weights: dict[str, float] = {}
    # the end of a run on another mix (the target domain, say): the last `final_fraction` of the steps or of the
    # time budget reads `final_source_weights` (same rules as source_weights); 0 = off
    final_source_weights: dict[str, float] = {}
    final_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    occlusion: OcclusionConfig = OcclusionConfig()
    degradation: DegradationConfig = DegradationConfig()
    heatmap_sigma: float = Field(default=1.5, gt=0.0)  # Gaussian sigma of landmark heatmaps, in 32x32 pixels
    # training faces only: the alignment a detector gives (restore) instead of the annotation's exact one; null: off
    align_jitter: AlignJitterConfig | None = None

    @field_validator("source_weights", "final_source_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in v.values()):
            raise ValueError("weights must be >= 0")
        if v and not any(w > 0 for w in v.values()):
            raise ValueError("at least one source needs a weight above 0")
        return v

    @model_validator(mode="after")
    def _final_mix(self):
        if self.final_fraction > 0 and not self.final_source_weights:
            raise ValueError("final_fraction > 0 needs final_source_weights (the mix the run ends on)")
        if self.occlusion.on_device and self.degradation.jpeg_quality is not None:
            raise ValueError("occlusion.on_device has no JPEG round trip: drop degradation.jpeg_quality or on_device")
        return self

    def mix_at(self, progress: float) -> dict[str, float]:
        """The source weights at ``progress`` (0..1) of a run."""
        if self.final_fraction > 0 and progress >= 1.0 - self.final_fraction:
            return self.final_source_weights
        return self.source_weights


class ModelConfig(_Section):
    preset: PresetName = "cpu-small"
    overrides: dict[str, int | float | list[int]] = {}  # fields of prouigan.GeneratorConfig to change


class LossConfig(_Section):
    pixel: float = Field(default=1.0, ge=0.0)  # per-stage MSE at each stage's resolution
    pixel_l1: float = Field(default=0.0, ge=0.0)  # per-stage L1 (the plain CNN baseline's only loss)
    heatmap: float = Field(default=0.1, ge=0.0)  # per-stage prior (landmark heatmap) MSE
    adversarial: float = Field(default=1e-3, ge=0.0)  # LSGAN generator term, last stage
    tv: float = Field(default=1e-5, ge=0.0)  # total variation of every stage output
    perceptual: float = Field(default=0.0, ge=0.0)  # VGG feature loss; needs vgg_weights
    style: float = Field(default=0.0, ge=0.0)  # VGG Gram loss; needs vgg_weights
    vgg_weights: PathStr | None = None  # local path of torchvision vgg19 state_dict; nothing is downloaded


class TrainConfig(_Section):
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # workers over nodes
    batch_size: int = Field(default=16, ge=1)  # per worker
    steps: int = Field(default=2000, ge=1)
    max_minutes: float | None = Field(default=None, gt=0.0)  # wall-time budget of the training loop; None: steps
    lr_g: float = Field(default=2e-4, gt=0.0)
    lr_d: float = Field(default=1e-4, gt=0.0)
    lr_schedule: Literal["constant", "cosine", "warmup-cosine"] = "constant"  # cosine: G's lr decays to 2% over the
    # run; warmup-cosine (one cycle): up from 2% over the first lr_warmup of the run, then the same cosine
    lr_warmup: float = Field(default=0.05, gt=0.0, lt=1.0)
    # an exponential moving average of G's weights (decay per step; warmed up as (1 + step) / (10 + step) early on):
    # validated, checkpointed as the generator, registered and served instead of the raw weights.  None: off
    ema_decay: float | None = Field(default=None, gt=0.0, lt=1.0)
    adversarial_start: float = Field(default=0.0, ge=0.0, lt=1.0)  # fraction of the run before the Ds join
    bf16: bool = True  # bf16 autocast of G and both Ds where the device has bf16 (GPU, or a CPU with bf16 instructions)
    # torch.compile of G and both Ds ("reduce-overhead" adds CUDA graphs); a compile failure warns and runs eager
    compile: Literal["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "off"
    channels_last: bool = False  # NHWC weights and images (tensor-core convolutions on GPU)
    sync_every: int = Field(default=10, ge=1)  # steps between the workers' agreements on the wall-time budget
    val_every: int = Field(default=250, ge=1)
    val_samples: int = Field(default=64, ge=1)
    checkpoint_every: int = Field(default=250, ge=1)
    keep_best: int = Field(default=2, ge=1)
    max_failures: int = Field(default=2, ge=0)
    storage: PathStr = Field(default=f"{STORE}/checkpoints", validate_default=True)  # checkpoints: path or s3://
    dataset: PathStr | None = None  # manifest URI; defaults to the latest version under data.output
    # register a model even when some train shards could not be read (damaged, missing): it was trained on less than
    # the dataset version it names.  Off: such a run ends FAILED, naming the shards, and registers nothing
    allow_partial_data: bool = False


class TrackingConfig(_Section):
    experiment: str = "prouigan"
    registered_model: str = "prouigan"


class SearchRange(_Section):
    low: float = Field(gt=0.0)
    high: float = Field(gt=0.0)
    log: bool = True  # log-uniform (the default for loss weights and learning rates)

    @field_validator("high")
    @classmethod
    def _ordered(cls, v: float, info) -> float:
        if "low" in info.data and v <= info.data["low"]:
            raise ValueError(f"high ({v}) must be above low ({info.data['low']})")
        return v


SEARCHABLE = ("loss.pixel", "loss.pixel_l1", "loss.heatmap", "loss.adversarial", "loss.tv", "loss.perceptual",
              "loss.style", "train.lr_g", "train.lr_d")


class TuneConfig(_Section):
    trials: int = Field(default=8, ge=1)  # trials one `prouigan tune` adds to the study
    metric: SearchMetric = "val_psnr"  # maximised
    space: dict[str, SearchRange] = {
        "loss.heatmap": SearchRange(low=0.01, high=1.0),
        "loss.adversarial": SearchRange(low=1e-5, high=1e-2),
        "loss.tv": SearchRange(low=1e-7, high=1e-3),
    }
    start_with_defaults: bool = True  # a new study's first trial runs the config's own values (the baseline)
    grace_period: int = Field(default=1, ge=1)  # validation reports before ASHA may stop a trial
    reduction_factor: int = Field(default=2, ge=2)
    max_concurrent_trials: int | None = Field(default=None, ge=1)  # default: what the cluster's CPUs/GPUs fit
    study_storage: PathStr | None = None  # Optuna RDB URL; default sqlite in the platform state folder

    @field_validator("space")
    @classmethod
    def _searchable(cls, v: dict) -> dict:
        bad = sorted(set(v) - set(SEARCHABLE))
        if bad:
            raise ValueError(f"cannot search {bad}; searchable keys: {', '.join(SEARCHABLE)}")
        if not v:
            raise ValueError("the search space is empty")
        return v




class EvalConfig(_Section):
    split: Literal["train", "val", "test"] = "test"
    gate_metrics: list[str] = ["psnr", "nme"]  # the candidate must beat the champion on every one of these
    dlib: bool = True  # NME and identity metrics (the ``eval`` extra); off: skipped and never gated on
    # parsing F1 and expression accuracy by the stored judges (`prouigan judges train`); none stored: skipped
    judges: bool = True
    batch_size: int = Field(default=64, ge=1)
    cases: int = Field(default=4, ge=1)  # best and worst faces in the report picture
    limit: int | None = Field(default=None, ge=1)  # evaluate only the first N faces (a partial evaluation)
    min_faces: int = Field(default=100, ge=1)  # the gate refuses to decide on fewer faces than this
    source: str | None = None  # score only this source's faces of the split (a mixed version's per-source split)

    @field_validator("gate_metrics")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = sorted(set(v) - set(GATE_METRICS))
        if bad or not v:
            raise ValueError(f"unknown gate metric(s) {bad}; choose from {', '.join(GATE_METRICS)}")
        return v


RUN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class Config(_Section):
    # run / experiment-version name; resume uses it, and it becomes a folder name: letters, digits, . _ -
    name: str = "prouigan"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig = TuneConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not re.match(RUN_NAME, v):
            raise ValueError("a run name is 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit "
                             "(it becomes a folder and an MLflow tag)")
        return v

    def to_flat_dict(self, redacted: bool = False) -> dict[str, Any]:
        """``{"train.steps": 2000, ...}``: what MLflow logs as params (``redacted``: credentials in URLs masked)."""
        flat = _flatten(self.model_dump(mode="json"))
        return {k: redact(v) if redacted and isinstance(v, str) else v for k, v in flat.items()}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self, redacted: bool = False) -> str:
        """The resolved config as YAML (``redacted``: credentials in URLs masked, for what is logged anywhere)."""
        data = self.model_dump(mode="json")
        return yaml.safe_dump(_redact_tree(data) if redacted else data, sort_keys=False)


def _redact_tree(v):
    if isinstance(v, dict):
        return {k: _redact_tree(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_redact_tree(x) for x in v]
    return redact(v) if isinstance(v, str) else v


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, else a name in pipelines/configs (``cpu-small`` -> pipelines/configs/cpu-small.yaml)."""
    p = Path(path)
    if p.is_file():
        return p
    configs = config_dir()
    for candidate in (configs / p, configs / f"{p}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config 'extends' loop: {' -> '.join(str(p) for p in (*seen, path))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a config is YAML)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("extends", None)
    if base is None:
        return data
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: extends a file that does not exist: {base}")
    return _deep_merge(_read_yaml(base_path, (*seen, path)), data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _model_for(path: list[str]) -> type[BaseModel] | None:
    """The section model at a dotted path, or None where the path leaves the typed tree."""
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _unknown_key_message(dotted: str) -> str:
    parts = dotted.split(".")
    model = _model_for(parts[:-1])
    hint = ""
    if model is not None:
        close = difflib.get_close_matches(parts[-1], list(model.model_fields), n=1)
        hint = f" (did you mean '{'.'.join([*parts[:-1], close[0]])}'?)" if close else \
            f" (known keys here: {', '.join(model.model_fields)})"
    return f"unknown config key '{dotted}'{hint}"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML scalars/lists (``x=[1,2]``, ``y=null``)."""
    data = _deep_merge({}, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        parts = key.split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[parts[-1]] = value
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    dotted = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        msg = _unknown_key_message(dotted)
    else:
        msg = f"config key '{dotted}': {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})"
    more = len(err.errors()) - 1
    return f"{source}: {msg}" + (f" [+{more} more]" if more else "")


def validate(data: dict[str, Any], source: str = "config") -> Config:
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    _check_model_overrides(cfg)
    return cfg


def _check_model_overrides(cfg: Config) -> None:
    try:
        generator_config(cfg.model.preset, cfg.model.overrides)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"config key 'model.overrides': {e.args[0] if e.args else e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, trusted: bool = True) -> Config:
    """Read a YAML config (or the defaults), apply overrides, validate.  Raises ConfigError.

    ``trusted=False``: a config this platform wrote and reads back from somewhere others can write (a search's
    best.yaml in MLflow): it is taken as the resolved config it should be, and a ``${VAR}`` or an ``extends`` in it
    is refused: expanded, ``${AWS_SECRET_ACCESS_KEY}`` in a path would carry the secret into the run's params and
    wherever the path points.  The user's own overrides are expanded as ever."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        resolved = resolve_config_path(path)
        data = _read_yaml(resolved) if trusted else _read_untrusted(resolved)
        source = str(resolved)
    data = apply_overrides(data, list(overrides or []))
    return validate(data, source)


def _read_untrusted(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (UnicodeDecodeError, yaml.YAMLError, OSError) as e:
        raise ConfigError(f"{path}: not a readable YAML config ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a YAML mapping")
    if "extends" in data:
        raise ConfigError(f"{path}: 'extends' in a config read back from MLflow is refused (it would read a file "
                          "of this machine)")
    for key, value in _flatten(data).items():
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(t, str) and "${" in t for t in texts):
            raise ConfigError(f"{path}: '{key}' names a variable ({value!r}); a config read back from MLflow is "
                              "never expanded (it could carry a secret of this environment into the run)")
    return data


def config_from_args(args) -> Config:
    """The config a command's ``--config`` and ``KEY=VALUE`` arguments name."""
    return load_config(args.config, args.overrides)
