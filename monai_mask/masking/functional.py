"""Batched mask samplers on the 3D patch grid (pure torch, on the tensor's device).

Every sampler returns a bool tensor ``(B, gh, gw, gd)`` with ``True = masked (hidden)`` and
exactly ``n_mask = round(ratio * L)`` masked patches in every sample (``L = gh * gw * gd``).
``mask.flatten(1)`` is in the token order of MONAI's ``PatchEmbeddingBlock`` (C-order over
the grid). All randomness comes from an explicit ``torch.Generator``; the global RNG is
never used, so a fixed generator seed gives a fixed mask.

Samplers:

- :func:`random_masking`: uniform random patches, as ``random_masking`` in
  facebookresearch/mae (He et al., "Masked Autoencoders Are Scalable Vision Learners",
  CVPR 2022): the lowest uniform noise (same set as its argsort, taken with topk).
- :func:`block_masking`: cuboid blocks of patches at uniform positions (3D analogue of the
  block-wise masking of BEiT, Bao et al., ICLR 2022, and SimMIM, Xie et al., CVPR 2022).
- :func:`lesion_aware_block_masking`: a fraction of the budget on blocks centred on draws
  from a lesion prior (enlarged by a margin, so a lesion and its surroundings are hidden
  together), the rest on uniform blocks.

How blocks are built (vectorised, no loop over samples or blocks): ``K`` blocks per sample
are drawn at once; per-axis interval memberships ``(B, K, g)`` are weighted by powers of two
(earlier blocks heavier) and contracted over ``K`` with one broadcast product and one ``bmm``;
the binary exponent of the result is, per patch, the rank of the earliest covering block.
:func:`fix_mask_count` then makes the count exact with one ``topk``: surplus patches are
removed from the block added last, border patches first; missing patches are grown next to
existing blocks, falling back to random patches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from monai_mask.errors import ConfigError

__all__ = [
    "random_masking",
    "block_masking",
    "lesion_aware_block_masking",
    "fix_mask_count",
    "prior_to_placement_probs",
    "num_masked",
    "BlockSize",
]

BlockSize = tuple[int, int] | Sequence[tuple[int, int]]
"""``(lo, hi)`` inclusive side-length range (patches) for all axes, or one range per axis."""

_TIE_NOISE = 0.01  # scale of the random tie-break added to integer-ranked patch scores
_MAX_FILL = 0.97  # cap of the coverage fraction used to size the number of blocks
_OVERSUPPLY = 1.25  # blocks drawn beyond the expected need (border effects, overlaps)
_MAX_BLOCKS = 1000  # 2 ** (K - 1) must fit in float64 (see _rank_map)


def num_masked(ratio: float, num_patches: int) -> int:
    """Number of masked patches per sample, ``round(ratio * L)``.

    Raises:
        ConfigError: when ``ratio`` is not in ``[0, 1]``.
    """
    if not 0.0 <= float(ratio) <= 1.0:
        raise ConfigError(f"masking ratio must be in [0, 1], got {ratio}")
    return int(round(float(ratio) * num_patches))


def _grid3(grid: Sequence[int]) -> tuple[int, int, int]:
    if len(grid) != 3 or any(int(g) < 1 for g in grid):
        raise ConfigError(f"patch grid must be three positive ints, got {tuple(grid)}")
    return int(grid[0]), int(grid[1]), int(grid[2])


def _block_ranges(block_size: BlockSize) -> tuple[tuple[int, int], ...]:
    """Normalise ``block_size`` to three inclusive ``(lo, hi)`` ranges."""
    bs = tuple(block_size)
    if len(bs) == 2 and all(isinstance(v, int) for v in bs):
        bs = (bs, bs, bs)
    if len(bs) != 3 or any(len(r) != 2 for r in bs):
        raise ConfigError(f"block_size must be (lo, hi) or three (lo, hi) pairs, got {block_size}")
    ranges = tuple((int(lo), int(hi)) for lo, hi in bs)
    if any(lo < 1 or hi < lo for lo, hi in ranges):
        raise ConfigError(f"block_size ranges need 1 <= lo <= hi, got {block_size}")
    return ranges


def _resolve_device(generator: torch.Generator, device: torch.device | str | None) -> torch.device:
    dev = generator.device if device is None else torch.device(device)
    if dev.type != generator.device.type:
        raise ConfigError(
            f"generator is on {generator.device} but the mask is requested on {dev}; "
            "create the torch.Generator on the same device"
        )
    return dev


def _mean_volume(
    ranges: Sequence[tuple[int, int]], grid: Sequence[int], grow: int = 0, clipped: bool = False
) -> float:
    """Expected block volume in patches (independent uniform sides, limited by the grid).

    ``clipped``: blocks placed as in :func:`_draw_blocks`, whose expected length inside
    the grid along an axis of size ``g`` is ``g * s / (g + s - 1)``.
    """
    vol = 1.0
    for (lo, hi), g in zip(ranges, grid, strict=True):
        sides = [min(s + 2 * grow, g) for s in range(lo, hi + 1)]
        if clipped:
            sides = [g * s / (g + s - 1) for s in sides]
        vol *= sum(sides) / len(sides)
    return vol


def _n_blocks(fill: float, num_patches: int, volume: float) -> int:
    """Blocks needed so that their expected union covers ``fill`` of the grid, plus slack.

    With ``K`` blocks of volume ``v`` at random positions, the covered fraction is about
    ``1 - exp(-K v / L)``.
    """
    if fill <= 0.0:
        return 0
    fill = min(fill, _MAX_FILL)
    k = int(math.ceil(-math.log1p(-fill) * num_patches / volume * _OVERSUPPLY)) + 1
    return min(k, _MAX_BLOCKS)


def _draw_blocks(
    batch: int, kp: int, ku: int, ranges: Sequence[tuple[int, int]], grid: Sequence[int],
    generator: torch.Generator, device: torch.device, probs: Tensor | None = None,
    margin: int = 0,
) -> tuple[Tensor, Tensor]:
    """Draw ``kp`` prior blocks then ``ku`` uniform blocks per sample.

    Sides are uniform in the inclusive ``ranges`` (prior blocks ``+ 2 * margin``), at most the
    grid. Uniform blocks start in ``[-(s - 1), g - 1]`` and are clipped at the border, so
    every patch is equally likely to be covered (blocks kept fully inside would cover the
    centre more than the borders). Prior blocks are centred on patches drawn from ``probs``
    ``(B, L)`` with replacement (even sides: the extra patch falls on either side at random)
    and clipped at the border, so near the border they are smaller.

    Returns:
        ``starts`` and ``sizes``, both ``(B, kp + ku, 3)`` long.
    """
    table = torch.tensor([[r[0] for r in ranges], [r[1] - r[0] + 1 for r in ranges], list(grid),
                          [grid[1] * grid[2], grid[2], 1]], device=device)
    lo, span, g, strides = table
    u = torch.rand(batch, kp + ku, 6, generator=generator, device=device)
    sizes = lo + (u[..., :3] * span).long()
    if kp:
        sizes[:, :kp] += 2 * margin
    sizes = torch.minimum(sizes, g)
    starts = (u[..., 3:] * (g + sizes - 1)).long() - (sizes - 1)
    if kp:
        centres = torch.multinomial(probs, kp, replacement=True, generator=generator)
        odd_shift = (u[:, :kp, 3:] < 0.5).long()  # centre even-sized blocks either way
        offsets = (sizes[:, :kp] - 1 + odd_shift) // 2
        starts[:, :kp] = centres[..., None] // strides % g - offsets
    return starts, sizes


def _rank_map(starts: Tensor, sizes: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Rank of the earliest cuboid covering each patch.

    Block ``k`` of ``K`` gets weight ``2 ** (K - 1 - k)``; summing the weights of the blocks
    covering a patch (one broadcast product and one ``bmm``, no ``(B, K, L)`` tensor) gives a
    number whose binary exponent is the rank ``K - k`` of the earliest covering block, since a
    sum of distinct powers of two is below twice its largest term. The exponent is read from
    the float's bits. (When dozens of consecutive blocks cover one patch, float rounding can
    raise its rank by one; this only perturbs which border patch is trimmed first.)

    Args:
        starts: ``(B, K, 3)`` first patch index of each block per axis (may be negative).
        sizes: ``(B, K, 3)`` side lengths.
        grid: ``(gh, gw, gd)``.

    Returns:
        ``(B, gh, gw, gd)`` float: ``K - k`` for the first block ``k`` covering the patch
        (``K`` = first block), 0 where no block covers it.
    """
    batch, k = starts.shape[:2]
    gh, gw, gd = grid
    if k <= 120:  # 2 ** (K - 1) must not overflow
        dtype, itype, shift, bias = torch.float32, torch.int32, 23, 126
    else:
        dtype, itype, shift, bias = torch.float64, torch.int64, 52, 1022
    ar = torch.arange(max(grid), device=starts.device)
    s0 = starts[..., None]
    inside = ((ar >= s0) & (ar < s0 + sizes[..., None])).to(dtype)  # (B, K, 3, G)
    weight = torch.exp2(torch.arange(k - 1, -1, -1, device=starts.device, dtype=dtype))
    hw = (inside[:, :, 0, :gh] * weight[:, None]).unsqueeze(-1) * inside[:, :, 1, None, :gw]
    with torch.autocast(device_type=starts.device.type, enabled=False):  # fp16 would overflow
        total = torch.bmm(hw.flatten(2).transpose(1, 2), inside[:, :, 2, :gd])  # (B, gh*gw, gd)
    rank = ((total.view(itype) >> shift) - bias).clamp_(0, k)  # exponent field; 0.0 -> 0
    return rank.to(torch.float32).view(batch, *grid)


def _neighbour_fraction(mask: Tensor) -> Tensor:
    """Fraction of the 3x3x3 neighbourhood that is masked, ``(B, gh, gw, gd)`` float.

    Separable box sum by shifted slices (cheaper than ``avg_pool3d`` on small grids).
    """
    x = F.pad(mask.float(), (1, 1, 1, 1, 1, 1))
    x = x[:, :-2] + x[:, 1:-1] + x[:, 2:]
    x = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]
    x = x[..., :-2] + x[..., 1:-1] + x[..., 2:]
    return x / 27.0


def _top_n(score: Tensor, n: int) -> Tensor:
    """Bool mask of the ``n`` highest scores per sample (same shape as ``score``)."""
    flat = score.flatten(1)
    out = torch.zeros_like(flat, dtype=torch.bool)
    if n > 0:
        out.scatter_(1, flat.topk(n, dim=1, sorted=False).indices, True)
    return out.view_as(score)


def fix_mask_count(
    mask: Tensor, n_mask: int, generator: torch.Generator, priority: Tensor | None = None
) -> Tensor:
    """Make a mask hold exactly ``n_mask`` masked patches per sample (vectorised).

    Each patch is scored by ``(is_masked, priority + masked neighbours, noise)`` and the top
    ``n_mask`` are kept. Over-full: the masked patches of lowest ``priority`` (the block
    added last) are dropped, those with fewest masked neighbours (block borders) first.
    Under-full: unmasked patches with most masked neighbours are added (growing the
    blocks), ties and isolated patches at random.

    Args:
        mask: ``(B, gh, gw, gd)`` bool, True = masked.
        n_mask: target count per sample.
        generator: source of the tie-break noise; on ``mask``'s device.
        priority: optional ``(B, gh, gw, gd)`` non-negative keep priority of masked patches
            (e.g. the block order as integers); ties, and differences below 0.5, are settled
            by the fraction of masked neighbours, so that borders are trimmed first.

    Returns:
        ``(B, gh, gw, gd)`` bool with exactly ``n_mask`` True per sample.
    """
    if not 0 <= n_mask <= mask[0].numel():
        raise ConfigError(f"n_mask={n_mask} outside [0, {mask[0].numel()}]")
    nb = _neighbour_fraction(mask)
    noise = torch.rand(mask.shape, generator=generator, device=mask.device)
    keep = 0.5 * nb if priority is None else priority.float() + 0.5 * nb
    score = torch.where(mask, 4.0 + keep, nb) + _TIE_NOISE * noise
    return _top_n(score, n_mask)


def random_masking(
    batch: int, grid: Sequence[int], ratio: float, generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform random patch masking (lowest uniform noise, as facebookresearch/mae).

    Args:
        batch: number of samples ``B``.
        grid: patch grid ``(gh, gw, gd)``.
        ratio: fraction of patches to mask; ``round(ratio * L)`` per sample exactly.
        generator: explicit RNG; its device is used when ``device`` is None.
        device: output device (must match the generator's device type).

    Returns:
        ``(B, gh, gw, gd)`` bool, True = masked.
    """
    grid = _grid3(grid)
    dev = _resolve_device(generator, device)
    num_patches = math.prod(grid)
    n_mask = num_masked(ratio, num_patches)
    noise = torch.rand(batch, num_patches, generator=generator, device=dev)
    # the n_mask smallest noise values: the same set as argsort(noise)[:, :n_mask] in MAE,
    # without a full sort (torch's CPU sort is an order of magnitude slower than topk here)
    ids_masked = torch.topk(noise, n_mask, dim=1, largest=False, sorted=False).indices
    mask = torch.zeros(batch, num_patches, dtype=torch.bool, device=dev)
    mask.scatter_(1, ids_masked, True)
    return mask.view(batch, *grid)


def block_masking(
    batch: int, grid: Sequence[int], ratio: float, generator: torch.Generator,
    block_size: BlockSize = (2, 4), device: torch.device | str | None = None,
) -> Tensor:
    """Cuboid block masking at uniform positions with an exact ratio.

    ``K`` blocks per sample (enough for their expected union to exceed the budget) get side
    lengths drawn from ``block_size`` per axis and uniform positions (clipped at the grid
    border, so every patch is equally likely to be covered); blocks
    are taken in draw order until the budget is reached, then :func:`fix_mask_count` trims
    the last block from its borders or grows the blocks to the exact count.

    Args:
        batch: number of samples ``B``.
        grid: patch grid ``(gh, gw, gd)``.
        ratio: fraction of patches to mask.
        generator: explicit RNG; its device is used when ``device`` is None.
        block_size: inclusive side-length range ``(lo, hi)`` in patches for all axes, or one
            range per axis. Default ``(2, 4)``.
        device: output device.

    Returns:
        ``(B, gh, gw, gd)`` bool, True = masked.
    """
    grid = _grid3(grid)
    dev = _resolve_device(generator, device)
    ranges = _block_ranges(block_size)
    num_patches = math.prod(grid)
    n_mask = num_masked(ratio, num_patches)
    k = _n_blocks(n_mask / num_patches, num_patches, _mean_volume(ranges, grid, clipped=True))
    if k == 0:
        return torch.zeros(batch, *grid, dtype=torch.bool, device=dev)
    rank = _rank_map(*_draw_blocks(batch, 0, k, ranges, grid, generator, dev), grid)
    return fix_mask_count(rank > 0, n_mask, generator, priority=rank)


def prior_to_placement_probs(
    prior: Tensor, temperature: float = 1.0, uniform_floor: float = 0.1, eps: float = 1e-6
) -> Tensor:
    """Block-centre placement probabilities from a prior map.

    ``p = (1 - floor) * softmax(log(prior + eps) / T) + floor / L`` over the ``L`` patches,
    i.e. ``p`` is proportional to ``(prior + eps) ** (1 / T)`` mixed with a uniform floor.
    ``T < 1`` sharpens, ``T > 1`` flattens; a zero or constant prior gives uniform ``p``.

    Args:
        prior: ``(B, gh, gw, gd)`` non-negative (negative values are clipped to 0).
        temperature: ``T > 0``.
        uniform_floor: probability mass spread uniformly, in ``[0, 1]``.
        eps: added before the log so that zero-prior patches stay drawable.

    Returns:
        ``(B, L)`` float rows summing to 1.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= uniform_floor <= 1.0:
        raise ConfigError(f"uniform_floor must be in [0, 1], got {uniform_floor}")
    flat = torch.nan_to_num(prior.float().flatten(1), nan=0.0).clamp_min(0.0)
    p = torch.softmax(torch.log(flat + eps) / temperature, dim=1)
    return (1.0 - uniform_floor) * p + uniform_floor / flat.shape[1]


def lesion_aware_block_masking(
    prior: Tensor, ratio: float, generator: torch.Generator, block_size: BlockSize = (2, 4),
    temperature: float = 1.0, uniform_floor: float = 0.1, prior_fraction: float = 0.7,
    margin: int = 1,
) -> Tensor:
    """Block masking with blocks placed preferentially over (and around) likely lesions.

    ``round(prior_fraction * n_mask)`` patches are spent on *prior blocks*: centres drawn
    with replacement from :func:`prior_to_placement_probs`, sides drawn from ``block_size``
    and enlarged by ``margin`` patches on every side, so one block hides a lesion together
    with its surroundings. Prior blocks are taken in draw order up to their budget (the one
    crossing it keeps its most likely patches, border first out). The rest goes to uniform
    blocks as in
    :func:`block_masking`, and the count is made exact by growing or trimming. A zero or
    flat prior reduces to block masking with larger prior blocks.

    Args:
        prior: ``(B, gh, gw, gd)`` lesion prior (any non-negative scale, e.g. in [0, 1]);
            its device is the output device.
        ratio: fraction of patches to mask, exact per sample.
        generator: explicit RNG on ``prior``'s device.
        block_size: side-length range(s) in patches before the margin. Default ``(2, 4)``.
        temperature: softmax temperature of the prior. Default 1.
        uniform_floor: uniform mass mixed into the placement probabilities. Default 0.1.
        prior_fraction: fraction of the budget on prior-guided blocks, in [0, 1]. Default 0.7.
        margin: patches added on each side of prior blocks. Default 1.

    Returns:
        ``(B, gh, gw, gd)`` bool, True = masked.
    """
    if prior.ndim != 4:
        raise ConfigError(f"prior must be (B, gh, gw, gd), got shape {tuple(prior.shape)}")
    if not 0.0 <= prior_fraction <= 1.0 or margin < 0:
        raise ConfigError(f"need prior_fraction in [0, 1] and margin >= 0, got "
                          f"{prior_fraction}, {margin}")
    dev = _resolve_device(generator, prior.device)
    grid, batch, ranges = _grid3(prior.shape[1:]), prior.shape[0], _block_ranges(block_size)
    num_patches = math.prod(grid)
    n_mask = num_masked(ratio, num_patches)
    n_prior = int(round(prior_fraction * n_mask))
    kp = _n_blocks(n_prior / num_patches, num_patches,
                   _mean_volume(ranges, grid, margin, clipped=True))
    ku = _n_blocks((n_mask - n_prior) / max(num_patches - n_prior, 1), num_patches,
                   _mean_volume(ranges, grid, clipped=True))
    ku = min(ku, _MAX_BLOCKS - kp)
    if n_mask == 0 or kp + ku == 0:
        return torch.zeros(batch, *grid, dtype=torch.bool, device=dev)
    probs = prior_to_placement_probs(prior, temperature, uniform_floor)
    starts, sizes = _draw_blocks(batch, kp, ku, ranges, grid, generator, dev, probs, margin)
    rank = _rank_map(starts, sizes, grid)
    return _two_stage_count(rank, probs.view_as(rank), ku, n_prior, n_mask, generator)


def _two_stage_count(
    rank: Tensor, probs: Tensor, ku: int, n_prior: int, n_mask: int, generator: torch.Generator
) -> Tensor:
    """Exact count: first up to ``n_prior`` prior-block patches, then uniform blocks, then grow.

    ``rank > ku`` marks patches whose earliest covering block is a prior block (prior blocks
    are ranked above all uniform blocks); ``1 <= rank <= ku`` marks uniform-block patches.
    Within a block, patches are kept by placement probability (so a trimmed prior block
    keeps the likely-lesion part) and then by masked neighbours (borders go first).
    """
    nb = _neighbour_fraction(rank > 0)
    likely = probs / probs.flatten(1).amax(1).view(-1, 1, 1, 1)  # (0, 1], 1 = most likely
    priority = rank + 0.25 * likely + 0.25 * nb
    noise = _TIE_NOISE * torch.rand(rank.shape, generator=generator, device=rank.device)
    in_prior = rank > ku
    keep_prior = _top_n(torch.where(in_prior, priority + noise, -1.0), n_prior) & in_prior
    in_uniform = (rank > 0) & ~in_prior
    score = torch.where(in_uniform, 4.0 + priority, nb) + noise
    score = torch.where(keep_prior, 1e6, score)
    return _top_n(score, n_mask)
