"""Tests of the lesion priors in monai_mask.masking.priors."""

from __future__ import annotations

import pytest
import torch

from monai_mask.errors import ConfigError, InputError
from monai_mask.masking.functional import lesion_aware_block_masking, random_masking
from monai_mask.masking.priors import (
    ReconstructionErrorPrior,
    prior_from_intensity,
    prior_from_labels,
)


def _ball(shape=(32, 32, 32), centre=(12, 16, 20), radius=4.0) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    dist2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
    return dist2 <= radius**2


def test_prior_from_labels_shape_range_and_dilation():
    label = torch.zeros(2, 1, 32, 32, 32)
    label[0, 0, 8:12, 8:12, 8:12] = 1  # exactly patch (2, 2, 2) at patch size 4
    prior = prior_from_labels(label, 4, dilation=1, dilation_weight=0.5)
    assert prior.shape == (2, 8, 8, 8) and prior.dtype == torch.float32
    assert prior.min() >= 0 and prior.max() <= 1
    assert prior[0, 2, 2, 2] == 1.0
    assert torch.allclose(prior[0, 1:4, 1:4, 1:4].sum(), torch.tensor(1.0 + 26 * 0.5))
    assert prior[0, 5:].sum() == 0
    assert prior[1].sum() == 0  # no lesion: all zero, no NaN
    no_dilation = prior_from_labels(label, 4, dilation=0)
    assert no_dilation[0].sum() == 1.0


def test_prior_from_labels_fraction_and_one_hot():
    label = torch.zeros(1, 1, 8, 8, 8)
    label[0, 0, :2, :4, :4] = 1  # half of patch (0, 0, 0)
    label[0, 0, 4:, 4:, 4:] = 1  # all of patch (1, 1, 1)
    prior = prior_from_labels(label, 4, dilation=0)
    assert torch.allclose(prior[0, 0, 0, 0], torch.tensor(0.5))
    one_hot = torch.cat([1 - label, label], dim=1)
    assert torch.equal(prior_from_labels(one_hot, 4, dilation=0), prior)


def test_prior_shape_errors():
    with pytest.raises(InputError, match="not divisible"):
        prior_from_labels(torch.zeros(1, 1, 30, 32, 32), 4)
    with pytest.raises(InputError):
        prior_from_labels(torch.zeros(1, 32, 32, 32), 4)
    with pytest.raises(ValueError):
        prior_from_intensity(torch.zeros(1, 1, 32, 32, 32), 4, modality="pet")


def _ct_phantom() -> torch.Tensor:
    """Air (-1000 HU), a fat-like body (-150 HU), a soft-tissue blob (40 HU), a bone rod."""
    image = torch.full((1, 1, 32, 32, 32), -1000.0)
    image[0, 0][_ball(centre=(16, 16, 16), radius=13)] = -150.0
    image[0, 0][_ball(centre=(12, 16, 20), radius=4)] = 40.0
    image[0, 0, 20:24, 14:18, 4:28] = 700.0
    return image


def test_ct_intensity_prior_high_on_soft_tissue_blob():
    image = _ct_phantom()
    prior = prior_from_intensity(image, 4, "ct")
    blob = prior_from_labels(_ball(centre=(12, 16, 20), radius=4)[None, None].float(), 4, 0)
    assert prior.shape == (1, 8, 8, 8) and 0 <= prior.min() and prior.max() == 1
    assert prior[blob > 0.5].min() > 0.6
    assert prior[blob == 0].max() < 0.5  # air, fat and bone are not lesion-like
    assert prior[0, 5, 3:5, 1:7].max() == 0  # the bone rod


def test_mr_intensity_prior_high_on_outlier_blob():
    gen = torch.Generator().manual_seed(0)
    image = torch.zeros(1, 2, 32, 32, 32)
    body = _ball(centre=(16, 16, 16), radius=13)
    image[0, :, body] = 100.0 + 5.0 * torch.randn(2, int(body.sum()), generator=gen)
    blob = _ball(centre=(12, 16, 20), radius=4)
    image[0, 1, blob] = 200.0  # bright in the second channel only
    prior = prior_from_intensity(image, 4, "mr", z_thresh=2.0)
    blob_patches = prior_from_labels(blob[None, None].float(), 4, 0)
    assert prior[blob_patches > 0.5].min() > 0.6
    assert prior[blob_patches == 0].mean() < 0.05
    scaled = prior_from_intensity(image * 0.01 + 3.0, 4, "mr")  # MR: no absolute scale
    assert torch.allclose(scaled, prior)


def test_intensity_prior_guides_lesion_aware_masking():
    prior = prior_from_intensity(_ct_phantom(), 4, "ct").expand(100, -1, -1, -1)
    gen = torch.Generator().manual_seed(0)
    blob = prior[0] > 0.8
    aware = lesion_aware_block_masking(prior, 0.3, gen)[:, blob].float().mean()
    rand = random_masking(100, (8, 8, 8), 0.3, gen)[:, blob].float().mean()
    assert aware > 2 * rand


def _region_losses(batch: int, grid=(4, 4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """All patches masked; loss 5 in the corner cube [:2, :2, :2], 1 elsewhere."""
    mask = torch.ones(batch, *grid, dtype=torch.bool)
    loss = torch.ones(batch, *grid)
    loss[:, :2, :2, :2] = 5.0
    return mask, loss.flatten(1)


def test_reconstruction_error_prior_finds_hard_region_and_curriculum():
    prior = ReconstructionErrorPrior((4, 4, 4), momentum=0.5)
    assert torch.equal(prior.prior(2, progress=1.0), torch.ones(2, 4, 4, 4))  # nothing seen
    for _ in range(3):
        prior.update(*_region_losses(2))
    hard = prior.prior(3, progress=1.0)
    assert hard.shape == (3, 4, 4, 4) and hard.min() >= 0 and hard.max() <= 1
    assert hard[0, :2, :2, :2].min() == 1.0 and hard[0, 2:].max() == 0.0
    assert torch.equal(prior.prior(3, progress=0.0), torch.ones(3, 4, 4, 4))
    half = prior.prior(1, progress=0.5)
    assert torch.allclose(half[0, 2:], torch.full_like(half[0, 2:], 0.5))
    with pytest.raises(ConfigError):
        prior.prior(1, progress=1.5)


def test_reconstruction_error_prior_ema_and_masked_only():
    prior = ReconstructionErrorPrior((2, 2, 2), momentum=0.75)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 0] = mask[0, 1, 1, 1] = True
    prior.update(mask, torch.full((1, 8), 4.0))
    prior.update(mask, torch.tensor([[8.0, 0.0]]))  # (B, n_mask) form, mask order
    assert torch.isclose(prior.ema[0, 0, 0, 0], torch.tensor(0.75 * 4 + 0.25 * 8))
    assert torch.isclose(prior.ema[0, 1, 1, 1], torch.tensor(0.75 * 4))
    assert prior.count[0].sum() == 4 and prior.ema[0, 0, 1].eq(0).all()


def test_reconstruction_error_prior_state_dict_round_trip_and_cases():
    prior = ReconstructionErrorPrior((4, 4, 4), num_cases=3)
    mask, loss = _region_losses(2)
    prior.update(mask, loss, positions=torch.tensor([2, 2]))
    state = prior.state_dict()
    assert set(state) == {"ema", "count"}
    restored = ReconstructionErrorPrior((4, 4, 4), num_cases=3)
    restored.load_state_dict(state)
    cases = torch.tensor([0, 2])
    assert torch.equal(restored.prior(2, 0.7, cases), prior.prior(2, 0.7, cases))
    by_case = restored.prior(2, 1.0, cases)
    assert by_case[0].eq(1).all() and by_case[1, :2, :2, :2].eq(1).all()
    assert by_case[1, 2:].eq(0).all()
    with pytest.raises(ConfigError):
        prior.update(mask, loss, positions=torch.tensor([0, 3]))
