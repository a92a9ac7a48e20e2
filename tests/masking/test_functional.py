"""Tests of the batched patch-grid samplers in monai_mask.masking.functional."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from monai_mask.errors import ConfigError
from monai_mask.masking.functional import (
    block_masking,
    fix_mask_count,
    lesion_aware_block_masking,
    num_masked,
    prior_to_placement_probs,
    random_masking,
)

GRIDS = [(12, 12, 12), (12, 10, 8), (4, 5, 3)]
RATIOS = [0.0, 0.1, 0.3, 0.5, 0.75, 0.9, 1.0]
FULL = np.ones((3, 3, 3), dtype=bool)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ball_prior(batch: int, grid=(12, 12, 12), centre=(5, 6, 6), radius=1.5) -> torch.Tensor:
    """A small ball of lesion patches, value 1, with zeros elsewhere."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1)
    dist = (coords - torch.tensor(centre)).float().norm(dim=-1)
    return (dist <= radius).float().expand(batch, *grid).clone()


def _sample(name: str, batch: int, grid, ratio: float, gen: torch.Generator) -> torch.Tensor:
    if name == "random":
        return random_masking(batch, grid, ratio, gen)
    if name == "block":
        return block_masking(batch, grid, ratio, gen)
    return lesion_aware_block_masking(_ball_prior(batch, grid, (2, 2, 1), 1.0), ratio, gen)


@pytest.mark.parametrize("name", ["random", "block", "lesion_aware"])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("batch", [1, 5])
def test_exact_ratio_every_sample(name, grid, batch):
    gen = _gen(1)
    for ratio in RATIOS:
        mask = _sample(name, batch, grid, ratio, gen)
        assert mask.dtype == torch.bool and mask.shape == (batch, *grid)
        expected = round(ratio * np.prod(grid))
        assert mask.flatten(1).sum(1).tolist() == [expected] * batch, (name, ratio)


@pytest.mark.parametrize("name", ["random", "block", "lesion_aware"])
def test_same_seed_same_mask_other_seed_differs(name):
    a = _sample(name, 4, (12, 10, 8), 0.6, _gen(7))
    b = _sample(name, 4, (12, 10, 8), 0.6, _gen(7))
    c = _sample(name, 4, (12, 10, 8), 0.6, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # samples of a batch differ too


def test_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    _sample("lesion_aware", 2, (6, 6, 6), 0.5, _gen(0))
    block_masking(2, (6, 6, 6), 0.5, _gen(0))
    assert torch.equal(before, torch.random.get_rng_state())


def test_device_follows_inputs():
    mask = random_masking(2, (4, 4, 4), 0.5, _gen(), device="cpu")
    assert mask.device.type == "cpu"
    assert lesion_aware_block_masking(torch.rand(2, 4, 4, 4), 0.5, _gen()).device.type == "cpu"
    with pytest.raises(ConfigError):
        random_masking(2, (4, 4, 4), 0.5, _gen(), device="meta")


def test_autocast_does_not_change_masks():
    prior = torch.rand(2, 12, 12, 12, generator=_gen(9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = lesion_aware_block_masking(prior, 0.75, _gen(1))
    assert torch.equal(under, lesion_aware_block_masking(prior, 0.75, _gen(1)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    gen = torch.Generator(device="cuda").manual_seed(0)
    prior = _ball_prior(3).cuda()
    for mask in (
        random_masking(3, (12, 12, 12), 0.75, gen),
        block_masking(3, (12, 12, 12), 0.75, gen),
        lesion_aware_block_masking(prior, 0.75, gen),
    ):
        assert mask.is_cuda and mask.flatten(1).sum(1).tolist() == [1296] * 3
    with torch.autocast("cuda", dtype=torch.float16):
        mask = lesion_aware_block_masking(prior, 0.3, gen)
    assert mask.flatten(1).sum(1).tolist() == [518] * 3


def _fraction_in_big_components(mask: torch.Tensor, min_size: int = 8) -> float:
    fractions = []
    for sample in mask.numpy():
        labels, _ = ndimage.label(sample, structure=FULL)
        sizes = np.bincount(labels.ravel())[1:]
        fractions.append(sizes[sizes >= min_size].sum() / sample.sum())
    return float(np.mean(fractions))


@pytest.mark.parametrize("grid", [(12, 12, 12), (12, 10, 8)])
@pytest.mark.parametrize("ratio", [0.15, 0.3])
def test_block_masking_is_contiguous(grid, ratio):
    mask = block_masking(30, grid, ratio, _gen(3), block_size=(2, 4))
    assert _fraction_in_big_components(mask) > 0.9
    rand = random_masking(30, grid, ratio, _gen(3))
    for axis in (1, 2, 3):  # blocks: masked patches have masked face neighbours far more often
        assert _neighbour_masked(mask, axis) > _neighbour_masked(rand, axis) + 0.3


def _neighbour_masked(mask: torch.Tensor, axis: int) -> float:
    """P(next patch along ``axis`` is masked | patch is masked)."""
    a = mask.narrow(axis, 0, mask.shape[axis] - 1)
    b = mask.narrow(axis, 1, mask.shape[axis] - 1)
    return float((a & b).sum() / a.sum())


def test_per_axis_block_sizes():
    along_d = block_masking(20, (12, 12, 12), 0.2, _gen(), block_size=((1, 1), (1, 1), (4, 4)))
    along_h = block_masking(20, (12, 12, 12), 0.2, _gen(), block_size=((4, 4), (1, 1), (1, 1)))
    assert _neighbour_masked(along_d, 3) > _neighbour_masked(along_d, 1) + 0.3
    assert _neighbour_masked(along_h, 1) > _neighbour_masked(along_h, 3) + 0.3


def test_block_masking_is_spatially_uniform():
    mask = block_masking(400, (12, 12, 12), 0.3, _gen(5)).float().mean(0)
    border = torch.cat([mask[0].flatten(), mask[-1].flatten()]).mean()
    centre = mask[4:8, 4:8, 4:8].mean()
    assert abs(float(border - centre)) < 0.05


def _lesion_regions(prior: torch.Tensor):
    lesion = prior[0].numpy() > 0
    near = ndimage.binary_dilation(lesion, structure=FULL) & ~lesion
    far = ~ndimage.binary_dilation(lesion, structure=FULL, iterations=3)
    return torch.from_numpy(lesion), torch.from_numpy(near), torch.from_numpy(far)


def test_lesion_aware_covers_lesion_and_surroundings():
    prior = _ball_prior(200)
    lesion, near, far = _lesion_regions(prior)
    aware = lesion_aware_block_masking(prior, 0.3, _gen(11))
    rand = random_masking(200, (12, 12, 12), 0.3, _gen(11))
    coverage_aware = aware[:, lesion].float().mean()
    coverage_rand = rand[:, lesion].float().mean()
    assert coverage_aware >= 2 * coverage_rand
    assert aware[:, near].float().mean() > 1.5 * aware[:, far].float().mean()
    assert aware[:, near].float().mean() > 0.6


def test_prior_fraction_zero_is_not_prior_guided():
    prior = _ball_prior(200)
    lesion, _, _ = _lesion_regions(prior)
    mask = lesion_aware_block_masking(prior, 0.3, _gen(2), prior_fraction=0.0)
    assert abs(float(mask[:, lesion].float().mean()) - 0.3) < 0.08


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_flat_prior_degrades_to_block_masking(value):
    prior = torch.full((400, 12, 10, 8), value)
    mask = lesion_aware_block_masking(prior, 0.4, _gen(4))
    assert mask.flatten(1).sum(1).eq(384).all()
    freq = mask.float().mean(0)
    for axis, size in enumerate(freq.shape):  # no side preferred (clipped blocks: border dip)
        low, high = freq.narrow(axis, 0, size // 2).mean(), freq.narrow(axis, size // 2, size // 2)
        assert abs(float(low - high.mean())) < 0.04
    assert float(freq.max() - freq.min()) < 0.6
    assert _fraction_in_big_components(mask[:20]) > 0.9


def test_prior_to_placement_probs():
    prior = torch.zeros(2, 4, 4, 4)
    prior[:, 1, 1, 1] = 1.0
    p = prior_to_placement_probs(prior, temperature=1.0, uniform_floor=0.1)
    assert torch.allclose(p.sum(1), torch.ones(2))
    assert p.min() >= 0.1 / 64 - 1e-7
    assert p[0, 1 * 16 + 1 * 4 + 1] > 0.9
    flat = prior_to_placement_probs(torch.zeros(1, 4, 4, 4))
    assert torch.allclose(flat, torch.full_like(flat, 1 / 64))
    graded = torch.linspace(0, 1, 64).view(1, 4, 4, 4)
    sharp = prior_to_placement_probs(graded, temperature=0.5, uniform_floor=0.0)
    soft = prior_to_placement_probs(graded, temperature=2.0, uniform_floor=0.0)
    assert sharp[0, -1] > soft[0, -1]
    with pytest.raises(ConfigError):
        prior_to_placement_probs(prior, temperature=0.0)


def test_fix_mask_count_trims_low_priority_and_grows_adjacent():
    mask = torch.zeros(1, 6, 6, 6, dtype=torch.bool)
    mask[0, 1:3, 1:3, 1:3] = True  # a 2x2x2 cube, priority 2
    mask[0, 4, 4, 4] = True  # a single patch, priority 1
    priority = torch.where(mask, 1.0, 0.0)
    priority[0, 1:3, 1:3, 1:3] = 2.0
    trimmed = fix_mask_count(mask, 8, _gen(), priority)
    assert torch.equal(trimmed, mask & (priority == 2))
    grown = fix_mask_count(mask, 12, _gen(), priority)
    assert grown.sum() == 12 and (grown & mask).sum() == 9
    added = (grown & ~mask)[0].numpy()
    near = ndimage.binary_dilation(mask[0].numpy(), structure=FULL)
    assert (added <= near).all()


def test_invalid_arguments():
    with pytest.raises(ConfigError):
        num_masked(1.5, 10)
    with pytest.raises(ConfigError):
        block_masking(1, (4, 4, 4), 0.5, _gen(), block_size=(3, 2))
    with pytest.raises(ConfigError):
        block_masking(1, (4, 4), 0.5, _gen())
    with pytest.raises(ConfigError):
        lesion_aware_block_masking(torch.rand(4, 4, 4), 0.5, _gen())
