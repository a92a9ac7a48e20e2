"""Lesion priors on the patch grid: where lesion-aware block masking should place its blocks.

All priors are float ``(B, gh, gw, gd)`` in ``[0, 1]`` on the input's device, for a patch
size ``(ph, pw, pd)`` that divides the spatial shape (``gh = H // ph`` ...). Three sources:

- :func:`prior_from_labels`: lesion labels / ROIs, when they exist.
- :func:`prior_from_intensity`: unlabelled images; CT: lesion-like soft-tissue HU range
  inside the body; MR: per-image z-score outliers inside the foreground.
- :class:`ReconstructionErrorPrior`: self-guided, an EMA of the MAE's own per-patch
  reconstruction error with an easy-to-hard curriculum (AnatoMask, Li et al., ECCV 2024;
  hard patches mining, Wang et al., CVPR 2023).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from monai.utils import look_up_option
from torch import Tensor, nn

from monai_mask.errors import ConfigError, InputError

__all__ = [
    "prior_from_labels",
    "prior_from_intensity",
    "ReconstructionErrorPrior",
    "normalize_prior",
    "patch_fraction",
    "as_patch_size",
]


def as_patch_size(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    """Patch size as three positive ints (an int means a cube)."""
    ps = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
    if len(ps) != 3 or min(ps) < 1:
        raise ConfigError(f"patch_size must be an int or three positive ints, got {patch_size}")
    return ps  # type: ignore[return-value]


def _check_5d(x: Tensor, name: str, patch: tuple[int, int, int]) -> None:
    if x.ndim != 5:
        raise InputError(name, f"expected shape (B, C, H, W, D), got {tuple(x.shape)}")
    if any(s % p for s, p in zip(x.shape[2:], patch, strict=True)):
        raise InputError(
            name, f"spatial shape {tuple(x.shape[2:])} is not divisible by patch size {patch}"
        )


def patch_fraction(voxels: Tensor, patch_size: int | Sequence[int]) -> Tensor:
    """Fraction of True voxels per patch.

    Args:
        voxels: ``(B, H, W, D)`` bool (or 0/1 float).
        patch_size: patch size in voxels.

    Returns:
        ``(B, gh, gw, gd)`` float in ``[0, 1]``.
    """
    patch = as_patch_size(patch_size)
    return F.avg_pool3d(voxels.float()[:, None], patch, stride=patch)[:, 0]


def normalize_prior(prior: Tensor) -> Tensor:
    """Divide each sample by its maximum (samples with an all-zero prior stay zero)."""
    peak = prior.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (prior / peak).clamp(0.0, 1.0)


def prior_from_labels(
    label: Tensor, patch_size: int | Sequence[int], dilation: int = 1,
    dilation_weight: float = 0.5,
) -> Tensor:
    """Lesion prior from a label map: lesion fraction per patch, dilated, normalised.

    Args:
        label: ``(B, 1, H, W, D)``, voxels ``> 0`` are lesion; a one-hot ``(B, C, ...)``
            label (channel 0 = background) uses channels ``1:``.
        patch_size: patch size in voxels (int or three ints) dividing ``H, W, D``.
        dilation: patches of surroundings added around the lesion by max-pooling
            (kernel ``2 * dilation + 1``). 0 disables.
        dilation_weight: prior value of the dilated surroundings relative to the lesion
            patch they come from, in ``[0, 1]``; 1 makes surroundings as likely as the lesion.

    Returns:
        ``(B, gh, gw, gd)`` float in ``[0, 1]``, maximum 1 in samples that contain a lesion.
    """
    patch = as_patch_size(patch_size)
    _check_5d(label, "label", patch)
    if dilation < 0 or not 0.0 <= dilation_weight <= 1.0:
        raise ConfigError(f"need dilation >= 0 and dilation_weight in [0, 1], got "
                          f"{dilation}, {dilation_weight}")
    lesion = (label if label.shape[1] == 1 else label[:, 1:]).amax(1) > 0
    frac = patch_fraction(lesion, patch)
    if dilation > 0:
        grown = F.max_pool3d(frac[:, None], 2 * dilation + 1, stride=1, padding=dilation)[:, 0]
        frac = torch.maximum(frac, dilation_weight * grown)
    return normalize_prior(frac)


def _ct_candidates(
    image: Tensor, hu_range: tuple[float, float], body_threshold: float
) -> Tensor:
    """``(B, H, W, D)`` bool: voxels in the HU range inside the body (channel 0, raw HU)."""
    hu = image[:, 0]
    return (hu > body_threshold) & (hu >= hu_range[0]) & (hu <= hu_range[1])


def _mr_candidates(image: Tensor, z_thresh: float, foreground_fraction: float) -> Tensor:
    """``(B, H, W, D)`` bool: foreground voxels with ``|z| > z_thresh`` in any channel.

    Foreground per image and channel: intensity above ``min + foreground_fraction * range``;
    the z-score uses the foreground mean and standard deviation.
    """
    x = image.float().flatten(2)  # (B, C, N)
    lo, hi = x.amin(2, keepdim=True), x.amax(2, keepdim=True)
    fg = x > lo + foreground_fraction * (hi - lo)
    n = fg.sum(2, keepdim=True).clamp_min(1)
    mean = (x * fg).sum(2, keepdim=True) / n
    std = (((x - mean) ** 2 * fg).sum(2, keepdim=True) / n).sqrt().clamp_min(1e-6)
    outlier = ((x - mean).abs() / std > z_thresh) & fg
    return outlier.any(1).view(image.shape[0], *image.shape[2:])


def prior_from_intensity(
    image: Tensor, patch_size: int | Sequence[int], modality: Literal["ct", "mr"],
    hu_range: tuple[float, float] = (-100.0, 300.0), body_threshold: float = -500.0,
    z_thresh: float = 2.0, foreground_fraction: float = 0.05, normalize: bool = True,
) -> Tensor:
    """Label-free lesion prior from intensities: fraction of lesion-like voxels per patch.

    CT (``modality="ct"``): voxels of channel 0 within ``hu_range`` (default -100..300 HU,
    soft tissue and enhancing lesions; excludes air, lung, fat and bone) inside the body
    (``HU > body_threshold``). **Runs on raw HU**: place it before intensity normalisation
    (e.g. before ``ScaleIntensityRanged``), or pass thresholds in the normalised units.
    MR (``modality="mr"``): voxels whose per-image z-score magnitude over the foreground
    exceeds ``z_thresh`` (in any channel); MR has no absolute scale, so any input scaling is
    fine.

    Args:
        image: ``(B, C, H, W, D)``.
        patch_size: patch size in voxels dividing ``H, W, D``.
        modality: ``"ct"`` or ``"mr"``.
        hu_range: CT inclusive lesion-like range.
        body_threshold: CT body foreground threshold.
        z_thresh: MR outlier threshold on ``|z|``.
        foreground_fraction: MR foreground threshold as a fraction of the intensity range.
        normalize: divide each sample by its maximum so that the prior peaks at 1.

    Returns:
        ``(B, gh, gw, gd)`` float in ``[0, 1]``.
    """
    modality = look_up_option(modality, ("ct", "mr"))
    patch = as_patch_size(patch_size)
    _check_5d(image, "image", patch)
    if modality == "ct":
        candidates = _ct_candidates(image, hu_range, body_threshold)
    else:
        candidates = _mr_candidates(image, z_thresh, foreground_fraction)
    frac = patch_fraction(candidates, patch)
    return normalize_prior(frac) if normalize else frac


class ReconstructionErrorPrior(nn.Module):
    """Self-guided prior: EMA of the per-patch reconstruction loss, with a curriculum.

    Keeps, per patch-grid cell, an exponential moving average of the MAE loss of masked
    patches. ``prior(batch, progress)`` returns ``(1 - progress) * 1 + progress * error``,
    where ``error`` is the EMA min-max normalised to ``[0, 1]``: at ``progress = 0`` the
    prior is flat (plain block masking, the easy start), at ``progress = 1`` blocks go where
    the model reconstructs worst (hard patches), in the spirit of AnatoMask (Li et al., ECCV
    2024) and hard patches mining (Wang et al., CVPR 2023). ``progress`` is typically
    ``iteration / total_iterations``.

    Simplification: training crops come from different positions and cases, so by default
    one EMA grid is shared by all crops (a *positional* difficulty over the crop grid). With
    ``num_cases`` set and case indices passed to :meth:`update` / :meth:`prior`, each case
    keeps its own grid (still per crop grid, not per position in the whole volume).

    State (``ema``, ``count``) lives in buffers: it moves with ``.to(device)`` and is saved in
    ``state_dict()`` for an exact resume.

    Args:
        grid: patch grid ``(gh, gw, gd)``.
        momentum: EMA momentum ``m`` in ``[0, 1)``: ``ema = m * ema + (1 - m) * loss``.
        num_cases: number of separate grids (1 = shared).
    """

    def __init__(self, grid: Sequence[int], momentum: float = 0.9, num_cases: int = 1) -> None:
        super().__init__()
        if len(grid) != 3 or not 0.0 <= momentum < 1.0 or num_cases < 1:
            raise ConfigError(f"need a 3D grid, momentum in [0, 1), num_cases >= 1; got "
                              f"{tuple(grid)}, {momentum}, {num_cases}")
        self.grid = tuple(int(g) for g in grid)
        self.momentum = float(momentum)
        self.register_buffer("ema", torch.zeros(num_cases, *self.grid))
        self.register_buffer("count", torch.zeros(num_cases, *self.grid))

    def _case_index(self, batch: int, positions: Tensor | None) -> Tensor:
        if positions is None:
            return torch.zeros(batch, dtype=torch.long, device=self.ema.device)
        idx = torch.as_tensor(positions, device=self.ema.device).long().view(-1)
        if idx.numel() != batch or idx.min() < 0 or idx.max() >= self.ema.shape[0]:
            raise ConfigError(f"positions must be {batch} case indices in [0, {self.ema.shape[0]})")
        return idx

    @torch.no_grad()
    def update(self, mask: Tensor, per_patch_loss: Tensor, positions: Tensor | None = None) -> None:
        """Fold a batch of per-patch losses of masked patches into the EMA.

        Args:
            mask: ``(B, gh, gw, gd)`` or ``(B, L)`` bool, True = masked.
            per_patch_loss: ``(B, L)`` loss per patch (only masked entries are used), or
                ``(B, n_mask)`` losses of the masked patches in ``mask.flatten(1)`` order.
            positions: optional ``(B,)`` case indices into the ``num_cases`` grids.
        """
        mask = mask.to(self.ema.device).flatten(1).bool()
        loss = per_patch_loss.detach().to(self.ema.device, torch.float32)
        if loss.shape != mask.shape:
            loss = torch.zeros(mask.shape, device=mask.device).masked_scatter(mask, loss)
        cases = self._case_index(mask.shape[0], positions)
        total = torch.zeros_like(self.ema).flatten(1).index_add_(0, cases, loss * mask)
        hits = torch.zeros_like(self.ema).flatten(1).index_add_(0, cases, mask.float())
        seen = hits > 0
        mean = total / hits.clamp_min(1)
        ema, count = self.ema.flatten(1), self.count.flatten(1)
        blended = torch.where(count > 0, self.momentum * ema + (1 - self.momentum) * mean, mean)
        ema.copy_(torch.where(seen, blended, ema))
        count.add_(hits)

    def error_map(self, cases: Tensor) -> Tensor:
        """EMA min-max normalised per grid, ``(B, gh, gw, gd)``; unseen cells get the mean."""
        ema, seen = self.ema[cases].flatten(1), self.count[cases].flatten(1) > 0
        n_seen = seen.sum(1, keepdim=True).clamp_min(1)
        fill = (ema * seen).sum(1, keepdim=True) / n_seen
        ema = torch.where(seen, ema, fill)
        lo, hi = ema.amin(1, keepdim=True), ema.amax(1, keepdim=True)
        err = torch.where(hi > lo, (ema - lo) / (hi - lo).clamp_min(1e-12), torch.ones_like(ema))
        return err.view(-1, *self.grid)

    def prior(self, batch: int, progress: float = 1.0, positions: Tensor | None = None) -> Tensor:
        """Current prior ``(B, gh, gw, gd)`` in ``[0, 1]``.

        Args:
            batch: number of samples.
            progress: curriculum position in ``[0, 1]`` (0 = uniform, 1 = error-guided).
            positions: optional ``(B,)`` case indices.
        """
        if not 0.0 <= float(progress) <= 1.0:
            raise ConfigError(f"progress must be in [0, 1], got {progress}")
        err = self.error_map(self._case_index(batch, positions))
        return (1.0 - float(progress)) + float(progress) * err

    def forward(self, batch: int, progress: float = 1.0, positions: Tensor | None = None) -> Tensor:
        """Same as :meth:`prior`."""
        return self.prior(batch, progress, positions)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, momentum={self.momentum}, num_cases={self.ema.shape[0]}"
