"""MONAI transform chains for box detection, built from ``plan.json``.

Boxes enter as the datalist has them (``box``: ``cccwhd`` in **LPS** world mm, ``box_label``)
and are mapped to voxel ``xyzxyz`` coordinates of the *preprocessed* image (after the plan's
reorientation and resampling) by MONAI's ``AffineBoxToImageCoordinated`` with
``affine_lps_to_ras=True``, using that image's ``MetaTensor`` affine. The evaluation chain keeps
the untouched world boxes under ``box_world`` so that metrics are computed in world mm.

Voxel conventions: this project's voxel boxes put voxel ``i``'s *centre* at ``i`` (as the affine
does); MONAI's box crops and flips treat voxel ``i`` as the interval ``[i, i + 1)`` (a flip maps
``x`` to ``W - x``, a crop clips to ``[0, W]``). The training chain therefore shifts boxes by
half a voxel into MONAI's convention before cropping and flipping and back afterwards; without
it every flipped axis moved the boxes by one voxel, a large error for 3-5 voxel lesions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
from monai.apps.detection.transforms.dictionary import (
    AffineBoxToImageCoordinated,
    ConvertBoxToStandardModed,
    RandCropBoxByPosNegLabeld,
    RandFlipBoxd,
    StandardizeEmptyBoxd,
)
from monai.transforms import Compose, CopyItemsd, EnsureTyped, Lambdad, SelectItemsd

from monai_mask.data.presets import load_plan, load_transforms

__all__ = ["binarise", "detection_transforms", "shift_boxes"]


def shift_boxes(boxes: torch.Tensor, offset: float) -> torch.Tensor:
    """``xyzxyz`` boxes with every coordinate moved by ``offset`` voxels (convention change)."""
    return boxes + offset


def binarise(label: torch.Tensor) -> torch.Tensor:
    """Any lesion class -> 1, background 0 (``uint8``)."""
    return (label > 0).to(torch.uint8)


def _box_chain(box_key: str, label_key: str, keep_world: bool) -> list:
    chain = [
        EnsureTyped(box_key, dtype=torch.float32, track_meta=False),
        EnsureTyped(label_key, dtype=torch.long, track_meta=False),
        StandardizeEmptyBoxd(box_key, box_ref_image_keys="image"),
    ]
    if keep_world:
        chain.append(CopyItemsd(box_key, names="box_world"))
    return chain + [
        ConvertBoxToStandardModed(box_key, mode="cccwhd"),
        AffineBoxToImageCoordinated(box_key, box_ref_image_keys="image", affine_lps_to_ras=True),
    ]


def detection_transforms(
    plan: str | Path | Mapping,
    mode: str = "train",
    roi_size: Sequence[int] = (48, 48, 32),
    num_samples: int = 2,
    box_key: str = "box",
    label_key: str = "box_label",
    flip_prob: float = 0.5,
    seg_key: str | None = None,
) -> Compose:
    """Detection pipeline: the plan's load chain, boxes to voxels, crops and flips.

    Args:
        plan: ``plan.json`` path or dict.
        mode: ``"train"`` (``num_samples`` random crops of ``roi_size`` per case, half centred
            on a box when the case has one; random flips of image and boxes), ``"eval"`` (whole
            image, boxes in voxels plus ``box_world``) or ``"infer"`` (image only).
        roi_size: training crop size (voxels of the preprocessed image).
        num_samples: crops per loaded case.
        box_key, label_key: datalist keys of the boxes (cccwhd LPS mm) and their labels.
        flip_prob: probability of a flip along each axis (train).
        seg_key: datalist key of the label map to load, crop and flip with the image (train
            only; for the auxiliary segmentation loss of :func:`build_detector`'s
            ``seg_loss_weight``). Labels are binarised (any lesion class -> 1). None: no map.
    """
    from monai.utils import look_up_option

    mode = look_up_option(mode, ("train", "eval", "infer"))
    seg = [seg_key] if seg_key and mode == "train" else []
    chain = load_transforms(load_plan(plan), ("image",), label_keys=seg)
    if mode == "infer":
        return Compose([*chain, SelectItemsd(["image", "case_id"], allow_missing_keys=True)])
    chain += _box_chain(box_key, label_key, keep_world=mode == "eval")
    if mode == "eval":
        keys = ["image", box_key, label_key, "box_world", "case_id"]
        return Compose([*chain, SelectItemsd(keys, allow_missing_keys=True)])
    chain.append(Lambdad(box_key, func=partial(shift_boxes, offset=0.5)))  # to MONAI's [i, i+1)
    images = ["image", *seg]
    chain.append(RandCropBoxByPosNegLabeld(
        images, box_keys=box_key, label_keys=label_key, spatial_size=list(roi_size),
        whole_box=True, num_samples=num_samples, pos=1, neg=1, allow_smaller=True,
    ))  # fmt: skip
    for axis in range(len(roi_size)):
        chain.append(RandFlipBoxd(images, box_key, box_ref_image_keys="image", prob=flip_prob,
                                  spatial_axis=axis))  # fmt: skip
    chain.append(Lambdad(box_key, func=partial(shift_boxes, offset=-0.5)))  # back to centres
    chain.append(EnsureTyped(images, track_meta=False))
    if seg:
        chain.append(Lambdad(seg, func=binarise))
    chain.append(SelectItemsd([*images, box_key, label_key]))
    return Compose(chain)
