"""Distributed training of Pro-UIGAN with Ray Train (V2 API): generator + global and local discriminators.

The driver (``run``) resolves the config, finds the dataset version, opens (or re-opens) the MLflow run and
starts a ``TorchTrainer``; every worker runs ``train_loop_per_worker``: DDP over gloo (CPU) or NCCL (GPU),
its own disjoint part of the shards through the on-the-fly occlusion reader, validation on its part of the
val split (all-reduced), and checkpoints reported from rank 0 only.  Re-running with the same ``name``
resumes from the latest checkpoint; ``train.max_failures`` restarts lost workers from it.

    prouigan train --config cpu-small
    ray job submit --working-dir . -- python pipelines/train.py --config gpu-paper
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

HELP = "train Pro-UIGAN with Ray Train (DDP), checkpointing and MLflow tracking"
CHECKPOINT_FILE = "state.pt"


def add_arguments(parser) -> None:
    from prouigan_platform.cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--from-tune", metavar="RUN_ID", default=None,
                        help="train with the best config of a `prouigan tune` search (its MLflow parent run)")


def config_from_tune(run_id: str, overrides: list[str]):
    """The best config a search logged to its MLflow parent run, with overrides applied."""
    import mlflow

    from prouigan_platform.config import ConfigError, load_config

    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="best.yaml")
    except Exception as e:
        raise ConfigError(f"--from-tune {run_id}: no best.yaml in that MLflow run ({type(e).__name__}: {e})") from None
    return load_config(path, overrides)


# ---------------------------------------------------------------- per worker ----------------------------------

def _to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


def validate(generator, loader, device, sigma: float) -> dict[str, float]:
    """PSNR, SSIM, occluded-region PSNR and prior NME on this worker's part, summed across workers."""
    import torch
    import torch.distributed as dist

    from prouigan.landmarks import nme, soft_argmax
    from prouigan.metrics import masked_psnr, psnr, ssim

    g = generator.module if hasattr(generator, "module") else generator
    g.eval()
    sums = torch.zeros(7, dtype=torch.float64)  # psnr, ssim, occluded psnr, n occluded, nme, n landmarks, n
    with torch.no_grad():
        for batch in loader:
            b = _to(batch, device)
            out = g(b["lr"])
            sr = out.final.float().nan_to_num(0.5).clamp(0, 1)  # a diverged trial scores low, not NaN
            mp = masked_psnr(sr, b["hr"], b["mask"]).cpu()
            has = b["has_landmarks"].cpu()
            if out.heatmaps:
                err = nme(soft_argmax(out.heatmaps[-1].float(), sigma).cpu(), b["landmarks"].cpu())
            else:  # a generator without priors (the plain CNN baseline) has no landmark estimate
                err, has = torch.zeros(len(sr)), torch.zeros(len(sr), dtype=torch.bool)
            sums += torch.tensor([psnr(sr, b["hr"]).sum().item(), ssim(sr, b["hr"]).sum().item(),
                                  torch.nan_to_num(mp).sum().item(), float((~torch.isnan(mp)).sum()),
                                  err[has].sum().item(), float(has.sum()), float(len(sr))], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    g.train()
    n = max(float(sums[6]), 1.0)
    out = {"val_psnr": float(sums[0]) / n, "val_ssim": float(sums[1]) / n,
           "val_psnr_occluded": float(sums[2]) / max(float(sums[3]), 1.0)}
    if sums[5] > 0:
        out["val_nme"] = float(sums[4]) / float(sums[5])
    return out


def image_grid(generator, batch: dict, device, n: int = 4):
    """(H, W, 3) uint8: rows of  input (nearest x8) | stage 32 | stage 64 | stage 128 | HR."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    g = generator.module if hasattr(generator, "module") else generator
    g.eval()
    with torch.no_grad():
        out = g(batch["lr"][:n].to(device))
    g.train()
    cols = [F.interpolate(batch["lr"][:n].float(), size=128, mode="nearest")]
    cols += [F.interpolate(img.float().cpu().clamp(0, 1), size=128, mode="nearest") for img in out.images]
    cols.append(batch["hr"][:n].float())
    rows = [torch.cat([c[i] for c in cols], dim=2) for i in range(min(n, len(batch["lr"])))]
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    return (grid * 255).round().astype(np.uint8)


def train_loop_per_worker(loop_config: dict) -> None:
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader

    from prouigan import LossWeights, ProUIGANGenerator, build_discriminators, generator_config
    from prouigan.inference import generator_state
    from prouigan.losses import perceptual_network
    from prouigan.training import GANStep, cosine_factor
    from prouigan_platform.config import Config
    from prouigan_platform.dataset import manifest as mf
    from prouigan_platform.dataset.reader import FaceShards

    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    manifest = mf.load(loop_config["manifest_uri"])

    g = ProUIGANGenerator(generator_config(cfg.model.preset, cfg.model.overrides))
    d_global, d_local = build_discriminators(cfg.model.preset)
    weights = LossWeights(**cfg.loss.model_dump(exclude={"vgg_weights"}))
    vgg, vgg_msg = perceptual_network(weights, cfg.loss.vgg_weights)
    if rank == 0:
        print(f"[train] {vgg_msg}", flush=True)
    if vgg is not None:
        vgg = vgg.to(device)
    g, d_global, d_local = (ray.train.torch.prepare_model(m) for m in (g, d_global, d_local))
    amp = torch.bfloat16 if (device.type == "cuda" and cfg.train.bf16) else None
    step_fn = GANStep(g, d_global, d_local, weights, cfg.train.lr_g, cfg.train.lr_d, cfg.data.heatmap_sigma,
                      amp_dtype=amp, vgg=vgg)

    start, elapsed_before = 0, 0.0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        for module, key in ((g, "generator"), (d_global, "d_global"), (d_local, "d_local")):
            (module.module if hasattr(module, "module") else module).load_state_dict(state[key])
        step_fn.load_state_dict(state["optimizers"])
        start = int(state["step"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        if rank == 0:
            print(f"[train] resumed from step {start}", flush=True)
    elif loop_config.get("init_generator") is not None:  # fine-tuning (retrain): G starts from a given model
        (g.module if hasattr(g, "module") else g).load_state_dict(loop_config["init_generator"])
        if rank == 0:
            print(f"[train] generator initialised from {loop_config.get('init_from')}", flush=True)
    print(f"[train] worker world_rank={rank} of {world} on node {ray.get_runtime_context().get_node_id()} "
          f"pid {os.getpid()}", flush=True)

    train_ds = FaceShards(manifest, "train", cfg.data, rank=rank, world_size=world, seed=cfg.seed + start,
                          epochs=None)
    loader = iter(DataLoader(train_ds, batch_size=cfg.train.batch_size, num_workers=1, persistent_workers=True))
    val_ds = FaceShards(manifest, "val", cfg.data, rank=rank, world_size=world,
                        limit=max(1, cfg.train.val_samples // world))
    val_loader = DataLoader(val_ds, batch_size=cfg.train.batch_size)
    grid_batch = next(iter(DataLoader(FaceShards(manifest, "val", cfg.data, limit=4), batch_size=4)))

    client = None
    run_id = loop_config.get("mlflow_run_id")
    if rank == 0 and run_id:
        import mlflow

        client = mlflow.MlflowClient()
    base_lr = [pg["lr"] for pg in step_fn.opt_g.param_groups]
    t_loop = t_last = time.time()
    n_last = 0
    budget_s = cfg.train.max_minutes * 60 if cfg.train.max_minutes else None
    done = progress(start, cfg.train.steps, elapsed_before, budget_s)  # rank 0's clock decides for all
    for step in range(start + 1, cfg.train.steps + 1):
        if done >= 1.0:
            break  # resumed a run whose budget was already spent
        if cfg.train.lr_schedule == "cosine":
            for pg, lr0 in zip(step_fn.opt_g.param_groups, base_lr, strict=True):
                pg["lr"] = lr0 * cosine_factor(done)
        step_fn.adversarial = cfg.loss.adversarial > 0 and done >= cfg.train.adversarial_start
        batch = _to(next(loader), device)
        logs = step_fn.step(batch)
        # one broadcast per step: this progress ends the run here or drives the next step's schedule
        done = progress(step, cfg.train.steps, elapsed_before + time.time() - t_loop, budget_s)
        last = step == cfg.train.steps or done >= 1.0
        n_last += len(batch["lr"]) * world
        if client is not None and (step % 10 == 0 or step == start + 1):
            client.log_batch(run_id, metrics=[mlflow.entities.Metric(f"train/{k}", v, int(time.time() * 1000), step)
                                              for k, v in logs.items() if np.isfinite(v)])
        if step % cfg.train.val_every == 0 or last:
            metrics = validate(g, val_loader, device, cfg.data.heatmap_sigma)
            dt = time.time() - t_last
            metrics.update({"step": step, "samples_per_s": n_last / max(dt, 1e-9), **{f"train_{k}": v for k, v in
                                                                                      logs.items()}})
            t_last, n_last = time.time(), 0
            if rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    state = {**generator_state(g), "d_global": _state(d_global), "d_local": _state(d_local),
                             "optimizers": step_fn.state_dict(), "step": step, "config": loop_config["config"],
                             "elapsed_s": elapsed_before + time.time() - t_loop,
                             "manifest_digest": manifest.get("digest", mf.digest(manifest))}
                    torch.save(state, Path(tmp) / CHECKPOINT_FILE)
                    if client is not None:
                        _log_validation(client, run_id, metrics, step, image_grid(g, grid_batch, device))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                     checkpoint_dir_name=f"step_{step:07d}")
            else:
                ray.train.report(metrics)
        if last:
            break


def progress(step: int, steps: int, elapsed_s: float, budget_s: float | None) -> float:
    """How far the run is, 0..1: by steps, or by the wall-time budget when that comes first.  Under DDP every
    rank takes rank 0's value (broadcast), so all stop on the same step and schedules agree."""
    import torch
    import torch.distributed as dist

    done = step / steps
    if budget_s is not None:
        done = max(done, elapsed_s / budget_s)
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([done], dtype=torch.float64)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.broadcast(t, src=0)
            done = float(t[0])
    return done


def _state(module) -> dict:
    m = module.module if hasattr(module, "module") else module
    return {k: v.detach().cpu() for k, v in m.state_dict().items()}


def _log_validation(client, run_id: str, metrics: dict, step: int, grid) -> None:
    import mlflow
    from PIL import Image

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()
                                      if k != "step"])
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / f"val_grid_step_{step:07d}.png"
        Image.fromarray(grid).save(p)
        client.log_artifact(run_id, str(p), artifact_path="grids")


# ---------------------------------------------------------------- driver -------------------------------------

def storage_args(uri: str) -> dict:
    """RunConfig storage for a local path or s3:// (pyarrow filesystem with the configured endpoint)."""
    from prouigan_platform import storage

    if storage.is_s3(uri):
        return {"storage_path": uri[len("s3://"):].rstrip("/"), "storage_filesystem": storage.s3_filesystem()}
    return {"storage_path": str(Path(uri).expanduser().resolve())}


def find_or_start_run(cfg, manifest: dict) -> str:
    """The MLflow run of this training name: re-opened on resume, created (with the whole config) otherwise."""
    import mlflow

    from prouigan_platform.tracking import git_commit, log_config

    mlflow.set_experiment(cfg.tracking.experiment)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    found = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.train_name = '{cfg.name}'",
                               output_format="list", max_results=1)
    if found:
        return found[0].info.run_id
    with mlflow.start_run(run_name=cfg.name, tags={"train_name": cfg.name, "git_commit": git_commit(),
                                                   "pipeline": "train", "data_manifest": manifest["_uri"],
                                                   "data_manifest_digest": manifest["digest"]}) as run:
        log_config(cfg)
    return run.info.run_id


def fit(cfg, manifest_uri: str, run_id: str | None, callbacks: list | None = None, init: dict | None = None):
    """Build and run the TorchTrainer for a resolved config (Ray must be initialised); -> ray.train.Result.
    ``callbacks``: Ray Train callbacks (``prouigan tune`` passes Tune's report callback).
    ``init``: {"from": MODEL, "generator": state dict} to fine-tune from (used when there is no checkpoint)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "manifest_uri": manifest_uri,
                           "mlflow_run_id": run_id, "init_generator": (init or {}).get("generator"),
                           "init_from": (init or {}).get("from")},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker},
                                               placement_strategy=cfg.train.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.name, **storage_args(cfg.train.storage), callbacks=callbacks or None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_best,
                                                         checkpoint_score_attribute="val_psnr",
                                                         checkpoint_score_order="max")),
    )
    return trainer.fit()


def run(args) -> int:
    from prouigan_platform.cli import config_from_args
    from prouigan_platform.dataset import manifest as mf
    from prouigan_platform.runtime import init_ray, use_embedded_stack

    use_embedded_stack()
    if getattr(args, "from_tune", None):
        if args.config:
            raise SystemExit("prouigan: error: give --config or --from-tune, not both")
        cfg = config_from_tune(args.from_tune, args.overrides)
    else:
        cfg = config_from_args(args)
    manifest = mf.load(cfg.train.dataset or cfg.data.output)
    init_ray(log_to_driver=True)
    out = train_and_register(cfg, manifest)
    return 0 if out["checkpoint"] and (out["version"] or _tracking_off()) else 1


def _tracking_off() -> bool:
    return not os.environ.get("MLFLOW_TRACKING_URI")


def train_and_register(cfg, manifest: dict, init: dict | None = None, tags: dict | None = None) -> dict:
    """Train (or resume) ``cfg.name`` on a dataset version and register its best checkpoint as a new version of
    ``tracking.registered_model`` with alias ``challenger``.  Ray must be initialised.
    -> {"run_id", "checkpoint", "version" (models:/NAME/N, None without tracking or checkpoint)}."""
    run_id = None if _tracking_off() else find_or_start_run(cfg, manifest)
    if run_id is None:
        print("[train] MLFLOW_TRACKING_URI not set: training without tracking", file=sys.stderr)
    elif tags:
        import mlflow

        for k, v in tags.items():
            mlflow.MlflowClient().set_tag(run_id, k, v)
    result = fit(cfg, manifest["_uri"], run_id, init=init)
    out = {"run_id": run_id, "checkpoint": None, "version": None}
    best = max(result.best_checkpoints or [], key=lambda cm: cm[1].get("val_psnr", float("-inf")), default=None)
    print(f"[train] finished: latest checkpoint {result.checkpoint.path if result.checkpoint else None}")
    if best is None:
        print("[train] no checkpoint was reported; nothing to register", file=sys.stderr)
        return out
    ckpt_uri = f"{cfg.train.storage.rstrip('/')}/{cfg.name}/{Path(best[0].path).name}"
    out["checkpoint"] = ckpt_uri
    print(f"[train] best checkpoint {ckpt_uri}: val_psnr {best[1]['val_psnr']:.2f} dB at step {best[1]['step']}")
    if run_id:
        import mlflow

        from prouigan_platform.registry import log_and_register

        client = mlflow.MlflowClient()
        client.set_tag(run_id, "best_checkpoint", ckpt_uri)
        client.set_tag(run_id, "latest_checkpoint", f"{cfg.train.storage.rstrip('/')}/{cfg.name}/"
                                                    f"{Path(result.checkpoint.path).name}")
        tags = client.get_run(run_id).data.tags
        if tags.get("registered_checkpoint") == ckpt_uri:  # a re-run that trained nothing new
            print(f"[train] {ckpt_uri} is already registered ({tags['registered_version']})")
            out["version"] = tags["registered_version"]
            return out
        with best[0].as_directory() as d:
            version = log_and_register(Path(d) / CHECKPOINT_FILE, run_id, cfg.tracking.registered_model)
        uri = f"models:/{cfg.tracking.registered_model}/{version.version}"
        client.set_tag(run_id, "registered_checkpoint", ckpt_uri)
        client.set_tag(run_id, "registered_version", uri)
        print(f"[train] registered {uri} (alias @challenger), run {run_id}")
        out["version"] = uri
    return out


if __name__ == "__main__":
    from prouigan_platform.cli import run_as_script

    run_as_script("train")
