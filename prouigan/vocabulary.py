"""The project's words, each defined once: the occlusion kinds, the evaluation metrics and which way each is
better, the metrics a gate may decide on.  Pure Python: the CLI reads it while it parses a config."""

from __future__ import annotations

# occluders ``prouigan.occlusion`` draws; the face-aware ones need the face's 68 landmarks
OCCLUSION_KINDS = ("random_walk", "rectangle", "textured_rectangle", "sunglasses", "mask", "hand", "strokes")
NEEDS_LANDMARKS = frozenset({"sunglasses", "mask", "hand"})

# landmark-derived regions of the face (``prouigan.regions``)
REGIONS = ("eyes", "brows", "nose", "mouth", "skin")

# every metric an evaluation reports -> "max" (higher is better) or "min" (lower is better)
METRICS: dict[str, str] = {
    "psnr": "max", "ssim": "max", "psnr_occluded": "max", "nme": "min", "prior_nme": "min",
    "identity_distance": "min", "match_rate": "max", **{f"region_psnr_{r}": "max" for r in REGIONS},
}
# the ones a champion gate may decide on (``eval.gate_metrics``)
GATE_METRICS = ("psnr", "ssim", "psnr_occluded", "nme", "identity_distance", "match_rate")
# the ones a loss-weight search may maximise (``tune.metric``): training's validation scores
SEARCH_METRICS = ("val_psnr", "val_psnr_occluded", "val_ssim")
