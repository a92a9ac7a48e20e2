"""Array transforms: lesion priors and patch masks for one image ``(C, H, W, D)``.

Dictionary wrappers are in :mod:`monai_mask.masking.dictionary`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.transforms import RandomizableTransform, Transform
from monai.utils import TransformBackends, convert_to_tensor, look_up_option
from torch import Tensor

from monai_mask.errors import InputError
from monai_mask.masking.functional import (
    BlockSize,
    block_masking,
    lesion_aware_block_masking,
    random_masking,
)
from monai_mask.masking.priors import as_patch_size, prior_from_intensity, prior_from_labels

__all__ = ["LesionPrior", "RandPatchMask", "patch_grid", "MASK_MODES", "PRIOR_SOURCES"]

MASK_MODES = ("random", "block", "lesion_aware")
PRIOR_SOURCES = ("label", "intensity")


def patch_grid(spatial_shape: Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, ...]:
    """Patch grid ``(gh, gw, gd)`` of a spatial shape; the patch size must divide it.

    Raises:
        InputError: when the shape is not 3D or not divisible by the patch size.
    """
    patch = as_patch_size(patch_size)
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != 3 or any(s % p for s, p in zip(shape, patch, strict=True)):
        raise InputError("image", f"spatial shape {shape} is not divisible by patch size {patch}")
    return tuple(s // p for s, p in zip(shape, patch, strict=True))


class LesionPrior(Transform):
    """Lesion prior map ``(1, gh, gw, gd)`` in ``[0, 1]`` for one image or label.

    Args:
        patch_size: patch size in voxels (int or three ints).
        source: ``"label"`` (input is a label ``(1, H, W, D)``, see
            :func:`~monai_mask.masking.priors.prior_from_labels`) or ``"intensity"`` (input is
            the image ``(C, H, W, D)``, see
            :func:`~monai_mask.masking.priors.prior_from_intensity`; CT needs raw HU).
        modality: ``"ct"`` or ``"mr"`` for the intensity source.
        dilation: label source, patches of dilation. dilation_weight: their relative weight.
        hu_range, body_threshold: CT intensity thresholds (HU).
        z_thresh: MR z-score threshold.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self, patch_size: int | Sequence[int], source: Literal["label", "intensity"] = "label",
        modality: Literal["ct", "mr"] = "ct", dilation: int = 1, dilation_weight: float = 0.5,
        hu_range: tuple[float, float] = (-100.0, 300.0), body_threshold: float = -500.0,
        z_thresh: float = 2.0,
    ) -> None:
        self.patch_size = as_patch_size(patch_size)
        self.source = look_up_option(source, PRIOR_SOURCES)
        self.modality = look_up_option(modality, ("ct", "mr"))
        self.dilation, self.dilation_weight = int(dilation), float(dilation_weight)
        self.hu_range, self.body_threshold = tuple(hu_range), float(body_threshold)
        self.z_thresh = float(z_thresh)

    def __call__(self, img: NdarrayOrTensor) -> Tensor:
        """Prior ``(1, gh, gw, gd)`` of ``img`` ``(C, H, W, D)`` (label or image per ``source``)."""
        x = convert_to_tensor(img, track_meta=False)
        if x.ndim != 4:
            raise InputError(self.source, f"expected (C, H, W, D), got shape {tuple(x.shape)}")
        if self.source == "label":
            prior = prior_from_labels(x[None], self.patch_size, self.dilation, self.dilation_weight)
        else:
            prior = prior_from_intensity(
                x[None].float(), self.patch_size, self.modality, hu_range=self.hu_range,
                body_threshold=self.body_threshold, z_thresh=self.z_thresh,
            )
        return prior


class RandPatchMask(RandomizableTransform):
    """Random patch-grid mask ``(1, gh, gw, gd)`` (bool, True = masked) for one image.

    The only random draw is a seed from ``self.R`` in :meth:`randomize`; it seeds a
    ``torch.Generator`` on the image's device, so ``set_random_state`` makes masks
    reproducible. The mask is always produced (no ``prob``).

    Args:
        patch_size: patch size in voxels (int or three ints) dividing the image shape.
        ratio: masking ratio, exact (``round(ratio * L)`` patches). Default 0.75.
        mode: ``"random"``, ``"block"`` or ``"lesion_aware"`` (see
            :mod:`monai_mask.masking.functional`). Without a prior, ``"lesion_aware"``
            uses a flat prior (block masking with margin-enlarged blocks).
        block_size: side-length range(s) of blocks in patches. Default ``(2, 4)``.
        temperature, uniform_floor, prior_fraction, margin: lesion-aware settings, see
            :func:`~monai_mask.masking.functional.lesion_aware_block_masking`.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self, patch_size: int | Sequence[int], ratio: float = 0.75,
        mode: Literal["random", "block", "lesion_aware"] = "lesion_aware",
        block_size: BlockSize = (2, 4), temperature: float = 1.0, uniform_floor: float = 0.1,
        prior_fraction: float = 0.7, margin: int = 1,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        self.patch_size = as_patch_size(patch_size)
        self.ratio = float(ratio)
        self.mode = look_up_option(mode, MASK_MODES)
        self.block_size = block_size
        self.temperature, self.uniform_floor = float(temperature), float(uniform_floor)
        self.prior_fraction, self.margin = float(prior_fraction), int(margin)
        self._seed = 0

    def randomize(self, data: object = None) -> None:
        """Draw the generator seed from ``self.R``."""
        self._do_transform = True
        self._seed = int(self.R.randint(0, np.iinfo(np.int32).max))

    def _prior(self, prior: NdarrayOrTensor | None, grid: tuple[int, ...], device) -> Tensor:
        if prior is None:
            return torch.ones(1, *grid, device=device)
        p = convert_to_tensor(prior, track_meta=False).to(device=device, dtype=torch.float32)
        if tuple(p.shape[-3:]) != tuple(grid) or p.numel() != math.prod(grid):
            raise InputError("prior", f"expected grid shape {grid}, got {tuple(p.shape)}")
        return p.reshape(1, *grid)

    def __call__(
        self, img: NdarrayOrTensor, prior: NdarrayOrTensor | None = None, randomize: bool = True
    ) -> Tensor:
        """Mask for ``img`` ``(C, H, W, D)``.

        Args:
            img: the image (only its shape and device are used).
            prior: optional lesion prior ``(gh, gw, gd)`` or ``(1, gh, gw, gd)``.
            randomize: draw a new seed first (False reuses the last one).

        Returns:
            ``(1, gh, gw, gd)`` bool tensor on the image's device.
        """
        if randomize:
            self.randomize()
        device = img.device if isinstance(img, Tensor) else torch.device("cpu")
        grid = patch_grid(img.shape[1:], self.patch_size)
        gen = torch.Generator(device=device).manual_seed(self._seed)
        if self.mode == "random":
            return random_masking(1, grid, self.ratio, gen, device=device)
        if self.mode == "block":
            return block_masking(1, grid, self.ratio, gen, self.block_size, device=device)
        return lesion_aware_block_masking(
            self._prior(prior, grid, device), self.ratio, gen, self.block_size,
            self.temperature, self.uniform_floor, self.prior_fraction, self.margin,
        )
