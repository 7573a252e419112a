"""The project's words, each defined once: the occlusion kinds, the evaluation metrics and which way each is
better, the metrics a gate may decide on.  Pure Python: the CLI reads it while it parses a config."""

from __future__ import annotations

# occluders ``prouigan.occlusion`` draws; the face-aware ones need the face's 68 landmarks
OCCLUSION_KINDS = ("random_walk", "rectangle", "textured_rectangle", "sunglasses", "mask", "hand", "strokes")
NEEDS_LANDMARKS = frozenset({"sunglasses", "mask", "hand"})


def check_kinds(drawings: dict, where: str) -> None:
    """An occlusion implementation draws every kind of the vocabulary and nothing else: checked when its module is
    imported, so a kind added here alone fails at once, not at run time (or, worse, draws another kind)."""
    missing = [k for k in OCCLUSION_KINDS if k not in drawings]
    extra = sorted(set(drawings) - set(OCCLUSION_KINDS))
    if missing or extra:
        raise ImportError(f"{where}: occlusion kinds without a drawing: {missing}; drawings of no kind: {extra}")

# landmark-derived regions of the face (``prouigan.regions``)
REGIONS = ("eyes", "brows", "nose", "mouth", "skin")

# the face parser's classes (``prouigan.judges``): HELEN's 11 with left and right merged
PARSE_CLASSES = ("background", "skin", "brows", "eyes", "nose", "upper_lip", "inner_mouth", "lower_lip", "hair")
# the expression classifier's binary attributes, and the CelebA attribute each is labelled by
EXPRESSIONS = ("smiling", "mouth_open")
EXPRESSION_ATTRIBUTES = {"smiling": "Smiling", "mouth_open": "Mouth_Slightly_Open"}

# every metric an evaluation reports -> "max" (higher is better) or "min" (lower is better)
METRICS: dict[str, str] = {
    "psnr": "max", "ssim": "max", "psnr_occluded": "max", "nme": "min", "prior_nme": "min",
    "identity_distance": "min", "match_rate": "max", **{f"region_psnr_{r}": "max" for r in REGIONS},
    "parse_f1": "max", **{f"parse_f1_{c}": "max" for c in PARSE_CLASSES if c != "background"},
    "expression_accuracy": "max", **{f"expression_accuracy_{e}": "max" for e in EXPRESSIONS},
}
# the ones a champion gate may decide on (``eval.gate_metrics``)
GATE_METRICS = ("psnr", "ssim", "psnr_occluded", "nme", "identity_distance", "match_rate", "parse_f1",
                "expression_accuracy")
# what a training's validation measures on its val faces (reported as ``val_<name>``), the model's and bicubic's
VALIDATION_METRICS = ("psnr", "ssim", "psnr_occluded", "nme", "bicubic_psnr", "bicubic_ssim", "bicubic_psnr_occluded")
# the ones a loss-weight search may maximise (``tune.metric``): training's validation scores
SEARCH_METRICS = ("val_psnr", "val_psnr_occluded", "val_ssim")
