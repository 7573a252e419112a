"""Occlusion and degradation for a whole batch at once, in torch, on the batch's device.

The per-sample version (``prouigan.occlusion`` + ``prouigan.degradation``, numpy and Pillow in DataLoader
processes) makes ~265 examples/s per CPU core; a GPU step eats thousands.  This module draws the same kinds with
the same parameter distributions, hitting the same target coverage, as implicit shapes on a pixel grid: every
sample of the batch at once, a fixed number of kernels per batch, no host sync.  The random streams differ from
numpy's, so the same seed does not give the same pixels; what matches is the distribution (kinds, coverage,
where the face-aware kinds land: tested against the per-sample version) and, exactly, the degradation of a
given occluded face (``degrade_batch`` is ``degrade`` batched).
"""

from __future__ import annotations

import math

import torch

from prouigan.degradation import downsample
from prouigan.ibug import LEFT_EYE, MOUTH, RIGHT_EYE
from prouigan.occlusion import KINDS, MASK_COLOURS, NEEDS_LANDMARKS, SKIN
from prouigan.vocabulary import check_kinds


def _u(g: torch.Generator, n: int, lo, hi, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _grid(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres as Pillow rasterises them: (1, H, W) y and x."""
    yy, xx = torch.meshgrid(torch.arange(size, device=device, dtype=torch.float32),
                            torch.arange(size, device=device, dtype=torch.float32), indexing="ij")
    return yy[None], xx[None]


def _ellipse(yy, xx, c, rx, ry, angle):
    """(B, H, W): inside the ellipse of centre c (B, 2) (x, y), radii rx, ry (B,), rotated by angle (B,)."""
    dx, dy = xx - c[:, 0, None, None], yy - c[:, 1, None, None]
    ca, sa = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    return (u / rx[:, None, None].clamp_min(1e-3)) ** 2 + (v / ry[:, None, None].clamp_min(1e-3)) ** 2 <= 1


def _dist2(yy, xx, a, b):
    """(B, H, W): squared distance of every pixel to the segment a-b (both (B, 2))."""
    ab = b - a
    px, py = xx - a[:, 0, None, None], yy - a[:, 1, None, None]
    denom = (ab ** 2).sum(1).clamp_min(1e-6)[:, None, None]
    t = ((px * ab[:, 0, None, None] + py * ab[:, 1, None, None]) / denom).clamp(0, 1)
    dx, dy = px - t * ab[:, 0, None, None], py - t * ab[:, 1, None, None]
    return dx * dx + dy * dy


def _capsule(yy, xx, a, b, width):
    """(B, H, W): within width/2 of the segment a-b."""
    return _dist2(yy, xx, a, b) <= (width[:, None, None] / 2) ** 2


def _bisect(draw, target: torch.Tensor, lo: float, hi: float, iters: int = 9) -> torch.Tensor:
    """Per sample, the mask of draw(scale (B,)) whose coverage is closest to target, scale bisected in [lo, hi]."""
    lo_t, hi_t = torch.full_like(target, lo), torch.full_like(target, hi)
    best, best_err = None, torch.full_like(target, math.inf)
    for _ in range(iters):
        mid = 0.5 * (lo_t + hi_t)
        m = draw(mid)
        cov = m.flatten(1).float().mean(1)
        err = (cov - target).abs()
        better = err < best_err
        best = m if best is None else torch.where(better[:, None, None], m, best)
        best_err = torch.where(better, err, best_err)
        lo_t, hi_t = torch.where(cov < target, mid, lo_t), torch.where(cov < target, hi_t, mid)
    return best


def _rectangle(g, target, size, yy, xx):
    n, dev = len(target), target.device
    area = target * size * size
    aspect = _u(g, n, 0.5, 2.0, dev)
    w = torch.clamp(torch.sqrt(area * aspect), max=size).round()
    h = torch.clamp(area / w.clamp_min(1), max=size).round()
    x = torch.floor(torch.rand(n, generator=g, device=dev) * (size - w + 1))
    y = torch.floor(torch.rand(n, generator=g, device=dev) * (size - h + 1))
    return ((xx >= x[:, None, None]) & (xx < (x + w)[:, None, None])
            & (yy >= y[:, None, None]) & (yy < (y + h)[:, None, None]))


def _texture(g, n, size, yy, xx, dev):
    c0, c1 = torch.rand(n, 3, generator=g, device=dev), torch.rand(n, 3, generator=g, device=dev)
    kind = torch.randint(0, 3, (n,), generator=g, device=dev)
    a, f = _u(g, n, 0, math.pi, dev), _u(g, n, 0.15, 0.6, dev)
    stripes = torch.sin((xx * torch.cos(a)[:, None, None] + yy * torch.sin(a)[:, None, None]) * f[:, None, None]) > 0
    s = torch.randint(4, 16, (n,), generator=g, device=dev).float()[:, None, None]
    checks = ((torch.div(xx, s, rounding_mode="floor") + torch.div(yy, s, rounding_mode="floor")) % 2) > 0
    sb = torch.randint(4, 12, (n,), generator=g, device=dev).float()[:, None, None]
    cells = torch.rand(n, size // 4 + 1, size // 4 + 1, generator=g, device=dev)  # enough cells for s >= 4
    iy, ix = torch.div(yy, sb, rounding_mode="floor").long(), torch.div(xx, sb, rounding_mode="floor").long()
    blocky = cells.flatten(1).gather(1, (iy * cells.shape[2] + ix).flatten(1)).view(n, size, size)
    t = torch.where(kind[:, None, None] == 0, stripes.float(),
                    torch.where(kind[:, None, None] == 1, checks.float(), blocky))
    return c0[:, :, None, None] * (1 - t[:, None]) + c1[:, :, None, None] * t[:, None]


def _shaded(g, n, size, base, dev):
    """(B, 3, H, W): base colour (B, 3) under a vertical gradient and faint noise (as the per-sample fill)."""
    yy = torch.linspace(-1, 1, size, device=dev)[None, None, :, None]
    grad = 1 + _u(g, n, -0.25, 0.25, dev)[:, None, None, None] * yy
    noise = 0.02 * torch.randn(n, 1, size, size, generator=g, device=dev)
    return (base[:, :, None, None] * grad + noise).clamp(0, 1)


def _random_walk(g, target, size, max_chunks: int = 160):
    """The brush random walk: the whole path is drawn at once; each pixel keeps the first path index that covers
    it, and the walk stops at the first 16-step chunk whose prefix reaches the target coverage."""
    n, dev = len(target), target.device
    r = _u(g, n, 3, 6, dev)
    pos = _u(g, 2 * n, 0.3, 0.7, dev).view(n, 2) * size
    heading = _u(g, n, 0, 2 * math.pi, dev)
    steps = max_chunks * 16
    theta = heading[:, None] + torch.cumsum(0.6 * torch.randn(n, steps, generator=g, device=dev), 1)
    step = torch.stack([torch.cos(theta), torch.sin(theta)], 2) * (r * 0.6)[:, None, None]
    path = pos[:, None] + torch.cumsum(step, 1)
    period = 2 * (size - 1)  # reflect at the borders: a triangle wave keeps the walk on the face
    path = (size - 1) - ((path % period) - (size - 1)).abs()
    idx = path.round().long().clamp(0, size - 1)
    flat = idx[..., 1] * size + idx[..., 0]  # (B, T)
    big = torch.full((n, size * size), steps, device=dev, dtype=torch.long)
    order = torch.arange(steps, device=dev).expand(n, steps)
    first = big.scatter_reduce(1, flat, order, reduce="amin").view(n, size, size)
    # dilate by the brush disc: a pixel is hit at the earliest index of any path point within r
    hit = torch.full_like(first, steps)
    rmax = 6
    for dy in range(-rmax, rmax + 1):
        for dx in range(-rmax, rmax + 1):
            if dy * dy + dx * dx > rmax * rmax:
                continue
            inside = (dy * dy + dx * dx) <= r * r  # (B,): this offset is inside each sample's brush
            shifted = torch.full_like(first, steps)
            ys, yd = slice(max(0, dy), size + min(0, dy)), slice(max(0, -dy), size + min(0, -dy))
            xs, xd = slice(max(0, dx), size + min(0, dx)), slice(max(0, -dx), size + min(0, -dx))
            shifted[:, yd, xd] = first[:, ys, xs]
            hit = torch.minimum(hit, torch.where(inside[:, None, None], shifted, steps))
    # coverage after each chunk; the first chunk end that reaches the goal (the last if none does)
    ends = torch.arange(16, steps + 1, 16, device=dev)  # (C,)
    counts = torch.zeros(n, steps + 1, device=dev).scatter_add_(1, hit.flatten(1),
                                                                torch.ones(n, size * size, device=dev))
    covered = torch.cumsum(counts, 1)[:, ends - 1]  # pixels with hit index < end
    goal = target * size * size
    reached = covered >= goal[:, None]
    chunk = torch.where(reached.any(1), reached.float().argmax(1), torch.full_like(goal, len(ends) - 1).long())
    limit = ends[chunk]
    m = hit < limit[:, None, None]
    return m & (goal > 0)[:, None, None]


def _strokes(g, target, size, yy, xx, max_strokes: int = 24):
    """Thick polylines added one by one until the target is reached; the last is narrowed (halved, up to three
    times) when it would overshoot by much, as the per-sample version does."""
    n, dev = len(target), target.device
    goal = target * size * size
    npts = torch.randint(3, 7, (n, max_strokes), generator=g, device=dev)
    p0 = torch.rand(n, max_strokes, 2, generator=g, device=dev) * size
    jumps = torch.randn(n, max_strokes, 5, 2, generator=g, device=dev) * (size * 0.18)
    pts = [p0]
    for i in range(5):
        pts.append((pts[-1] + jumps[:, :, i]).clamp(0, size - 1))
    pts = torch.stack(pts, 2)  # (B, S, 6, 2)
    width = _u(g, n * max_strokes, 4, 14, dev).view(n, max_strokes)

    m = torch.zeros(n, size, size, dtype=torch.bool, device=dev)
    for s in range(max_strokes):
        d2 = torch.full((n, size, size), math.inf, device=dev)  # the stroke's distance field: any width at once
        for j in range(5):
            seg = _dist2(yy, xx, pts[:, s, j], pts[:, s, j + 1])
            d2 = torch.where((j + 1 < npts[:, s])[:, None, None], torch.minimum(d2, seg), d2)
        active = m.flatten(1).sum(1) < goal
        w = width[:, s]
        for _ in range(3):  # narrow where the stroke would overshoot the target by much
            over = ((m | (d2 <= (w[:, None, None] / 2) ** 2)).flatten(1).sum(1) > goal * 1.08 + 16) & (w > 2)
            w = torch.where(over, w / 2, w)
        m = m | ((d2 <= (w[:, None, None] / 2) ** 2) & active[:, None, None])
    return m


def _eye_frame(lm):
    cl, cr = lm[:, LEFT_EYE].mean(1), lm[:, RIGHT_EYE].mean(1)
    axis = cr - cl
    d = axis.norm(dim=1) + 1e-6
    return cl, cr, axis / d[:, None], d


def _sunglasses(g, target, yy, xx, lm):
    n, dev = len(target), target.device
    cl, cr, u, d = _eye_frame(lm)
    ang = torch.atan2(u[:, 1], u[:, 0])
    shape = _u(g, n, 0.7, 1.0, dev)

    def draw(s):
        rx, ry = 0.34 * d * s, 0.27 * d * s * shape
        w = (0.05 * d * s).floor().clamp_min(1)
        m = _ellipse(yy, xx, cl, rx, ry, ang) | _ellipse(yy, xx, cr, rx, ry, ang)
        m |= _capsule(yy, xx, cl + u * (rx * 0.8)[:, None], cr - u * (rx * 0.8)[:, None], w)
        for c, sgn in ((cl, -1.0), (cr, 1.0)):
            m |= _capsule(yy, xx, c + sgn * u * rx[:, None], c + sgn * u * (rx + 0.8 * d)[:, None], w)
        return m

    return _bisect(draw, target, 0.2, 6.0)


def _convex_hull(points: torch.Tensor) -> torch.Tensor:
    """(B, K, 2) -> (B, K, 2) hull vertices in order by gift wrapping, padded by repeating the first vertex."""
    n, k, _ = points.shape
    start = torch.argmin(points[..., 0] * 1e4 + points[..., 1], 1)  # leftmost (then lowest) point
    cur = start
    out = []
    done = torch.zeros(n, dtype=torch.bool, device=points.device)
    ar = torch.arange(n, device=points.device)
    for _ in range(k):
        p = points[ar, cur]
        out.append(torch.where(done[:, None], points[ar, start], p))
        rel = points - p[:, None]
        # the next vertex q: no point lies to the right of p->q (cross < 0); ties go to the farthest
        cross = rel[:, :, None, 0] * rel[:, None, :, 1] - rel[:, :, None, 1] * rel[:, None, :, 0]  # (B, q, r)
        dist = (rel ** 2).sum(2)
        ok = (cross >= -1e-3).all(2) & (dist > 1e-9)
        score = torch.where(ok, dist, torch.full_like(dist, -1.0))
        nxt = score.argmax(1)
        done = done | (nxt == start)
        cur = nxt
    return torch.stack(out, 1)


def _inside_convex(yy, xx, poly):
    """(B, H, W): inside the convex polygon (B, K, 2) whose vertices go counter-clockwise in y-down pixels
    (repeated vertices are harmless)."""
    a, b = poly, poly.roll(-1, 1)
    e = b - a
    cross = (e[:, :, 0, None, None] * (yy[:, None] - a[:, :, 1, None, None])
             - e[:, :, 1, None, None] * (xx[:, None] - a[:, :, 0, None, None]))
    return (cross >= 0).all(1) | (cross <= 0).all(1)


def _face_mask(g, target, yy, xx, lm):
    centre = lm[:, MOUTH].mean(1)
    width = lm[:, 14] - lm[:, 2]
    nose = lm[:, 29]
    base = torch.cat([lm[:, 2:15], (nose + width * 0.25)[:, None], (nose - width * 0.25)[:, None],
                      centre[:, None] + (lm[:, 48:60] - centre[:, None]) * 1.3], 1)
    hull = _convex_hull(base)

    def draw(s):
        return _inside_convex(yy, xx, centre[:, None] + (hull - centre[:, None]) * s[:, None, None])

    return _bisect(draw, target, 0.2, 4.0)


def _hand(g, target, yy, xx, lm):
    n, dev = len(target), target.device
    anchors = torch.stack([lm[:, LEFT_EYE].mean(1), lm[:, RIGHT_EYE].mean(1), lm[:, MOUTH].mean(1), lm[:, 3],
                           lm[:, 13], lm[:, 30]], 1)
    pick = torch.randint(0, 6, (n,), generator=g, device=dev)
    c = anchors[torch.arange(n, device=dev), pick] + 4 * torch.randn(n, 2, generator=g, device=dev)
    a = _u(g, n, 0, 2 * math.pi, dev)
    u = torch.stack([torch.cos(a), torch.sin(a)], 1)
    v = torch.stack([-torch.sin(a), torch.cos(a)], 1)
    spread = _u(g, n, 0.8, 1.2, dev)

    def draw(s):
        palm = 14 * s
        m = _ellipse(yy, xx, c, palm, palm * 0.85, a)
        for i, off in enumerate((-0.75, -0.25, 0.25, 0.75)):
            base = c + u * (palm * 0.7)[:, None] + v * (off * palm * spread)[:, None]
            length = palm * (1.1 if i in (1, 2) else 0.9)
            m |= _capsule(yy, xx, base, base + u * length[:, None], palm * 0.42)
        base = c - v * (palm * 0.9)[:, None]
        m |= _capsule(yy, xx, base, base + (u * 0.5 - v * 0.9) * (palm * 0.9)[:, None], palm * 0.45)
        return m

    return _bisect(draw, target, 0.05, 8.0)


def _draw_sunglasses(g, t, lm, n, size, yy, xx, dev):
    m = _sunglasses(g, t, yy, xx, lm)
    return m, _shaded(g, n, size, 0.15 * torch.rand(n, 3, generator=g, device=dev), dev)


def _draw_mask(g, t, lm, n, size, yy, xx, dev):
    colours = torch.tensor(MASK_COLOURS, device=dev)
    base = colours[torch.randint(0, len(colours), (n,), generator=g, device=dev)]
    return _face_mask(g, t, yy, xx, lm), _shaded(g, n, size, base, dev)


def _draw_hand(g, t, lm, n, size, yy, xx, dev):
    skin = torch.tensor(SKIN, dtype=torch.float32, device=dev)
    base = skin[torch.randint(0, len(skin), (n,), generator=g, device=dev)]
    return _hand(g, t, yy, xx, lm), _shaded(g, n, size, base, dev)


# kind -> (generator, targets, landmarks, n, size, grid rows, grid columns, device) -> (masks, fills) for n faces:
# each kind of the vocabulary drawn once, in the order its random numbers are taken
DRAW = {
    "rectangle": lambda g, t, lm, n, size, yy, xx, dev: (
        _rectangle(g, t, size, yy, xx), torch.rand(n, 3, generator=g, device=dev)[:, :, None, None]),
    "textured_rectangle": lambda g, t, lm, n, size, yy, xx, dev: (
        _rectangle(g, t, size, yy, xx), _texture(g, n, size, yy, xx, dev)),
    "random_walk": lambda g, t, lm, n, size, yy, xx, dev: (
        _random_walk(g, t, size), torch.rand(n, 3, size, size, generator=g, device=dev)),
    "strokes": lambda g, t, lm, n, size, yy, xx, dev: (
        _strokes(g, t, size, yy, xx), torch.rand(n, 3, generator=g, device=dev)[:, :, None, None]),
    "sunglasses": _draw_sunglasses,
    "mask": _draw_mask,
    "hand": _draw_hand,
}
check_kinds(DRAW, __name__)


def synthesize_batch(g: torch.Generator, landmarks: torch.Tensor, has_landmarks: torch.Tensor,
                     kinds=KINDS, coverage: tuple[float, float] = (0.1, 0.35), probability: float = 1.0,
                     size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One random occlusion per face: (mask (B, 1, H, W) float in {0, 1}, fill (B, 3, H, W), kind index (B,) into
    ``KINDS``, -1 where a face drew no occlusion).  Faces without landmarks draw only from the kinds that need
    none, and stay clear (-1) where every kind needs landmarks: the batch trains on, nothing is dropped (the
    per-sample reader skips such a face with a warning instead).  ``g`` is a torch.Generator on the landmarks'
    device."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown occlusion kind(s) {unknown}; known: {', '.join(KINDS)}")
    plain = [k for k in kinds if k not in NEEDS_LANDMARKS]
    n, dev = len(landmarks), landmarks.device
    lm = landmarks.float()
    yy, xx = _grid(size, dev)
    # the kind: uniform over the usable ones, as the per-sample version draws it
    all_idx = torch.tensor([KINDS.index(k) for k in kinds], device=dev)
    plain_idx = torch.tensor([KINDS.index(k) for k in plain] or [0], device=dev)
    pick_all = all_idx[torch.randint(0, len(all_idx), (n,), generator=g, device=dev)]
    pick_plain = plain_idx[torch.randint(0, len(plain_idx), (n,), generator=g, device=dev)]
    kind = torch.where(has_landmarks.to(dev), pick_all, pick_plain)
    target = _u(g, n, coverage[0], coverage[1], dev)
    occluded = torch.rand(n, generator=g, device=dev) < probability
    if not plain:
        occluded &= has_landmarks.to(dev)
    kind = torch.where(occluded, kind, torch.full_like(kind, -1))

    mask = torch.zeros(n, size, size, dtype=torch.bool, device=dev)
    fill = torch.zeros(n, 3, size, size, device=dev)
    for name in kinds:
        sel = kind == KINDS.index(name)
        # on a GPU every kind is drawn for the whole batch and selected (no host sync); on CPU only where chosen.
        # Faces without landmarks (zeros) compute harmless shapes for the face-aware kinds, never selected.
        i = sel.nonzero().flatten() if dev.type == "cpu" else torch.arange(n, device=dev)
        if len(i) == 0:
            continue
        m_ = len(i)
        m, f = DRAW[name](g, target[i], lm[i], m_, size, yy, xx, dev)
        keep = sel[i][:, None, None]
        mask[i] = torch.where(keep, m, mask[i])
        fill[i] = torch.where(keep[:, None], f.expand(m_, 3, size, size), fill[i])
    return mask[:, None].float(), fill, kind


def degrade_batch(hr: torch.Tensor, g: torch.Generator | None = None, noise_std: float = 0.0) -> torch.Tensor:
    """``degrade`` for a batch (B, 3, 128, 128) on its device: antialiased bicubic 1/8, then gaussian noise.
    The JPEG round trip has no device version: a config with ``jpeg_quality`` keeps the per-sample path."""
    lr = downsample(hr)
    if noise_std > 0:
        lr = (lr + noise_std * torch.randn(lr.shape, generator=g, device=lr.device)).clamp(0, 1)
    return lr


def occlude_and_degrade(batch: dict, g: torch.Generator, kinds=KINDS, coverage=(0.1, 0.35), probability=1.0,
                        noise_std: float = 0.0) -> dict:
    """A training batch of clean faces (hr, landmarks, has_landmarks) -> the same with lr and mask, made on the
    batch's device."""
    hr = batch["hr"]
    mask, fill, _ = synthesize_batch(g, batch["landmarks"], batch["has_landmarks"], kinds, coverage, probability,
                                     hr.shape[-1])
    occluded = hr * (1 - mask) + fill * mask
    return {**batch, "lr": degrade_batch(occluded, g, noise_std), "mask": mask}
