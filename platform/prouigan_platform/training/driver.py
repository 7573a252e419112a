"""The training driver: resolve the run, start (or resume) the ``TorchTrainer``, register the best checkpoint.

``train_and_register`` is what `prouigan train`, `prouigan retrain` and the cluster jobs call; ``fit`` is the
bare trainer (`prouigan tune` runs it inside each trial).  Ray must be initialised by the caller.
Re-running a name resumes from its latest checkpoint; the architecture always comes from that checkpoint, and a
config whose model differs is refused before any worker starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow
import ray
import ray.train
from ray.train.torch import TorchTrainer

from prouigan.presets import generator_config
from prouigan_platform import run_names as names
from prouigan_platform import storage, tracking
from prouigan_platform.config import Config, ConfigError, load_config
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.dataset.reader import mix_weights
from prouigan_platform.errors import UserError
from prouigan_platform.registry import ModelCard, log_and_register
from prouigan_platform.runtime import verbose
from prouigan_platform.training import checkpoints
from prouigan_platform.training.checkpoints import CHECKPOINT_FILE
from prouigan_platform.training.process_group import NodeAddressTorchConfig
from prouigan_platform.training.worker import train_loop_per_worker


def storage_args(uri: str) -> dict:
    """RunConfig storage for a local path or s3:// (pyarrow filesystem with the configured endpoint)."""
    if storage.is_s3(uri):
        return {"storage_path": uri[len("s3://"):].rstrip("/"), "storage_filesystem": storage.s3_filesystem()}
    return {"storage_path": str(Path(uri).expanduser().resolve())}


def latest_checkpoint(cfg: Config) -> str | None:
    """The newest complete ``step_*`` checkpoint folder of this run name, or None; newer torn ones are reported."""
    uri, skipped = checkpoints.newest_complete(storage.join(cfg.train.storage, cfg.name))
    for torn_uri, why in skipped:
        print(f"[train] skipping the torn checkpoint {torn_uri}: {why}", file=sys.stderr)
    return uri


def check_resume(cfg: Config) -> str | None:
    """Refuse (ConfigError, one line) a config whose model differs from the checkpoint the run would resume;
    -> the checkpoint folder, or None for a new run."""
    uri = latest_checkpoint(cfg)
    if uri is None:
        return None
    have = checkpoints.load(uri).generator_config
    want = generator_config(cfg.model.preset, cfg.model.overrides).to_dict()
    diff = {k: (have.get(k), v) for k, v in want.items() if _norm(have.get(k)) != _norm(v)}
    if diff:
        what = ", ".join(f"{k}: checkpoint {a}, config {b}" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(f"config key 'model': run '{cfg.name}' resumes from {uri}, whose generator differs ({what});"
                          " keep the checkpoint's model or choose another name=")
    return uri


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def check_mix(cfg: Config, manifest: mf.Manifest) -> None:
    """A source mix that does not fit the dataset: one config error here, not a traceback from every worker."""
    for key, weights in (("source_weights", cfg.data.source_weights),
                         ("final_source_weights", cfg.data.final_source_weights)):
        try:
            mix_weights(manifest, "train", weights)
        except ValueError as e:
            raise ConfigError(f"config key 'data.{key}': {e}") from None


def fit(cfg: Config, manifest_uri: str, run_id: str | None, callbacks: list | None = None, init: dict | None = None,
        validation_logged: bool = False):
    """Build and run the TorchTrainer for a resolved config; -> ray.train.Result.
    ``callbacks``: Ray Train callbacks (`prouigan tune` passes Tune's report callback, and one that logs the
    validation scores, so ``validation_logged`` keeps rank 0 from logging them again).
    ``init``: {"from": MODEL, "generator": state dict} to fine-tune from (used when there is no checkpoint)."""
    # a worker's print goes straight to its stdout, which Ray streams to the driver once; Ray Train's print patch
    # would route it through its logger as well (every line twice).  Ray Train hands this variable from the driver
    # to its controller and workers, also in a `ray job submit` driver whose runtime env we cannot extend.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "manifest_uri": manifest_uri,
                           "mlflow_run_id": run_id, "init_generator": (init or {}).get("generator"),
                           "init_from": (init or {}).get("from"), "validation_logged": validation_logged},
        torch_config=NodeAddressTorchConfig(),  # torch's store and gloo on the node's address, not on every interface
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker},
                                               placement_strategy=cfg.train.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.name, **storage_args(cfg.train.storage), callbacks=callbacks or None,
            # Ray Train's own lines (resources, process groups, devices) only with --verbose; ours are prints
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_best,
                                                         checkpoint_score_attribute=names.VAL["psnr"],
                                                         checkpoint_score_order="max")),
    )
    return trainer.fit()


def tracking_off() -> bool:
    return not tracking.enabled()


def train_and_register(cfg: Config, manifest: mf.Manifest, init: dict | None = None, tags: dict | None = None) -> dict:
    """Train (or resume) ``cfg.name`` on a dataset version and register its best checkpoint as a new version of
    ``tracking.registered_model`` with alias ``challenger``.  Ray must be initialised.
    -> {"run_id", "checkpoint", "version" (models:/NAME/N, None without tracking or checkpoint)}.
    The MLflow run of the name (re-opened on resume) ends FINISHED, FAILED with the error, or KILLED when the
    driver is stopped; a stopped driver also says how to resume."""
    check_mix(cfg, manifest)
    resume_from = check_resume(cfg)
    if resume_from:
        print(f"[train] run '{cfg.name}' resumes from {resume_from}")
    run_id = None
    if tracking_off():
        print("[train] MLFLOW_TRACKING_URI not set: training without tracking", file=sys.stderr)
    else:
        run_id = tracking.open_run(cfg, "train", cfg.name, manifest=manifest,
                                   find_tag=(names.TRAIN_NAME, cfg.name), tags=tags)
    try:
        with tracking.run_scope(run_id):
            result = fit(cfg, manifest.uri, run_id, init=init)
            if result.error is not None:
                raise result.error
            return _register(cfg, manifest, result, run_id)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (errors.Stopped)
        print(f"[train] stopped; run the same command again to resume '{cfg.name}' from its latest checkpoint under "
              f"{storage.join(cfg.train.storage, cfg.name)}", file=sys.stderr)
        raise


def check_data(cfg: Config, manifest: mf.Manifest, result) -> None:
    """Refuse (UserError, one line) to register a model trained on less than its dataset version, unless
    ``train.allow_partial_data``: every train shard the workers could not read is named."""
    last = result.checkpoint
    if last is None:
        return
    with last.as_directory() as d:
        skipped = checkpoints.load(str(d)).shards_skipped
    if skipped and not cfg.train.allow_partial_data:
        raise UserError(f"trained on less than dataset {manifest.uri}: {len(skipped)} train shard(s) could not be "
                        f"read ({', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}); nothing registered. "
                        "Repair the dataset (prouigan shard) or pass train.allow_partial_data=true")
    if skipped:
        print(f"[train] WARNING: {len(skipped)} train shard(s) could not be read; registering anyway "
              "(train.allow_partial_data)", file=sys.stderr)


def _register(cfg: Config, manifest: mf.Manifest, result, run_id: str | None) -> dict:
    out = {"run_id": run_id, "checkpoint": None, "version": None}
    check_data(cfg, manifest, result)
    best = max(result.best_checkpoints or [], key=lambda cm: cm[1].get(names.VAL["psnr"], float("-inf")), default=None)
    print(f"[train] finished: latest checkpoint {result.checkpoint.path if result.checkpoint else None}")
    if best is None:
        print("[train] no checkpoint was reported; nothing to register", file=sys.stderr)
        return out
    ckpt_uri = f"{cfg.train.storage.rstrip('/')}/{cfg.name}/{Path(best[0].path).name}"
    out["checkpoint"] = ckpt_uri
    print(f"[train] best checkpoint {ckpt_uri}: val_psnr {best[1][names.VAL['psnr']]:.2f} dB at step {best[1]['step']}")
    if not run_id:
        return out
    client = mlflow.MlflowClient()
    client.set_tag(run_id, names.BEST_CHECKPOINT, ckpt_uri)
    client.set_tag(run_id, names.LATEST_CHECKPOINT, f"{cfg.train.storage.rstrip('/')}/{cfg.name}/"
                                                f"{Path(result.checkpoint.path).name}")
    tags = client.get_run(run_id).data.tags
    if tags.get(names.REGISTERED_CHECKPOINT) == ckpt_uri:  # a re-run that trained nothing new
        print(f"[train] {ckpt_uri} is already registered ({tags[names.REGISTERED_VERSION]})")
        out["version"] = tags[names.REGISTERED_VERSION]
        return out
    with best[0].as_directory() as d:
        if (why := checkpoints.torn(str(d))) is not None:  # the bytes registered are the ones training recorded
            raise UserError(f"the best checkpoint {ckpt_uri} is torn ({why}); nothing registered. Re-run the same "
                            "command to resume from the newest complete checkpoint")
        version = log_and_register(Path(d) / CHECKPOINT_FILE, run_id, cfg.tracking.registered_model,
                                   card=ModelCard(cfg, manifest, best[1], run_id, ckpt_uri))
    uri = f"models:/{cfg.tracking.registered_model}/{version.version}"
    client.set_tag(run_id, names.REGISTERED_CHECKPOINT, ckpt_uri)
    client.set_tag(run_id, names.REGISTERED_VERSION, uri)
    print(f"[train] registered {uri} (alias @challenger), run {run_id}")
    out["version"] = uri
    return out


def config_from_tune(run_id: str, overrides: list[str]) -> Config:
    """The best config a search logged to its MLflow parent run, with overrides applied."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="best.yaml")
    except Exception as e:
        raise ConfigError(f"--from-tune {run_id}: no best.yaml in that MLflow run ({type(e).__name__}: {e})") from None
    return load_config(path, overrides, trusted=False)  # a file in MLflow: taken as written, never expanded
