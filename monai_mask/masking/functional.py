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
are drawn at once; each block owns one bit of an int64 word, per-axis words ``(B, g)`` of
the blocks covering each index come from a difference array and a ``cumsum``, and the AND of
the three axis words of a patch has, as its lowest set bit, the earliest block covering it
(exact integer arithmetic, no ``(B, K, L)`` tensor). :func:`fix_mask_count` then makes the
count exact with one ``topk``: surplus patches are removed from the block added last, border
patches first; missing patches are grown next to existing blocks, falling back to random
patches.

CPU cost is dominated by the fixed per-call overhead of ~100 small tensor ops and by
``topk`` (see docs/masking.md#speed); constant index tables are cached per configuration
and device, and no step copies to the host or loops over samples, so the samplers run
unchanged on CUDA tensors.
"""

from __future__ import annotations

import functools
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
_MAX_BLOCKS = 1000  # bounds the (B, K / 62, L) bit-word tensors of _rank_map
_WORD_BITS = 62  # blocks per int64 bit word in _rank_map (x & -x must stay positive)


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


@functools.lru_cache(maxsize=256)
def _mean_volume(
    ranges: tuple[tuple[int, int], ...], grid: tuple[int, ...], grow: int = 0,
    clipped: bool = False,
) -> float:
    """Expected block volume in patches (independent uniform sides, limited by the grid).

    Cached: the samplers call it with the same (hashable) arguments on every batch.

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


@functools.lru_cache(maxsize=64)
def _draw_tables(
    kp: int, ku: int, ranges: tuple[tuple[int, int], ...], grid: tuple[int, int, int],
    margin: int, device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Constant tables of :func:`_draw_blocks`, built once per configuration and device.

    Returns ``lo (K, 3)`` smallest side per block (prior blocks ``+ 2 * margin``), ``span
    (3,)`` float number of side lengths, ``g (3,)`` grid, ``g - 1`` and the grid coordinates
    ``(L, 3)`` of each C-order patch index. Read-only: callers must not modify them.
    """
    lo = torch.tensor([r[0] for r in ranges]).repeat(kp + ku, 1)
    lo[:kp] += 2 * margin
    span = torch.tensor([float(r[1] - r[0] + 1) for r in ranges])
    g = torch.tensor(grid)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), -1)
    return tuple(t.to(device) for t in (lo, span, g, g - 1, coords.view(-1, 3)))


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
    lo, span, g, gm1, coords = _draw_tables(kp, ku, tuple(ranges), tuple(grid), margin, device)
    u = torch.rand(batch, kp + ku, 6, generator=generator, device=device)
    sizes = torch.minimum((u[..., :3] * span).long() + lo, g)
    starts = (u[..., 3:] * (sizes + gm1)).long() - sizes + 1
    if kp:
        centres = torch.multinomial(probs, kp, replacement=True, generator=generator)
        offsets = (sizes[:, :kp] + (u[:, :kp, 3:] < 0.5) - 1) // 2  # even sides either way
        starts[:, :kp] = coords[centres] - offsets
    return starts, sizes


@functools.lru_cache(maxsize=64)
def _rank_tables(
    k: int, size: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Constant tables of :func:`_rank_map` for ``K = k`` blocks on a grid of ``size``.

    Returns the flat position of ``(word, axis, index 0)`` of each block and axis ``(K, 3)``
    in a ``(W, 3, 3 * size + 1)`` difference array (index ``i`` at ``i + size``, so starts
    down to ``-(size - 1)`` and ends up to ``2 * size`` fit), the block bits ``+2 ** (k %
    62)`` and their negatives ``(1, 3 K)``, and the rank offsets ``K - 62 w`` ``(W, 1, 1,
    1)``. Read-only.
    """
    words, span = -(-k // _WORD_BITS), 3 * size + 1
    block = torch.arange(k)
    base = ((block // _WORD_BITS)[:, None] * 3 + torch.arange(3)) * span + size
    bit = (1 << (block % _WORD_BITS)).repeat_interleave(3).view(1, 3 * k)
    offset = k - _WORD_BITS * torch.arange(words, dtype=torch.int32).view(words, 1, 1, 1)
    return tuple(t.to(device) for t in (base, bit, -bit, offset))


def _rank_map(starts: Tensor, sizes: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Rank of the earliest cuboid covering each patch (exact, integer arithmetic).

    Block ``k`` owns bit ``k % 62`` of the int64 bit word ``w = k // 62``. Per word and
    axis, the bits of the blocks covering each index are built as a difference array
    (``+bit`` at the start, ``-bit`` at the end, two ``scatter_add_``) and a ``cumsum``;
    the words of a patch are the AND of its three axis words, and its earliest covering
    block is the lowest set bit of its first non-zero word, isolated with ``x & -x`` and
    read from the exponent of its (exact) float value. No ``(B, K, L)`` tensor is formed.

    Args:
        starts: ``(B, K, 3)`` first patch index of each block per axis, ``>= -(g - 1)``.
        sizes: ``(B, K, 3)`` side lengths, ``1 <= size <= g``.
        grid: ``(gh, gw, gd)``.

    Returns:
        ``(B, gh, gw, gd)`` int32: ``K - k`` for the first block ``k`` covering the patch
        (``K`` = first block), ``<= 0`` where no block covers it.
    """
    batch, k = starts.shape[:2]
    gh, gw, gd = grid
    size = max(grid)
    base, bit, neg_bit, offset = _rank_tables(k, size, starts.device)
    words = offset.shape[0]
    first = starts + base
    diff = torch.zeros(batch, words * 3 * (3 * size + 1), dtype=torch.int64,
                       device=starts.device)
    diff.scatter_add_(1, first.view(batch, -1), bit.expand(batch, -1))
    diff.scatter_add_(1, (first + sizes).view(batch, -1), neg_bit.expand(batch, -1))
    bits = diff.view(batch, words, 3, -1).cumsum(3)[..., size:2 * size]  # (B, W, 3, size)
    x = bits[:, :, 0, :gh, None, None] & bits[:, :, 1, None, :gw, None]
    x = x & bits[:, :, 2, None, None, :gd]  # (B, W, gh, gw, gd)
    exponent = (x & -x).float().view(torch.int32) >> 23  # 0, or 127 + lowest set bit
    # covered: K - 62 w - (lowest set bit); uncovered (exponent 0): below -64000
    rank = offset - ((exponent + 65409) & 0xFFFF)
    return rank.amax(1) if words > 1 else rank[:, 0]


def _neighbour_fraction(mask: Tensor) -> Tensor:
    """Fraction of the 3x3x3 neighbourhood that is masked, ``(B, gh, gw, gd)`` float.

    Separable box sum by shifted slices (cheaper than ``avg_pool3d`` on small grids).
    """
    x = F.pad(mask.float(), (1, 1, 1, 1, 1, 1))
    x = x[:, :-2] + x[:, 1:-1] + x[:, 2:]
    x = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]
    x = x[..., :-2] + x[..., 1:-1] + x[..., 2:]
    return x / 27.0


def _tie_noise(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform tie-break noise in ``[0, _TIE_NOISE)`` with 16 random bits per value, float32.

    Drawn as full-range int64 words viewed as four int16 each (a quarter of the generator
    calls of ``torch.rand``).
    """
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, (-(-n // 4),), generator=generator,
                          device=device)
    return (words.view(torch.int16)[:n].view(*shape) + 32768.0) * (_TIE_NOISE / 65536)


def _top_n(score: Tensor, n: int) -> Tensor:
    """Bool mask of the ``n`` highest scores per sample (same shape as ``score``).

    ``score`` is float32 without NaN. The selection runs on the int32 view of the float
    bits (torch's integer ``topk`` skips the NaN handling of the float one: about 1.5x
    faster on CPU). Non-negative floats are ordered like their bits and all negative ones
    come below them, but negative scores are *not* ordered among themselves (sign-magnitude):
    callers use negatives only for patches that must lose to every non-negative score.
    """
    flat = score.reshape(score.shape[0], -1)
    out = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if n > 0:
        out.scatter_(1, flat.view(torch.int32).topk(n, dim=1, sorted=False).indices, True)
    return out.view(score.shape)


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
    noise = _tie_noise(mask.shape, generator, mask.device)
    keep = 0.5 * nb if priority is None else priority.float() + 0.5 * nb
    score = torch.where(mask, 4.0 + keep, nb) + noise
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
    # (on the int32 view of the floats in [0, 1): same order, faster integer topk)
    ids_masked = torch.topk(noise.view(torch.int32), n_mask, dim=1, largest=False,
                            sorted=False).indices
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
    flat = prior.float().flatten(1)
    if temperature == 1.0:  # softmax(log(x)) = x / sum(x), without log and exp
        # (+inf is capped so that the row sum stays finite)
        flat = torch.nan_to_num(flat, nan=0.0, posinf=1e30).clamp_min_(0.0).add_(eps)
        p = flat / flat.sum(1, keepdim=True)
    else:
        flat = torch.nan_to_num(flat, nan=0.0).clamp_min_(0.0).add_(eps)
        p = torch.softmax(flat.log_().div_(temperature), dim=1)
    return p.mul_(1.0 - uniform_floor).add_(uniform_floor / flat.shape[1])


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
    return _two_stage_count(rank, probs, ku, n_prior, n_mask, generator)


def _two_stage_count(
    rank: Tensor, probs: Tensor, ku: int, n_prior: int, n_mask: int, generator: torch.Generator
) -> Tensor:
    """Exact count: first up to ``n_prior`` prior-block patches, then uniform blocks, then grow.

    ``rank > ku`` marks patches whose earliest covering block is a prior block (prior blocks
    are ranked above all uniform blocks); ``1 <= rank <= ku`` marks uniform-block patches.
    Within a block, patches are kept by placement probability (so a trimmed prior block
    keeps the likely-lesion part) and then by masked neighbours (borders go first).
    ``rank`` is :func:`_rank_map`'s (``<= 0`` uncovered), ``probs`` the ``(B, L)``
    placement probabilities.
    """
    covered = rank > 0
    nb = _neighbour_fraction(covered)
    likely = (probs / probs.amax(1, keepdim=True)).view(nb.shape)  # (0, 1], 1 = most likely
    noise = _tie_noise(rank.shape, generator, rank.device)
    # priority (rank + 0.25 * likely + 0.25 * nb) plus the tie-break noise
    priority = torch.add(rank, likely.add_(nb), alpha=0.25).add_(noise)
    # prior-block patches have priority > ku + 0.99, above every other patch (uncovered ones
    # are negative), so the first top-n needs no mask; `& in_prior` drops any filler
    in_prior = rank > ku
    keep_prior = _top_n(priority, n_prior) & in_prior
    in_uniform = covered ^ in_prior  # in_prior is a subset of covered
    score = torch.where(in_uniform, priority.add_(4.0), nb.add_(noise))
    return _top_n(score.masked_fill_(keep_prior, 1e6), n_mask)
