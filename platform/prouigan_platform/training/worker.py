"""What every Ray Train worker runs: ``train_loop_per_worker``.

Each worker builds G and both Ds (DDP over gloo on CPU, NCCL on GPU), streams its own part of the train shards,
and steps until ``train.steps`` or the wall-time budget (rank 0's clock, broadcast, so all stop on one step).
Every ``train.val_every`` steps it validates on its part of the val split (all-reduced).  Every
``train.checkpoint_every`` steps (and at the end) rank 0 reports a checkpoint through ``ray.train.report`` first,
then hands metrics and a picture to MLflow in the background (an MLflow outage costs no step and no checkpoint).
Rank 0 prints one progress line every ~30 s and one per validation.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from prouigan import LossWeights, ProUIGANGenerator, build_discriminators
from prouigan.batched_occlusion import occlude_and_degrade
from prouigan.generator import unwrap
from prouigan.inference import generator_state
from prouigan.landmarks import nme, soft_argmax
from prouigan.losses import perceptual_network
from prouigan.metrics import masked_psnr, psnr, ssim
from prouigan.presets import GeneratorConfig, generator_config
from prouigan.training import GANStep, channels_last, channels_last_batch, cosine_factor
from prouigan_platform.config import Config
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.dataset.reader import FaceShards
from prouigan_platform.progress import fmt_duration
from prouigan_platform.runtime import verbose
from prouigan_platform.tracking import BackgroundLogger

CHECKPOINT_FILE = "state.pt"
PROGRESS_EVERY_S = 30.0


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


def device_batch(batch: dict, device, cfg: Config, aug_rng: torch.Generator) -> dict:
    """A reader batch -> the batch the step takes: on the device, occluded and degraded there when the reader sent
    clean faces (``data.occlusion.on_device``), in NHWC with ``train.channels_last``."""
    batch = _to(batch, device)
    occ = cfg.data.occlusion
    if occ.on_device:
        batch = occlude_and_degrade(batch, aug_rng, occ.kinds, tuple(occ.coverage), occ.probability,
                                    cfg.data.degradation.noise_std)
    return channels_last_batch(batch) if cfg.train.channels_last else batch


def validate(generator, loader, device, sigma: float) -> dict[str, float]:
    """PSNR, SSIM, occluded-region PSNR and prior NME on this worker's part, summed across workers."""
    g = unwrap(generator)
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


def image_grid(generator, batch: dict, device, n: int = 4) -> np.ndarray:
    """(H, W, 3) uint8: rows of  input (nearest x8) | stage 32 | stage 64 | stage 128 | HR."""
    g = unwrap(generator)
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


def progress(step: int, steps: int, elapsed_s: float, budget_s: float | None) -> float:
    """How far the run is on one process, 0..1: by steps, or by the wall-time budget when that comes first."""
    done = step / steps
    return max(done, elapsed_s / budget_s) if budget_s is not None else done


def broadcast_from_rank0(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return float(t[0])


class BudgetClock:
    """``clock(step, elapsed_s)`` -> how far the run is, 0..1, the same on every rank.

    Under DDP all ranks must stop on the same step and run the same schedules, so they take rank 0's clock
    (``broadcast``), but only every ``every`` steps: a broadcast waits for every rank's host, and under NCCL for
    the device too.  In between, each rank extrapolates from the last two broadcasts: the same arithmetic on the
    same numbers, so the ranks still agree.  Without a broadcast (one process) it reads its own clock each step.
    """

    def __init__(self, steps: int, budget_s: float | None, every: int = 10, broadcast=None):
        self.steps, self.budget_s, self.every, self.broadcast = steps, budget_s, every, broadcast
        self.last: tuple[int, float] | None = None  # (step, done) of the last broadcast
        self.rate = 0.0  # progress per step between the last two broadcasts
        self.broadcasts = 0
        self.done = 0.0

    def __call__(self, step: int, elapsed_s: float) -> float:
        local = progress(step, self.steps, elapsed_s, self.budget_s)
        if self.budget_s is None or self.broadcast is None:
            return local
        if self.last is None or step - self.last[0] >= self.every:
            done = self.broadcast(local)
            self.broadcasts += 1
            if self.last is not None and step > self.last[0]:
                self.rate = max(0.0, (done - self.last[1]) / (step - self.last[0]))
            self.last = (step, done)
        else:
            done = max(step / self.steps, self.last[1] + (step - self.last[0]) * self.rate)
        # never backwards (an extrapolation can run ahead of the next broadcast): a schedule or the final mix
        # must not switch back
        self.done = max(self.done, done)
        return self.done


def _state(module) -> dict:
    return {k: v.detach().cpu() for k, v in unwrap(module).state_dict().items()}


class ProgressPrinter:
    """Rank 0's console: a compact line every ~30 s and one per validation."""

    def __init__(self, cfg: Config, start_step: int, world: int):
        self.cfg, self.world = cfg, world
        self.t0 = self.t_last = time.time()
        self.step_last = start_step
        self.best: tuple[float, int] | None = None

    def step(self, step: int, done: float, logs: dict, lr: float, elapsed_s: float, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.t_last < PROGRESS_EVERY_S:
            return
        rate = (step - self.step_last) * self.cfg.train.batch_size * self.world / max(now - self.t_last, 1e-9)
        self.t_last, self.step_last = now, step
        t = self.cfg.train
        where = (f"{elapsed_s / 60:.1f}/{t.max_minutes:g} min" if t.max_minutes and done > step / t.steps
                 else f"step {step:,}/{t.steps:,}")
        eta = (now - self.t0) / max(done, 1e-9) * (1 - done) if done > 0 else float("nan")
        d = logs.get("d_global", logs.get("d_total"))  # 0-d tensors: read only here, every ~30 s
        d, g = (None if d is None else float(d)), float(logs.get("g_total", 0))
        print(f"[train] step {step:,} | {where} ({done:.0%}) | {rate:.1f} samples/s | G {g:.4f}"
              + (f" D {d:.4f}" if d is not None else "") + f" | lr {lr:.2e} | ETA "
              + (fmt_duration(eta) if eta == eta else "-"), flush=True)

    def validation(self, step: int, m: dict) -> None:
        if self.best is None or m["val_psnr"] > self.best[0]:
            self.best = (m["val_psnr"], step)
        print(f"[val]   step {step:,} | PSNR {m['val_psnr']:.2f} | occluded PSNR {m['val_psnr_occluded']:.2f}"
              + (f" | NME {m['val_nme']:.4f}" if "val_nme" in m else "")
              + f" | best PSNR {self.best[0]:.2f} at step {self.best[1]:,}", flush=True)


def _restore(cfg: Config):
    """(generator config, state dict or None, init generator or None): the checkpoint's architecture wins on
    resume (the driver already refused a config whose model differs)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        return GeneratorConfig.from_dict(state["generator_config"]), state
    return generator_config(cfg.model.preset, cfg.model.overrides), None


def _quiet_train_reports() -> None:
    """Ray Train logs every report at INFO ("Reporting training result N: TrainingReport(...)") through a logger
    named after its file, which RunConfig's LoggingConfig (it filters ``ray.train.*`` names) does not reach."""
    from ray.train.v2._internal.execution import context  # private: the logger's name is this file's path

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = Config.model_validate(loop_config["config"])
    if not verbose():
        _quiet_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    manifest = mf.load(loop_config["manifest_uri"])

    gcfg, state = _restore(cfg)
    g = ProUIGANGenerator(gcfg)
    d_global, d_local = build_discriminators(cfg.model.preset)
    weights = LossWeights(**cfg.loss.model_dump(exclude={"vgg_weights"}))
    vgg, vgg_msg = perceptual_network(weights, cfg.loss.vgg_weights)
    if vgg is not None:
        vgg = vgg.to(device)
    if cfg.train.channels_last:
        channels_last(g, d_global, d_local)
    g, d_global, d_local = (ray.train.torch.prepare_model(m) for m in (g, d_global, d_local))
    amp = torch.bfloat16 if (device.type == "cuda" and cfg.train.bf16) else None
    step_fn = GANStep(g, d_global, d_local, weights, cfg.train.lr_g, cfg.train.lr_d, cfg.data.heatmap_sigma,
                      amp_dtype=amp, vgg=vgg, compile_mode=None if cfg.train.compile == "off" else cfg.train.compile)
    start, elapsed_before = 0, 0.0
    if state is not None:
        for module, key in ((g, "generator"), (d_global, "d_global"), (d_local, "d_local")):
            unwrap(module).load_state_dict(state[key])
        step_fn.load_state_dict(state["optimizers"])
        start, elapsed_before = int(state["step"]), float(state.get("elapsed_s", 0.0))
    elif loop_config.get("init_generator") is not None:  # fine-tuning (retrain): G starts from a given model
        unwrap(g).load_state_dict(loop_config["init_generator"])
    if rank == 0:
        print(f"[train] {cfg.name}: {world} worker(s) on {device}; {vgg_msg}", flush=True)
        if state is not None:
            print(f"[train] resumed from step {start}", flush=True)
        elif loop_config.get("init_generator") is not None:
            print(f"[train] generator initialised from {loop_config.get('init_from')}", flush=True)
    # every worker says where it runs (the cluster test checks that workers spread over nodes)
    print(f"[train] worker world_rank={rank} of {world} on node {ray.get_runtime_context().get_node_id()} "
          f"pid {os.getpid()}", flush=True)

    def train_batches(at_step: int, weights: dict[str, float]):
        data = cfg.data.model_copy(update={"source_weights": weights})
        ds = FaceShards(manifest, "train", data, rank=rank, world_size=world, seed=cfg.seed + at_step, epochs=None)
        return iter(DataLoader(ds, batch_size=cfg.train.batch_size, num_workers=1, persistent_workers=True))

    val_loader = DataLoader(FaceShards(manifest, "val", cfg.data, rank=rank, world_size=world,
                                       limit=max(1, cfg.train.val_samples // world)), batch_size=cfg.train.batch_size)
    grid_batch = next(iter(DataLoader(FaceShards(manifest, "val", cfg.data, limit=4), batch_size=4)))

    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        tracker = BackgroundLogger(loop_config["mlflow_run_id"])
    printer = ProgressPrinter(cfg, start, world) if rank == 0 else None
    base_lr = [pg["lr"] for pg in step_fn.opt_g.param_groups]
    aug_rng = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + rank * 7_919 + start)
    t_loop = time.time()
    t_last, n_last = t_loop, 0
    budget_s = cfg.train.max_minutes * 60 if cfg.train.max_minutes else None
    clock = BudgetClock(cfg.train.steps, budget_s, cfg.train.sync_every,
                        broadcast_from_rank0 if dist.is_available() and dist.is_initialized() else None)
    done = clock(start, elapsed_before)  # rank 0's clock decides for all
    mix = cfg.data.mix_at(done)
    loader = train_batches(start, mix)
    last_val: dict | None = None
    step = start
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            if done >= 1.0:
                break  # resumed a run whose budget was already spent
            if cfg.train.lr_schedule == "cosine":
                for pg, lr0 in zip(step_fn.opt_g.param_groups, base_lr, strict=True):
                    pg["lr"] = lr0 * cosine_factor(done)
            step_fn.adversarial = cfg.loss.adversarial > 0 and done >= cfg.train.adversarial_start
            if (now_mix := cfg.data.mix_at(done)) != mix:
                mix = now_mix
                del loader  # its reader process ends here
                loader = train_batches(step, mix)
                if rank == 0:
                    print(f"[train] step {step:,}: the last {cfg.data.final_fraction:.0%} of the run reads the final "
                          f"mix {mix}", flush=True)
            batch = device_batch(next(loader), device, cfg, aug_rng)
            logs = step_fn.step(batch)
            if step == start + 1 and rank == 0 and cfg.train.compile != "off":
                print(f"[train] torch.compile ({cfg.train.compile}): " + ", ".join(
                    f"{name} {fw.running}" for name, fw in step_fn.forwards.items()), flush=True)
            elapsed = elapsed_before + time.time() - t_loop
            # this progress ends the run here or drives the next step's schedule, on every rank alike
            done = clock(step, elapsed)
            last = step == cfg.train.steps or done >= 1.0
            n_last += len(batch["lr"]) * world
            if printer is not None:
                printer.step(step, done, logs, step_fn.opt_g.param_groups[0]["lr"], elapsed, force=last)
            if tracker is not None and (step % 10 == 0 or step == start + 1):
                tracker.log_metrics({f"train/{k}": float(v) for k, v in logs.items()}, step)
            validating = step % cfg.train.val_every == 0 or last
            checkpointing = step % cfg.train.checkpoint_every == 0 or last
            if validating or (checkpointing and last_val is None):
                last_val = validate(g, val_loader, device, cfg.data.heatmap_sigma)
                last_val["val_step"] = step
                if printer is not None:
                    printer.validation(step, last_val)
            if not (validating or checkpointing):
                continue
            dt = time.time() - t_last
            metrics = {**last_val, "step": step, "samples_per_s": n_last / max(dt, 1e-9),
                       **{f"train_{k}": float(v) for k, v in logs.items()}}
            t_last, n_last = time.time(), 0
            if not checkpointing:
                ray.train.report(metrics)
            elif rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    torch.save({**generator_state(g), "d_global": _state(d_global), "d_local": _state(d_local),
                                "optimizers": step_fn.state_dict(), "step": step, "config": loop_config["config"],
                                "elapsed_s": elapsed, "manifest_digest": manifest.get("digest", mf.digest(manifest))},
                               Path(tmp) / CHECKPOINT_FILE)
                    # the checkpoint reaches storage first; tracking follows, best-effort
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                     checkpoint_dir_name=f"step_{step:07d}")
            else:
                ray.train.report(metrics)
            if tracker is not None and validating:
                # a Tune trial's validation scores are logged by its driver-side callback (search.py): not twice
                tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"
                                     and not (loop_config.get("validation_logged") and k.startswith("val_"))}, step)
                tracker.log_image(image_grid(g, grid_batch, device), f"val_grid_step_{step:07d}.png", "grids")
            if last:
                break
    finally:
        if tracker is not None:
            note = tracker.close(timeout_s=30)
            if note:
                print(f"[train] {note}", flush=True)
    if rank == 0:
        print(f"[train] stopped at step {step:,} after {fmt_duration(elapsed_before + time.time() - t_loop)} of "
              f"training (pid {os.getpid()})", flush=True)
