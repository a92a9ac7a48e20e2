"""Lesion-aware masks hide tumour voxels far more often than random masks (sample data)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_mask.masking import (
    lesion_aware_block_masking,
    prior_from_intensity,
    prior_from_labels,
    random_masking,
)

PATCH = (8, 8, 8)


def _cases(sample_data):
    for path in sorted((sample_data / "ct" / "labelsTr").glob("*.nii.gz")):
        label = np.asanyarray(nib.load(path).dataobj)[:, :, :40]  # 64x64x40: divisible by 8
        if label.any():
            image = nib.load(sample_data / "ct" / "imagesTr" / path.name).get_fdata()[:, :, :40]
            yield (torch.as_tensor(image, dtype=torch.float32)[None, None],
                   torch.as_tensor(label > 0)[None, None])


def _coverage(mask: torch.Tensor, label: torch.Tensor) -> float:
    vox = mask.float()
    for axis, p in enumerate(PATCH):
        vox = vox.repeat_interleave(p, dim=axis + 1)
    return float(vox[label[:, 0]].mean())


@pytest.mark.parametrize("source", ["label", "intensity"])
def test_lesion_aware_covers_tumours_twice_as_often_as_random(sample_data, source):
    g = torch.Generator().manual_seed(0)
    aware, rand = [], []
    for image, label in _cases(sample_data):
        prior = (prior_from_labels(label.float(), PATCH) if source == "label"
                 else prior_from_intensity(image, PATCH, modality="ct"))
        grid = prior.shape[1:]
        for _ in range(30):
            aware.append(_coverage(lesion_aware_block_masking(prior, 0.3, g, block_size=(1, 2)),
                                   label))
            rand.append(_coverage(random_masking(1, grid, 0.3, g), label))
    ratio = np.mean(aware) / np.mean(rand)
    print(f"{source} prior: lesion coverage {np.mean(aware):.3f} vs random {np.mean(rand):.3f}"
          f" ({ratio:.2f}x)")
    if source == "label":
        assert ratio >= 2.0
    else:  # the HU prior is not lesion-specific (every soft tissue patch qualifies)
        assert ratio > 1.5
