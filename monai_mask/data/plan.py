"""Experiment plan: target spacing, intensity normalisation and patch size, from a fingerprint.

The rules follow nnU-Net's experiment planning in simplified form:

* target spacing: the median spacing per axis; for strongly anisotropic data (largest/smallest
  median spacing > 3) the coarse axis uses the 10th percentile instead, so thin structures are
  not lost;
* normalisation, one entry per modality (picked per case by the datalist's ``modality``): CT
  clips to the dataset's foreground 0.5/99.5 percentiles, then z-scores with the foreground
  mean/std; MR z-scores each image on its own (non-zero voxels);
* patch size: the median shape after resampling, rounded down to a multiple of ``divisor`` (the
  MAE patch size / CNN total stride), within ``[min_patch, max_patch]`` per axis.
"""

from __future__ import annotations

import numpy as np

from monai_mask.errors import InputError

__all__ = ["make_plan", "normalisation_for"]

PLAN_VERSION = 1


def _target_spacing(spacings: np.ndarray) -> list[float]:
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    if target[worst] > 3 * max(target[others].min(), 1e-6):
        target[worst] = np.percentile(spacings[:, worst], 10)
    return [round(float(s), 4) for s in target]


def _patch_size(shapes, spacings, target, divisor: int, min_patch: int, max_patch: int):
    physical = np.asarray(shapes, np.float64) * np.asarray(spacings, np.float64)
    median_vox = np.median(physical / np.asarray(target), axis=0)
    patch = []
    for v in median_vox:
        p = int(np.clip(v, min_patch, max_patch)) // divisor * divisor
        patch.append(max(p, min_patch))
    return patch


def normalisation_for(modality: str, stats: dict) -> dict:
    """Intensity normalisation scheme for one modality (JSON-ready)."""
    if modality == "CT":
        return {
            "scheme": "ct_clip_zscore",
            "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
            "mean": stats["mean"],
            "std": max(stats["std"], 1e-6),
        }
    return {"scheme": "mr_zscore_per_image", "nonzero": True}


def make_plan(
    fingerprint: dict,
    divisor: int = 16,
    min_patch: int = 32,
    max_patch: int = 128,
) -> dict:
    """Build ``plan.json`` content from ``dataset_fingerprint`` output.

    Args:
        fingerprint: the dict written to ``fingerprint.json``.
        divisor: patch sizes are multiples of this (MAE patch size or CNN total stride).
        min_patch, max_patch: bounds on each patch side, in voxels.
    """
    cases = fingerprint["cases"]
    if not cases:
        raise InputError("fingerprint.json", "no cases to plan from")
    modalities = [c["modality"] for c in cases]
    # the most frequent modality; ties go to the alphabetically first (CT before MR)
    main = min(set(modalities), key=lambda m: (-modalities.count(m), m))
    spacings = np.array([c["spacing"] for c in cases], np.float64)
    shapes = np.array([c["shape"] for c in cases], np.float64)
    target = _target_spacing(spacings)
    stats = fingerprint["foreground_intensity"]
    return {
        "plan_version": PLAN_VERSION,
        "modality": main,
        "mixed_modalities": sorted(set(modalities)) if len(set(modalities)) > 1 else [],
        "target_spacing": target,
        "normalisation": {m: normalisation_for(m, stats[m]) for m in sorted(set(modalities))},
        "patch_size": _patch_size(shapes, spacings, target, divisor, min_patch, max_patch),
        "patch_divisor": divisor,
        "preset": "ct" if main == "CT" else "mr",
    }
