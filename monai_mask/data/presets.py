"""MONAI transform chains built from ``plan.json`` (the CT and MR presets).

The plan fixes the target spacing, the intensity normalisation per modality and the patch size;
these functions turn it into MONAI ``Compose`` pipelines for pretraining and fine-tuning. Every
datalist entry carries its ``modality`` ("CT" or "MR"), so a mixed CT+MR dataset is normalised per
case with the scheme of its own modality.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensity,
    Orientationd,
    RandSpatialCropSamplesd,
    ScaleIntensityRange,
    SelectItemsd,
    Spacingd,
    SpatialPadd,
)

from monai_mask.errors import ConfigError

__all__ = ["load_plan", "PlanNormalized", "load_transforms", "pretrain_transforms"]


def load_plan(plan: str | Path | Mapping) -> dict:
    """The plan as a dict (from a ``plan.json`` path or an already-loaded mapping)."""
    if isinstance(plan, Mapping):
        return dict(plan)
    path = Path(plan)
    if not path.is_file():
        raise ConfigError(f"{path}: plan file not found (run `monai-mask prepare` first)")
    return json.loads(path.read_text())


class PlanNormalized(MapTransform):
    """Normalise intensities with the plan's scheme for the case's modality.

    CT (``ct_clip_zscore``): clip to the foreground percentiles, then z-score with the foreground
    mean/std, one affine map (MONAI ``ScaleIntensityRange`` with ``clip=True``). MR
    (``mr_zscore_per_image``): z-score each image on its non-zero voxels (``NormalizeIntensity``).

    Args:
        keys: image keys.
        normalisation: ``plan["normalisation"]``, a dict per modality.
        modality_key: key of the case's modality in the data dict; missing means ``default``.
        default: modality used when the data dict has none.
    """

    def __init__(self, keys: KeysCollection, normalisation: Mapping[str, Mapping],
                 modality_key: str = "modality", default: str | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality_key = modality_key
        self.default = default or next(iter(normalisation))
        self.ops = {m: self._op(n) for m, n in normalisation.items()}

    @staticmethod
    def _op(norm: Mapping):
        if norm["scheme"] == "ct_clip_zscore":
            lo, hi = norm["clip"]
            mean, std = norm["mean"], norm["std"]
            return ScaleIntensityRange(lo, hi, (lo - mean) / std, (hi - mean) / std, clip=True)
        if norm["scheme"] == "mr_zscore_per_image":
            return NormalizeIntensity(nonzero=bool(norm.get("nonzero", True)), channel_wise=True)
        raise ConfigError(f"unknown normalisation scheme {norm['scheme']!r} in plan")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        modality = str(d.get(self.modality_key, self.default)).upper()
        if modality not in self.ops:
            raise ConfigError(f"case modality {modality} has no normalisation in the plan "
                              f"(plan has {sorted(self.ops)}); re-run prepare on all the data")
        for key in self.key_iterator(d):
            d[key] = self.ops[modality](d[key])
        return d


def load_transforms(plan: Mapping, image_keys: Sequence[str] = ("image",),
                    label_keys: Sequence[str] = (), raw_key: str | None = None) -> list:
    """Load, channel-first, RAS, resample to the target spacing, normalise (plan).

    ``raw_key``: also keep an un-normalised copy of the first image key under this name (for
    intensity priors that need Hounsfield units).
    """
    keys = [*image_keys, *label_keys]
    modes = ["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys)
    chain = [
        LoadImaged(keys, image_only=True, ensure_channel_first=False),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys, pixdim=plan["target_spacing"], mode=modes),
        EnsureTyped(image_keys, dtype=torch.float32, track_meta=True),
    ]
    if raw_key:
        chain.append(CopyItemsd(image_keys[0], names=raw_key))
    chain.append(PlanNormalized(image_keys, plan["normalisation"], default=plan["modality"]))
    return chain


def pretrain_transforms(
    plan: str | Path | Mapping,
    train: bool = True,
    roi_size: Sequence[int] | None = None,
    num_samples: int = 2,
    label_key: str | None = None,
    raw_key: str | None = None,
) -> Compose:
    """Pretraining pipeline: the plan's load chain, then pad and random crops of ``roi_size``.

    Args:
        plan: ``plan.json`` path or dict.
        train: random crops (``num_samples`` per volume) when True; one centre crop otherwise.
        roi_size: crop size (default: the plan's patch size).
        num_samples: crops per loaded volume, so one load feeds several steps.
        label_key: also load and crop this key (for label-derived masking priors).
        raw_key: also crop an un-normalised copy of the image under this key (for the
            intensity prior, which thresholds Hounsfield units).
    """
    from monai.transforms import CenterSpatialCropd

    plan = load_plan(plan)
    roi = list(roi_size or plan["patch_size"])
    if any(r <= 0 for r in roi):
        raise ConfigError(f"roi_size must be positive, got {roi}")
    labels = [label_key] if label_key else []
    keys = ["image", *labels, *([raw_key] if raw_key else [])]
    chain = load_transforms(plan, ("image",), labels, raw_key=raw_key)
    # numpy "minimum" pads each line with its own minimum: background for CT and MR alike
    chain.append(SpatialPadd(keys, spatial_size=roi, mode="minimum"))
    if train:
        chain.append(RandSpatialCropSamplesd(keys, roi_size=roi, num_samples=num_samples,
                                             random_size=False))
    else:
        chain.append(CenterSpatialCropd(keys, roi_size=roi))
    chain.append(EnsureTyped(keys, track_meta=False))
    chain.append(SelectItemsd(keys))  # boxes and other per-case lists would not collate
    return Compose(chain)
