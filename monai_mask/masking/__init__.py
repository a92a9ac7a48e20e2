"""Lesion-aware masking for 3D masked autoencoders: samplers, lesion priors, transforms.

Mask convention: bool ``(B, gh, gw, gd)`` over the patch grid, ``True = masked (hidden)``;
``mask.flatten(1)`` is in the token order of MONAI's ``PatchEmbeddingBlock``.
"""

from __future__ import annotations

from monai_mask.masking.array import (
    MASK_MODES,
    PRIOR_SOURCES,
    LesionPrior,
    RandPatchMask,
    patch_grid,
)
from monai_mask.masking.dictionary import (
    LesionPriorD,
    LesionPriord,
    LesionPriorDict,
    RandPatchMaskD,
    RandPatchMaskd,
    RandPatchMaskDict,
)
from monai_mask.masking.functional import (
    BlockSize,
    block_masking,
    fix_mask_count,
    lesion_aware_block_masking,
    num_masked,
    prior_to_placement_probs,
    random_masking,
)
from monai_mask.masking.priors import (
    ReconstructionErrorPrior,
    as_patch_size,
    normalize_prior,
    patch_fraction,
    prior_from_intensity,
    prior_from_labels,
)

__all__ = [
    "BlockSize",
    "LesionPrior",
    "LesionPriorD",
    "LesionPriorDict",
    "LesionPriord",
    "MASK_MODES",
    "PRIOR_SOURCES",
    "RandPatchMask",
    "RandPatchMaskD",
    "RandPatchMaskDict",
    "RandPatchMaskd",
    "ReconstructionErrorPrior",
    "as_patch_size",
    "block_masking",
    "fix_mask_count",
    "lesion_aware_block_masking",
    "normalize_prior",
    "num_masked",
    "patch_fraction",
    "patch_grid",
    "prior_from_intensity",
    "prior_from_labels",
    "prior_to_placement_probs",
    "random_masking",
]
