"""What every Ray Train worker runs: ``train_loop_per_worker``, a short story told by ``WorkerRun``.

    set up (or restore) -> step by step: train_step -> validate when due -> report (with a checkpoint) when due -> close

Each worker builds G and both Ds (DDP over gloo on CPU, NCCL on GPU), streams its own part of the train shards,
and steps until ``train.steps`` or the wall-time budget (rank 0's clock, broadcast, so all stop on one step).
Every ``train.val_every`` steps it validates on its part of the val split (summed over workers), bicubic beside
the model.  Every ``train.checkpoint_every`` steps (and at the end) rank 0 reports a checkpoint through
``ray.train.report`` first, then hands metrics and the val grid to MLflow in the background (an MLflow outage
costs no step and no checkpoint).  Rank 0 prints one progress line every ~30 s and one per validation; the first
worker of each node logs the node's system metrics to the run.
"""

from __future__ import annotations

import copy
import hashlib
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
from torch.utils.data import DataLoader

from prouigan import LossWeights, ProUIGANGenerator, build_discriminators
from prouigan.batched_occlusion import occlude_and_degrade
from prouigan.degradation import upsample_bicubic
from prouigan.generator import unwrap
from prouigan.inference import generator_state
from prouigan.landmarks import nme, soft_argmax
from prouigan.losses import perceptual_network
from prouigan.metrics import face_scores
from prouigan.pictures import comparison_grid
from prouigan.presets import GeneratorConfig, generator_config
from prouigan.training import (
    GANStep,
    autocast_dtype,
    channels_last,
    channels_last_batch,
    cosine_factor,
    warmup_cosine_factor,
)
from prouigan_platform import run_names as names
from prouigan_platform import storage, tracking
from prouigan_platform.config import Config
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.dataset.reader import FaceShards
from prouigan_platform.progress import fmt_duration
from prouigan_platform.runtime import verbose
from prouigan_platform.tracking import BackgroundLogger, system_metrics
from prouigan_platform.training import checkpoints

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


# what validation adds up over the val faces (summed on each worker, then across workers)
VAL_SUMS = ("faces", "psnr", "ssim", "occluded_faces", "psnr_occluded", "landmark_faces", "nme",
            "bicubic_psnr", "bicubic_ssim", "bicubic_psnr_occluded")


def validation_sums(generator, loader, device, sigma: float) -> dict[str, float]:
    """``VAL_SUMS`` over this worker's part of the val split, for the model and for bicubic on the same inputs."""
    g = unwrap(generator)
    g.eval()
    sums = dict.fromkeys(VAL_SUMS, 0.0)
    with torch.no_grad():
        for batch in loader:
            b = _to(batch, device)
            out = g(b["lr"])
            sr = out.final.float().nan_to_num(0.5).clamp(0, 1)  # a diverged trial scores low, not NaN
            bic = upsample_bicubic(b["lr"])
            model, bicubic = face_scores(sr, b["hr"], b["mask"]), face_scores(bic, b["hr"], b["mask"])
            has_region = ~torch.isnan(model["psnr_occluded"])
            sums["faces"] += len(sr)
            sums["occluded_faces"] += float(has_region.sum())
            for prefix, scores in (("", model), ("bicubic_", bicubic)):
                sums[prefix + "psnr"] += scores["psnr"].sum().item()
                sums[prefix + "ssim"] += scores["ssim"].sum().item()
                sums[prefix + "psnr_occluded"] += scores["psnr_occluded"][has_region].sum().item()
            if out.heatmaps:  # a generator without priors (the plain CNN baseline) has no landmark estimate
                has = b["has_landmarks"].cpu()
                err = nme(soft_argmax(out.heatmaps[-1].float(), sigma).cpu(), b["landmarks"].cpu())
                sums["landmark_faces"] += float(has.sum())
                sums["nme"] += err[has].sum().item()
    g.train()
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([sums[k] for k in VAL_SUMS], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        sums = dict(zip(VAL_SUMS, t.tolist(), strict=True))
    return sums


def validate(generator, loader, device, sigma: float) -> dict[str, float]:
    """PSNR, SSIM, occluded-region PSNR and prior NME over the val faces of every worker, and bicubic's scores on
    the same inputs (``val_bicubic_*``: the line a model must beat)."""
    s = validation_sums(generator, loader, device, sigma)
    faces, occluded = max(s["faces"], 1.0), max(s["occluded_faces"], 1.0)
    per = {"psnr": faces, "ssim": faces, "psnr_occluded": occluded, "bicubic_psnr": faces, "bicubic_ssim": faces,
           "bicubic_psnr_occluded": occluded}
    if s["landmark_faces"] > 0:
        per["nme"] = s["landmark_faces"]
    return {names.VAL[m]: s[m] / n for m, n in per.items()}


def image_grid(generator, batch: dict, device, n: int = 4) -> np.ndarray:
    """(H, W, 3) uint8: rows of  input (nearest x8) | stage 32 | stage 64 | stage 128 | HR."""
    g = unwrap(generator)
    g.eval()
    with torch.no_grad():
        out = g(batch["lr"][:n].to(device))
    g.train()
    return comparison_grid(batch["lr"][:n], out.images, batch["hr"][:n])


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
        self.rates: list[float] = []  # progress per step over the last two intervals between broadcasts
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
                self.rates = [*self.rates[-1:], max(0.0, (done - self.last[1]) / (step - self.last[0]))]
            self.last = (step, done)
        else:
            # the slower of the last two intervals: one slow interval (torch.compile's first steps, the
            # discriminators compiling when they join, a validation, a checkpoint) is minutes long for a few
            # steps and would run progress far ahead of the clock
            rate = min(self.rates) if len(self.rates) == 2 else 0.0
            done = max(step / self.steps, self.last[1] + (step - self.last[0]) * rate)
        # never backwards (an extrapolation can run ahead of the next broadcast): a schedule or the final mix
        # must not switch back
        self.done = max(self.done, done)
        return self.done


def data_tags(read: set[str], skipped: set[str]) -> dict[str, str]:
    """What a run records of the train shards it read: how many, a digest of which, and any it could not read."""
    names = "\n".join(sorted(read)).encode()
    return {"data_shards_read": str(len(read)), "data_shards_read_digest": hashlib.sha256(names).hexdigest()[:16],
            "data_shards_skipped": ",".join(sorted(skipped))[:tracking.ERROR_CHARS]}


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameters averaged, buffers copied."""
    e, m = list(ema.parameters()), [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)
    for b_e, b_m in zip(ema.buffers(), model.buffers(), strict=True):
        b_e.copy_(b_m)


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
        if t.max_minutes:  # the time budget ends the run by then, however slow the first (compiling) steps were
            left = max(t.max_minutes * 60 - elapsed_s, 0.0)
            eta = left if eta != eta else min(eta, left)
        d = logs.get("d_global", logs.get("d_total"))  # 0-d tensors: read only here, every ~30 s
        d, g = (None if d is None else float(d)), float(logs.get("g_total", 0))
        print(f"[train] step {step:,} | {where} ({done:.0%}) | {rate:.1f} samples/s | G {g:.4f}"
              + (f" D {d:.4f}" if d is not None else "") + f" | lr {lr:.2e} | ETA "
              + (fmt_duration(eta) if eta == eta else "-"), flush=True)

    def validation(self, step: int, m: dict) -> None:
        v = {k: m[name] for k, name in names.VAL.items() if name in m}
        if self.best is None or v["psnr"] > self.best[0]:
            self.best = (v["psnr"], step)
        print(f"[val]   step {step:,} | PSNR {v['psnr']:.2f} | occluded PSNR {v['psnr_occluded']:.2f}"
              + (f" | NME {v['nme']:.4f}" if "nme" in v else "")
              + f" | best PSNR {self.best[0]:.2f} at step {self.best[1]:,}", flush=True)


def _quiet_train_reports() -> None:
    """Ray Train logs every report at INFO ("Reporting training result N: TrainingReport(...)") through a logger
    named after its file, which RunConfig's LoggingConfig (it filters ``ray.train.*`` names) does not reach."""
    from ray.train.v2._internal.execution import context  # private: the logger's name is this file's path

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class WorkerRun:
    """One worker's training: its models, optimisers, data, clock and console, built (or restored) by ``__init__``;
    ``train_loop_per_worker`` tells the story with its methods."""

    def __init__(self, loop_config: dict):
        self.loop_config = loop_config
        cfg = self.cfg = Config.model_validate(loop_config["config"])
        if not verbose():
            _quiet_train_reports()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(cfg.seed + self.rank)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        self.manifest = mf.load(loop_config["manifest_uri"])
        self.manifest_digest = self.manifest.digest or mf.digest(self.manifest)
        state = self._build_models()
        self.start, self.elapsed_before = self._restore(state)
        self._say_hello(state)
        self.val_loader = DataLoader(FaceShards(self.manifest, "val", cfg.data, rank=self.rank, world_size=self.world,
                                                limit=max(1, cfg.train.val_samples // self.world)),
                                     batch_size=cfg.train.batch_size)
        self.grid_batch = next(iter(DataLoader(FaceShards(self.manifest, "val", cfg.data, limit=4), batch_size=4)))
        run_id = loop_config.get("mlflow_run_id")
        self.tracker = BackgroundLogger(run_id) if self.rank == 0 and run_id else None
        # every node that trains logs its CPU, memory (and GPU) to the run, once per node
        self.system = system_metrics(run_id, f"node_{ctx.get_node_rank()}") \
            if run_id and ctx.get_local_rank() == 0 else None
        self.printer = ProgressPrinter(cfg, self.start, self.world) if self.rank == 0 else None
        self.base_lr = [pg["lr"] for pg in self.step_fn.opt_g.param_groups]
        self.aug_rng = torch.Generator(device=self.device).manual_seed(
            cfg.seed * 1_000_003 + self.rank * 7_919 + self.start)
        self.t_loop = self.t_report = time.time()
        self.samples_since_report = 0
        budget_s = cfg.train.max_minutes * 60 if cfg.train.max_minutes else None
        self.clock = BudgetClock(cfg.train.steps, budget_s, cfg.train.sync_every,
                                 broadcast_from_rank0 if dist.is_available() and dist.is_initialized()
                                 and dist.get_world_size() > 1 else None)
        self.done = self.clock(self.start, self.elapsed_before)  # rank 0's clock decides for all
        self.mix = cfg.data.mix_at(self.done)
        self.loader = self._train_batches(self.start)
        self.last_val: dict | None = None
        self.finished = self.done >= 1.0  # a resumed run whose budget was already spent
        # the train shards this worker read, and those it could not read (damaged, missing): recorded with each
        # checkpoint, so a model trained on less than its dataset version is known (and not registered unasked)
        self.shards_read: set[str] = set(state.shards_read) if state else set()
        self.shards_skipped: set[str] = set(state.shards_skipped) if state else set()

    def _build_models(self) -> checkpoints.TrainingState | None:
        """G and both Ds (DDP), the loss and the step; -> the checkpoint's state when resuming, else None.  On resume
        the checkpoint's architecture wins (the driver already refused a config whose model differs)."""
        cfg, device = self.cfg, self.device
        state = self._checkpoint_state()
        gcfg = GeneratorConfig.from_dict(state.generator_config) if state is not None \
            else generator_config(cfg.model.preset, cfg.model.overrides)
        g = ProUIGANGenerator(gcfg)
        # the weights validated, checkpointed as "generator" and registered: an average of G's, or G itself
        self.g_ema = copy.deepcopy(g).to(device).eval().requires_grad_(False) if cfg.train.ema_decay else None
        d_global, d_local = build_discriminators(cfg.model.preset)
        loss_weights = LossWeights(**cfg.loss.model_dump(exclude={"vgg_weights"}))
        vgg, self.vgg_msg = perceptual_network(loss_weights, cfg.loss.vgg_weights)
        if vgg is not None:
            vgg = vgg.to(device)
        if cfg.train.channels_last:
            channels_last(g, d_global, d_local)
        self.g, self.d_global, self.d_local = (ray.train.torch.prepare_model(m) for m in (g, d_global, d_local))
        amp, self.precision = autocast_dtype(device, cfg.train.bf16)
        self.step_fn = GANStep(self.g, self.d_global, self.d_local, loss_weights, cfg.train.lr_g, cfg.train.lr_d,
                               cfg.data.heatmap_sigma, amp_dtype=amp, vgg=vgg,
                               compile_mode=None if cfg.train.compile == "off" else cfg.train.compile)
        return state

    def _checkpoint_state(self) -> checkpoints.TrainingState | None:
        """The state to resume from: Ray Train's latest checkpoint, unless it is torn, then the newest complete one
        of the run (every rank reads the same folders, so all resume from the same step)."""
        ckpt = ray.train.get_checkpoint()
        run_dir = storage.join(self.cfg.train.storage, self.cfg.name)
        if ckpt is None:
            return None
        uri = storage.join(run_dir, Path(ckpt.path).name)
        why = checkpoints.torn(uri)
        if why is None:
            return checkpoints.load(uri)
        fallback, _ = checkpoints.newest_complete(run_dir)
        if self.rank == 0:
            print(f"[train] the checkpoint {uri} is torn ({why}); "
                  + (f"resuming from {fallback}" if fallback else "no complete checkpoint: starting anew"), flush=True)
        return checkpoints.load(fallback) if fallback else None

    def _restore(self, state: checkpoints.TrainingState | None) -> tuple[int, float]:
        """Weights and optimiser state from the checkpoint (or G from the model to fine-tune); -> (step, seconds
        trained before)."""
        if state is not None:
            for module, weights in ((self.g, state.trained_weights), (self.d_global, state.d_global),
                                    (self.d_local, state.d_local)):
                unwrap(module).load_state_dict(weights)
            if self.g_ema is not None:
                self.g_ema.load_state_dict(state.generator["generator"])
            self.step_fn.load_state_dict(state.optimizers)
            return state.step, state.elapsed_s
        if self.loop_config.get("init_generator") is not None:  # fine-tuning (retrain): G starts from a given model
            unwrap(self.g).load_state_dict(self.loop_config["init_generator"])
        if self.g_ema is not None:
            self.g_ema.load_state_dict(unwrap(self.g).state_dict())
        return 0, 0.0

    def _say_hello(self, state: checkpoints.TrainingState | None) -> None:
        if self.rank == 0:
            print(f"[train] {self.cfg.name}: {self.world} worker(s) on {self.device}; {self.vgg_msg}", flush=True)
            print(f"[train] precision: {self.precision}", flush=True)
            if state is not None:
                print(f"[train] resumed from step {self.start}", flush=True)
                if state.manifest_digest and state.manifest_digest != self.manifest_digest:
                    print(f"[train] note: steps up to {self.start} read dataset digest {state.manifest_digest[:16]}; "
                          f"from here on it reads {self.manifest.uri} (digest {self.manifest_digest[:16]})",
                          flush=True)
            elif self.loop_config.get("init_generator") is not None:
                print(f"[train] generator initialised from {self.loop_config.get('init_from')}", flush=True)
        # every worker says where it runs (the cluster test checks that workers spread over nodes)
        print(f"[train] worker world_rank={self.rank} of {self.world} on node "
              f"{ray.get_runtime_context().get_node_id()} pid {os.getpid()}", flush=True)

    def _train_batches(self, at_step: int):
        data = self.cfg.data.model_copy(update={"source_weights": self.mix})
        ds = FaceShards(self.manifest, "train", data, rank=self.rank, world_size=self.world,
                        seed=self.cfg.seed + at_step, epochs=None)
        n = self.cfg.data.reader_processes
        return iter(DataLoader(ds, batch_size=self.cfg.train.batch_size, num_workers=n, persistent_workers=n > 0))

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_loop

    def train_step(self, step: int) -> dict:
        """The schedules at this point of the run (learning rate, adversarial phase, source mix), one GAN step, and
        the clock that says how far the run is (the same on every rank)."""
        cfg, step_fn = self.cfg, self.step_fn
        if cfg.train.lr_schedule != "constant":
            factor = cosine_factor(self.done) if cfg.train.lr_schedule == "cosine" else warmup_cosine_factor(
                self.done, cfg.train.lr_warmup)
            for pg, lr0 in zip(step_fn.opt_g.param_groups, self.base_lr, strict=True):
                pg["lr"] = lr0 * factor
        step_fn.adversarial = cfg.loss.adversarial > 0 and self.done >= cfg.train.adversarial_start
        if (mix := cfg.data.mix_at(self.done)) != self.mix:
            self.mix = mix
            del self.loader  # its reader process ends here
            self.loader = self._train_batches(step)
            if self.rank == 0:
                print(f"[train] step {step:,}: the last {cfg.data.final_fraction:.0%} of the run reads the final "
                      f"mix {mix}", flush=True)
        try:
            raw = next(self.loader)
        except StopIteration:
            raise RuntimeError(f"no train face of {self.manifest.uri} could be read by worker {self.rank} (shards "
                               f"skipped: {', '.join(sorted(self.shards_skipped)) or 'none'})") from None
        self.shards_read.update(raw.pop("shard"))
        self.shards_skipped.update(n for names in raw.pop("skipped") for n in names.split(",") if n)
        batch = device_batch(raw, self.device, cfg, self.aug_rng)
        logs = step_fn.step(batch)
        if self.g_ema is not None:
            update_ema(self.g_ema, unwrap(self.g), min(cfg.train.ema_decay, (1 + step) / (10 + step)))
        if step == self.start + 1 and self.rank == 0 and cfg.train.compile != "off":
            print(f"[train] torch.compile ({cfg.train.compile}): " + ", ".join(
                f"{name} {fw.running}" for name, fw in step_fn.forwards.items()), flush=True)
        self.done = self.clock(step, self.elapsed())
        self.finished = step == cfg.train.steps or self.done >= 1.0
        self.samples_since_report += len(batch["lr"]) * self.world
        if self.printer is not None:
            self.printer.step(step, self.done, logs, step_fn.opt_g.param_groups[0]["lr"], self.elapsed(),
                              force=self.finished)
        if self.tracker is not None and (step % 10 == 0 or step == self.start + 1):
            self.tracker.log_metrics({f"train/{k}": float(v) for k, v in logs.items()}, step)
        return logs

    def due(self, step: int) -> tuple[bool, bool]:
        """(validate, checkpoint) at this step: on their rhythms, and both at the last step."""
        t = self.cfg.train
        return step % t.val_every == 0 or self.finished, step % t.checkpoint_every == 0 or self.finished

    def validate(self, step: int) -> dict:
        self.last_val = {**validate(self.served, self.val_loader, self.device, self.cfg.data.heatmap_sigma),
                         names.VAL_STEP: step}
        if self.printer is not None:
            self.printer.validation(step, self.last_val)
        return self.last_val

    @property
    def served(self):
        """The generator that is validated, checkpointed as "generator" and registered."""
        return self.g if self.g_ema is None else self.g_ema

    def shards(self) -> tuple[set[str], set[str]]:
        """(read, skipped) train shards of every worker (a collective: every rank calls it)."""
        mine = (sorted(self.shards_read), sorted(self.shards_skipped))
        if not (dist.is_available() and dist.is_initialized()):
            return set(mine[0]), set(mine[1])
        every: list = [None] * self.world
        dist.all_gather_object(every, mine)
        return {n for r, _ in every for n in r}, {n for _, k in every for n in k}

    def report(self, step: int, logs: dict, validated: bool, checkpoint: bool) -> None:
        """Every rank reports (Ray Train waits for all); rank 0 adds the checkpoint, which reaches storage before
        MLflow hears anything, and then hands metrics and the val grid to the background logger."""
        read, skipped = self.shards() if checkpoint else (set(), set())
        metrics = {**self.last_val, "step": step,
                   "samples_per_s": self.samples_since_report / max(time.time() - self.t_report, 1e-9),
                   **{f"train_{k}": float(v) for k, v in logs.items()}}
        self.t_report, self.samples_since_report = time.time(), 0
        if checkpoint and self.rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoints.write(Path(tmp), checkpoints.TrainingState(
                    step=step, generator=generator_state(self.served), d_global=_state(self.d_global),
                    d_local=_state(self.d_local), optimizers=self.step_fn.state_dict(),
                    config=self.loop_config["config"], elapsed_s=self.elapsed(), shards_read=sorted(read),
                    shards_skipped=sorted(skipped), manifest_digest=self.manifest_digest,
                    generator_raw=_state(self.g) if self.g_ema is not None else None))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"step_{step:07d}")
        else:
            ray.train.report(metrics)
        if checkpoint and self.tracker is not None:
            self.tracker.set_tags(data_tags(read, skipped))
        if self.tracker is not None and validated:
            # one name per metric in MLflow: the losses are logged as train/<loss> every 10 steps, not again here; a
            # Tune trial's validation scores are logged by its driver-side callback (search.py), not twice
            skip_val = self.loop_config.get("validation_logged")
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "step" and not k.startswith("train_")
                                      and not (skip_val and k.startswith("val_"))}, step)
            self.tracker.log_image(image_grid(self.served, self.grid_batch, self.device), "val_grid", step)

    def close(self, step: int) -> None:
        if self.system is not None:
            self.system.finish()
        if self.tracker is not None:
            note = self.tracker.close(timeout_s=30)
            if note:
                print(f"[train] {note}", flush=True)
        if self.rank == 0:
            print(f"[train] stopped at step {step:,} after {fmt_duration(self.elapsed())} of training "
                  f"(pid {os.getpid()})", flush=True)


def train_loop_per_worker(loop_config: dict) -> None:
    """Set up (or restore), then step by step: train, validate when due, report (with a checkpoint) when due."""
    run = WorkerRun(loop_config)
    step = run.start
    try:
        for step in range(run.start + 1, run.cfg.train.steps + 1):
            if run.finished:
                break
            logs = run.train_step(step)
            validating, checkpointing = run.due(step)
            if validating or (checkpointing and run.last_val is None):
                run.validate(step)
            if validating or checkpointing:
                run.report(step, logs, validated=validating, checkpoint=checkpointing)
    finally:
        run.close(step)
