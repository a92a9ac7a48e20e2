"""Reconstruction-error anomaly maps from a pretrained MAE.

Every voxel is scored: each window's patch grid is split by a random permutation into
``n_groups = round(1 / (1 - ratio))`` disjoint groups; draw ``i`` keeps group ``i`` visible and
masks the rest, so over one round every patch is hidden ``n_groups - 1`` times at the ratio the
model was trained with. The anomaly score of a voxel is its mean squared reconstruction error
over the draws that hid it (in normalised intensity units). Windows are combined by MONAI's
sliding-window inferer (Gaussian weighting).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.inferers import Inferer, SlidingWindowInferer

__all__ = ["reconstruction_image", "partition_masks", "score_window", "AnomalyInferer",
           "anomaly_auroc"]


def reconstruction_image(
    network: nn.Module, imgs: torch.Tensor, pred: torch.Tensor
) -> torch.Tensor:
    """The prediction as an image ``(B, C, H, W, D)`` in the units of ``imgs``.

    ViT predictions ``(B, L, p^3 C)`` are unpatchified; with ``norm_pix_loss`` each patch is
    de-normalised with the target patch's mean and std (as in the MAE paper's figures).
    """
    net = network.module if hasattr(network, "module") else network
    if pred.ndim == 5 and not getattr(net, "norm_pix_loss", False):
        return pred
    patches = pred if pred.ndim == 3 else net.patchify(pred)
    if getattr(net, "norm_pix_loss", False):
        target = net.patchify(imgs.float())
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        patches = patches.float() * (var + 1.0e-6) ** 0.5 + mean
    grid = [s // p for s, p in zip(imgs.shape[2:], net.patch_size, strict=True)]
    return _unpatchify(patches, grid, net.patch_size, imgs.shape[1])


def _unpatchify(x: torch.Tensor, grid: Sequence[int], patch: Sequence[int], c: int) -> torch.Tensor:
    (gh, gw, gd), (ph, pw, pd), b = grid, patch, x.shape[0]
    x = x.reshape(b, gh, gw, gd, ph, pw, pd, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, c, gh * ph, gw * pw, gd * pd)


def partition_masks(batch: int, grid: Sequence[int], n_groups: int,
                    generator: torch.Generator, device=None) -> torch.Tensor:
    """``n_groups`` masks ``(n_groups, B, gh, gw, gd)``; draw ``i`` shows only group ``i``.

    The patch grid is permuted at random per sample and cut into equal groups (sizes differ by
    at most one, the same in every sample), so each patch is visible in exactly one draw.
    """
    length = int(torch.tensor(grid).prod())
    noise = torch.rand(batch, length, generator=generator, device=generator.device)
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1).to(device or generator.device)
    bounds = torch.linspace(0, length, n_groups + 1).round().long().tolist()
    masks = [~((rank >= lo) & (rank < hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.stack(masks).reshape(n_groups, batch, *grid)


@torch.no_grad()
def score_window(network: nn.Module, window: torch.Tensor, ratio: float = 0.75,
                 rounds: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reconstruction and anomaly score of one window batch, ``(B, 2C, H, W, D)``.

    Channels ``[:C]`` are the mean reconstruction over the draws that hid each voxel, channels
    ``[C:]`` its mean squared error (the anomaly score).
    """
    net = network.module if hasattr(network, "module") else network
    grid = [s // p for s, p in zip(window.shape[2:], net.patch_size, strict=True)]
    n_groups = max(2, round(1.0 / max(1e-6, 1.0 - ratio)))
    g = generator or torch.Generator(device=window.device).manual_seed(0)
    recon_sum = torch.zeros_like(window, dtype=torch.float32)
    err_sum = torch.zeros_like(recon_sum)
    hidden = torch.zeros_like(recon_sum[:, :1])
    for _ in range(rounds):
        for mask in partition_masks(window.shape[0], grid, n_groups, g, window.device):
            _, pred, _ = network(window, mask=mask)
            recon = reconstruction_image(net, window, pred).float()
            vox = _voxel_mask(mask, net.patch_size).to(recon.dtype)
            recon_sum += recon * vox
            err_sum += (recon - window.float()).square() * vox
            hidden += vox
    hidden = hidden.clamp_min(1.0)
    return torch.cat([recon_sum / hidden, err_sum / hidden], dim=1)


def _voxel_mask(mask: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    m = mask[:, None].float()
    for axis, p in enumerate(patch):
        m = m.repeat_interleave(int(p), dim=axis + 2)
    return m


class AnomalyInferer(Inferer):
    """Whole-volume reconstruction + anomaly map with sliding windows (a MONAI ``Inferer``).

    ``inferer(image, network)`` maps a normalised ``(B, C, H, W, D)`` image to
    ``(B, 2C, H, W, D)``: reconstruction channels, then anomaly (squared error) channels.

    Args:
        roi_size: window size (a multiple of the mask patch; usually the training crop).
        ratio: masking ratio the model was trained with.
        rounds: partition rounds per window (more rounds average more draws).
        overlap, sw_batch_size: MONAI ``SlidingWindowInferer`` settings.
        seed: seed of the partition draws (maps are reproducible).
    """

    def __init__(self, roi_size: Sequence[int], ratio: float = 0.75, rounds: int = 1,
                 overlap: float = 0.25, sw_batch_size: int = 1, seed: int = 0,
                 progress: bool = False) -> None:
        super().__init__()
        self.ratio, self.rounds, self.seed = ratio, rounds, seed
        self.window = SlidingWindowInferer(roi_size=list(roi_size), sw_batch_size=sw_batch_size,
                                           overlap=overlap, mode="gaussian", progress=progress)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        network.eval()
        g = torch.Generator(device=inputs.device).manual_seed(self.seed)

        def predictor(window: torch.Tensor) -> torch.Tensor:
            return score_window(network, window, self.ratio, self.rounds, g)

        with torch.no_grad():
            return self.window(inputs, predictor)


def anomaly_auroc(score: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
    """AUROC of ``score`` separating ``positive`` from ``negative`` voxels (boolean masks).

    Mann-Whitney U statistic with average ranks for ties; 0.5 = chance.
    """
    from scipy.stats import rankdata

    pos, neg = score[positive].ravel(), score[negative].ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError("AUROC needs positive and negative voxels")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))
