"""Dictionary transforms: write a lesion prior or a patch mask into the data dict.

Typical pretraining pipeline (the CT intensity prior needs raw HU, so compute it before
normalising, then mask from the stored map after cropping)::

    LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), ...,
    RandSpatialCropd(keys="image", roi_size=(96, 96, 96)),
    LesionPriord(keys="image", source="intensity", patch_size=16, prior_key="prior"),
    ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0, b_max=1, clip=True),
    RandPatchMaskd(keys="image", patch_size=16, prior_key="prior", prior_source="map")

``RandPatchMaskd`` should come after all spatial transforms: the mask lives on the patch
grid of the final image and is not resampled by later spatial transforms.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Literal

from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import look_up_option

from monai_mask.errors import ConfigError
from monai_mask.masking.array import LesionPrior, RandPatchMask
from monai_mask.masking.functional import BlockSize

__all__ = ["LesionPriord", "RandPatchMaskd", "LesionPriorD", "LesionPriorDict",
           "RandPatchMaskD", "RandPatchMaskDict"]


class LesionPriord(MapTransform):
    """Write a lesion prior map ``(1, gh, gw, gd)`` in ``[0, 1]`` to ``d[prior_key]``.

    Args:
        keys: image key(s); the first present one is the image for ``source="intensity"``.
        label_key: key of the label for ``source="label"``.
        source: ``"label"`` or ``"intensity"``.
        patch_size: patch size in voxels.
        prior_key: output key. Default ``"prior"``.
        allow_missing_keys: skip (write nothing) when the image or label is missing.
        modality, dilation, dilation_weight, hu_range, body_threshold, z_thresh: see
            :class:`~monai_mask.masking.array.LesionPrior`.
    """

    backend = LesionPrior.backend

    def __init__(
        self, keys: KeysCollection, patch_size: int | Sequence[int],
        source: Literal["label", "intensity"] = "label", label_key: str = "label",
        prior_key: str = "prior", modality: Literal["ct", "mr"] = "ct", dilation: int = 1,
        dilation_weight: float = 0.5, hu_range: tuple[float, float] = (-100.0, 300.0),
        body_threshold: float = -500.0, z_thresh: float = 2.0, allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key, self.prior_key = label_key, prior_key
        self.prior = LesionPrior(
            patch_size, source, modality, dilation, dilation_weight, hu_range, body_threshold,
            z_thresh,
        )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        if self.prior.source == "label":
            if self.label_key not in d:
                if self.allow_missing_keys:
                    return d
                raise KeyError(f"key '{self.label_key}' not found; set allow_missing_keys=True")
            d[self.prior_key] = self.prior(d[self.label_key])
            return d
        for key in self.key_iterator(d):
            d[self.prior_key] = self.prior(d[key])
            break
        return d


class RandPatchMaskd(RandomizableTransform, MapTransform):
    """Add a patch-grid mask ``(1, gh, gw, gd)`` (bool, True = masked) as ``d[mask_key]``.

    The mask is drawn for the first present key's image shape and device; the lesion prior
    comes from ``prior_source``:

    - ``"none"``: no prior (``"lesion_aware"`` degrades to block masking);
    - ``"map"``: ``d[prior_key]`` is a prior on the patch grid (e.g. from
      :class:`LesionPriord`);
    - ``"label"``: ``d[prior_key]`` is a label map, turned into a prior per
      :func:`~monai_mask.masking.priors.prior_from_labels`;
    - ``"intensity"``: the image itself (``d[prior_key]`` if given, else the first key),
      per :func:`~monai_mask.masking.priors.prior_from_intensity` (CT needs raw HU).

    With ``allow_missing_keys``, a missing prior entry means no prior.

    Args:
        keys: image key(s). Default ``"image"``.
        patch_size: patch size in voxels.
        ratio, mode, block_size, temperature, uniform_floor, prior_fraction, margin: see
            :class:`~monai_mask.masking.array.RandPatchMask`.
        prior_key: key of the prior source entry (ignored for ``"none"``).
        mask_key: output key. Default ``"mask"``.
        prior_source: ``"none"``, ``"map"``, ``"label"`` or ``"intensity"``.
        modality, dilation: settings of the label / intensity prior.
        allow_missing_keys: don't raise when keys are missing.
    """

    backend = RandPatchMask.backend

    def __init__(
        self, keys: KeysCollection = "image", patch_size: int | Sequence[int] = 16,
        ratio: float = 0.75, mode: Literal["random", "block", "lesion_aware"] = "lesion_aware",
        prior_key: str | None = None, mask_key: str = "mask",
        prior_source: Literal["none", "map", "label", "intensity"] = "none",
        block_size: BlockSize = (2, 4), temperature: float = 1.0, uniform_floor: float = 0.1,
        prior_fraction: float = 0.7, margin: int = 1, modality: Literal["ct", "mr"] = "ct",
        dilation: int = 1, allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.prior_source = look_up_option(prior_source, ("none", "map", "label", "intensity"))
        if self.prior_source in ("map", "label") and prior_key is None:
            raise ConfigError(f"prior_source='{prior_source}' needs a prior_key")
        self.prior_key, self.mask_key = prior_key, mask_key
        self.masker = RandPatchMask(
            patch_size, ratio, mode, block_size, temperature, uniform_floor, prior_fraction, margin
        )
        self.prior_maker = None
        if self.prior_source in ("label", "intensity"):
            self.prior_maker = LesionPrior(patch_size, self.prior_source, modality, dilation)

    def set_random_state(self, seed: int | None = None, state=None) -> RandPatchMaskd:
        super().set_random_state(seed, state)
        self.masker.set_random_state(seed, state)
        return self

    def randomize(self, data: object = None) -> None:
        """Draw the mask seed (in the wrapped :class:`RandPatchMask`)."""
        self._do_transform = True
        self.masker.randomize()

    def _prior(self, d: dict, image: NdarrayOrTensor) -> NdarrayOrTensor | None:
        if self.prior_source == "none":
            return None
        if self.prior_source == "intensity" and self.prior_key is None:
            return self.prior_maker(image)
        if self.prior_key not in d:
            if self.allow_missing_keys:
                return None
            raise KeyError(f"key '{self.prior_key}' not found; set allow_missing_keys=True")
        src = d[self.prior_key]
        return src if self.prior_maker is None else self.prior_maker(src)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        self.randomize()
        image = d[first]
        d[self.mask_key] = self.masker(image, prior=self._prior(d, image), randomize=False)
        return d


LesionPriorD = LesionPriorDict = LesionPriord
RandPatchMaskD = RandPatchMaskDict = RandPatchMaskd
