"""One adversarial training step of generator + global and local discriminators, in plain PyTorch.

The Ray Train worker wraps the modules in DDP and calls ``GANStep.step`` per batch; tests call it
directly.  Batches are dicts of tensors:
  lr (B,3,16,16), hr (B,3,128,128) in [0,1]; landmarks (B,68,2) face pixels; has_landmarks (B,) bool.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext

import torch
from torch import nn

from prouigan.discriminators import local_crop_boxes
from prouigan.generator import unwrap
from prouigan.landmarks import heatmaps
from prouigan.losses import LossWeights, VGGFeatures, discriminator_loss, generator_loss


def cosine_factor(progress: float, floor: float = 0.02) -> float:
    """Learning-rate multiplier at ``progress`` (0..1) of a run: cosine from 1 down to ``floor``."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def warmup_cosine_factor(progress: float, warmup: float, floor: float = 0.02) -> float:
    """One cycle: linear from ``floor`` up to 1 over the first ``warmup`` of the run, then cosine down to ``floor``."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return floor + (1 - floor) * progress / warmup
    return cosine_factor((progress - warmup) / (1 - warmup), floor)


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bf16 natively (oneDNN finds its bf16 instructions: AVX512-BF16, AMX): detected, never
    assumed."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, bf16: bool) -> tuple[torch.dtype | None, str]:
    """(the dtype G and both Ds run in under autocast, or None for fp32; a line saying which and why).  Parameters,
    optimizer state and every loss stay fp32 either way."""
    if not bf16:
        return None, "fp32 (train.bf16=false)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16 autocast on the GPU (losses and optimizer state fp32)"
        return None, "fp32: this GPU has no bf16"
    if device.type == "cpu":
        if cpu_bf16_supported():
            return torch.bfloat16, "bf16 autocast on the CPU, found to have bf16 instructions (losses, optimizer fp32)"
        return None, "fp32: this CPU has no bf16 instructions (oneDNN finds none)"
    return None, f"fp32 on {device.type}"


def adam(params, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam with the fused kernel for CUDA parameters, the multi-tensor (foreach) one otherwise."""
    params = list(params)
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.Adam(params, lr=lr, betas=betas, **({"fused": True} if on_cuda else {"foreach": True}))


class Compiled:
    """``fn`` through ``torch.compile(mode=...)``, falling back to ``fn`` itself when compiling fails.

    torch.compile fails lazily, on the first call (no C++ compiler, no Triton, an op Inductor cannot lower):
    that call warns once and runs eager, and so does every later one.  An error after the compiled path has run
    once is a real error and is raised.  ``mode=None`` is plain eager.
    """

    def __init__(self, fn, mode: str | None, name: str = "module", backend: str = "inductor"):
        self.fn, self.name = fn, name
        self.compiled = None if mode is None else torch.compile(fn, mode=None if mode == "default" else mode,
                                                                backend=backend)
        self.proven = False  # the compiled path has returned once
        self.fallback_reason: str | None = None

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                out = self.compiled(*args, **kwargs)
                self.proven = True
                return out
            except Exception as e:
                if self.proven:
                    raise
                self.compiled = None
                self.fallback_reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                warnings.warn(f"torch.compile of the {self.name} failed, running it eager: {self.fallback_reason}",
                              RuntimeWarning, stacklevel=2)
        return self.fn(*args, **kwargs)

    @property
    def running(self) -> str:
        """What runs now: 'eager', 'compiled' or 'compiled (not run yet)'."""
        if self.compiled is None:
            return "eager"
        return "compiled" if self.proven else "compiled (not run yet)"


def channels_last(*modules: nn.Module) -> None:
    """Convolution weights in NHWC, the layout cuDNN's tensor-core kernels read without a transpose."""
    for m in modules:
        m.to(memory_format=torch.channels_last)


def channels_last_batch(batch: dict) -> dict:
    """The batch with its images (lr, hr) in NHWC, to match ``channels_last`` modules."""
    return {**batch, **{k: batch[k].contiguous(memory_format=torch.channels_last) for k in ("lr", "hr")}}


def crop_boxes(batch: dict) -> torch.Tensor:
    """Local-discriminator boxes: on an eye or the mouth where a face has landmarks, at random where it has not."""
    lm, has_lm = batch["landmarks"], batch.get("has_landmarks")
    boxes = local_crop_boxes(lm, len(lm))
    if has_lm is None:
        return boxes
    random = local_crop_boxes(None, len(lm)).to(boxes.device)
    return torch.where(has_lm.to(boxes.device)[:, None], boxes, random)  # per face, without asking the device


class GANStep:
    """``step(batch)`` -> the step's losses as detached 0-d tensors: nothing in the step waits for the device, so
    a GPU is never idle on the host; convert (``float``) only what is printed or logged."""

    def __init__(self, generator: nn.Module, d_global: nn.Module, d_local: nn.Module, weights: LossWeights,
                 lr_g: float = 2e-4, lr_d: float = 1e-4, heatmap_sigma: float = 1.5,
                 amp_dtype: torch.dtype | None = None, vgg: VGGFeatures | None = None, grad_clip: float = 1.0,
                 compile_mode: str | None = None, compile_backend: str = "inductor"):
        self.g, self.d_global, self.d_local = generator, d_global, d_local
        # the forwards the step runs, compiled when asked (the modules themselves stay as given: their state
        # dicts, DDP wrappers and optimizers do not change); G's side judges through the bare discriminators
        self.forwards = {name: Compiled(m, compile_mode, name, compile_backend) for name, m in (
            ("generator", generator), ("global discriminator", d_global), ("local discriminator", d_local),
            ("bare global discriminator", unwrap(d_global)), ("bare local discriminator", unwrap(d_local)))}
        self.weights, self.sigma, self.vgg = weights, heatmap_sigma, vgg
        self.opt_g = adam(generator.parameters(), lr_g, (0.9, 0.99))
        self.opt_d = adam([*d_global.parameters(), *d_local.parameters()], lr_d, (0.5, 0.99))
        self.amp_dtype = amp_dtype
        self.adversarial = weights.adversarial > 0
        self.grad_clip = grad_clip  # max gradient norm of G and of the Ds (0: off)

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype)

    def targets(self, batch: dict) -> list[torch.Tensor]:
        """Ground-truth heatmaps at each stage's prior resolution; zero weight where landmarks are missing."""
        return [heatmaps(batch["landmarks"], r, self.sigma) for r in (16, 32, 64)]

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        lr, hr = batch["lr"], batch["hr"]
        has_lm = batch.get("has_landmarks")
        boxes = crop_boxes(batch)
        fw = self.forwards
        with self._autocast(hr.device):
            out = fw["generator"](lr)
        # discriminators first, on this step's fakes (detached)
        logs: dict[str, torch.Tensor] = {}
        if self.adversarial:
            self.opt_d.zero_grad(set_to_none=True)
            with self._autocast(hr.device):
                d_total, d_terms = discriminator_loss(fw["global discriminator"], fw["local discriminator"], hr,
                                                      out.final.float(), boxes)
            d_total.backward()
            if self.grad_clip:
                nn.utils.clip_grad_norm_([*self.d_global.parameters(), *self.d_local.parameters()], self.grad_clip,
                                         foreach=True)
            self.opt_d.step()
            logs.update({k: v.detach() for k, v in d_terms.items()})
        self.opt_g.zero_grad(set_to_none=True)
        targets = self.targets(batch) if out.heatmaps else []
        if targets and has_lm is not None:  # zero weight where a face has no landmarks (a multiply: no sync)
            keep = has_lm.view(-1, 1, 1, 1).to(targets[0].dtype)
            out.heatmaps = [h * keep for h in out.heatmaps]
            targets = [t * keep for t in targets]
        with self._autocast(hr.device):
            # the G side judges through the bare discriminators: under DDP their wrappers would expect
            # gradients for D's own (frozen here) parameters
            total, terms = generator_loss(
                out, hr, targets, self.weights,
                fw["bare global discriminator"] if self.adversarial else None,
                fw["bare local discriminator"] if self.adversarial else None, boxes, self.vgg)
        # D's parameters get no grad from the G step
        for d in (self.d_global, self.d_local):
            d.requires_grad_(False)
        total.backward()
        for d in (self.d_global, self.d_local):
            d.requires_grad_(True)
        if self.grad_clip:
            logs["g_grad_norm"] = nn.utils.clip_grad_norm_(self.g.parameters(), self.grad_clip, foreach=True).detach()
        self.opt_g.step()
        logs.update({k: v.detach() for k, v in terms.items()})
        logs["g_total"] = total.detach()
        return logs

    def state_dict(self) -> dict:
        return {"opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
