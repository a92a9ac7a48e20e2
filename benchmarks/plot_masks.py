"""Render mid-slice examples of each sampler and prior on a CT-like phantom.

Writes ``docs/images/masks.png`` (or ``--out``): the phantom (air, fat-like body, a
soft-tissue tumour), the label and intensity priors, and one mask of each sampler (random,
block, lesion-aware with the label prior, lesion-aware with the intensity prior, and a
self-guided prior after a few simulated updates), all at ratio 0.4 on a 12^3 patch grid::

    python benchmarks/plot_masks.py [--out docs/images/masks.png] [--seed 0]
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from monai_mask.masking import (  # noqa: E402
    ReconstructionErrorPrior,
    block_masking,
    lesion_aware_block_masking,
    prior_from_intensity,
    prior_from_labels,
    random_masking,
)

RED = ListedColormap(["red"])
SIZE, PATCH, RATIO = 96, 8, 0.4
LESION_CENTRE, LESION_RADIUS = (44, 56, 36), 9.0


def phantom() -> tuple[torch.Tensor, torch.Tensor]:
    """CT-like image ``(1, 1, 96, 96, 96)`` in HU and its tumour label."""
    axes = torch.meshgrid(*[torch.arange(SIZE, dtype=torch.float32)] * 3, indexing="ij")
    body = sum(((a - 48) / r) ** 2 for a, r in zip(axes, (40, 34, 44), strict=True)) <= 1
    organ = sum(((a - c) / r) ** 2 for a, c, r in zip(axes, (48, 52, 44), (22, 18, 26),
                                                      strict=True)) <= 1
    tumour = sum((a - c) ** 2 for a, c in zip(axes, LESION_CENTRE, strict=True)) <= LESION_RADIUS**2
    image = torch.full((SIZE,) * 3, -1000.0)
    image[body] = -120.0  # fat-like
    image[organ] = 60.0  # soft-tissue organ (lesion-like intensity, too)
    image[tumour] = 140.0  # enhancing tumour
    image += 10.0 * torch.randn(image.shape, generator=torch.Generator().manual_seed(1))
    return image[None, None], tumour.float()[None, None]


def _upsample(grid_map: torch.Tensor) -> np.ndarray:
    """Patch-grid map ``(gh, gw, gd)`` to voxels."""
    up = grid_map.float()
    for axis in range(3):
        up = up.repeat_interleave(PATCH, dim=axis)
    return up.numpy()


def masks(image: torch.Tensor, label: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """One example of every sampler (and the priors) on the 12^3 grid."""
    gen = torch.Generator().manual_seed(seed)
    grid = (SIZE // PATCH,) * 3
    label_prior = prior_from_labels(label, PATCH)
    ct_prior = prior_from_intensity(image, PATCH, "ct", hu_range=(100.0, 300.0))
    error = ReconstructionErrorPrior(grid)  # simulate a model that fails on the tumour
    for _ in range(5):
        mask = random_masking(4, grid, 0.75, gen)
        error.update(mask, 0.2 + label_prior.expand(4, -1, -1, -1).flatten(1))
    guided = error.prior(1, progress=0.8)
    return {
        "label prior": label_prior[0],
        "CT intensity prior (100-300 HU)": ct_prior[0],
        "random": random_masking(1, grid, RATIO, gen)[0],
        "block": block_masking(1, grid, RATIO, gen)[0],
        "lesion-aware, label prior": lesion_aware_block_masking(label_prior, RATIO, gen)[0],
        "lesion-aware, intensity prior": lesion_aware_block_masking(ct_prior, RATIO, gen)[0],
        "self-guided prior (progress 0.8)": guided[0],
        "lesion-aware, self-guided": lesion_aware_block_masking(guided, RATIO, gen)[0],
    }


def render(out: str, seed: int) -> None:
    image, label = phantom()
    z = LESION_CENTRE[0]
    img = image[0, 0, z].numpy()
    contour = label[0, 0, z].numpy()
    panels = masks(image, label, seed)
    fig, axes = plt.subplots(2, 4, figsize=(13, 8))
    for ax, (title, grid_map) in zip(axes.ravel(), panels.items(), strict=True):
        ax.imshow(img.T, cmap="gray", vmin=-300, vmax=300, origin="lower")
        overlay = _upsample(grid_map)[z].T
        if grid_map.dtype == torch.bool:
            ax.imshow(np.ma.masked_where(overlay < 0.5, overlay), cmap=RED, alpha=0.5,
                      origin="lower", vmin=0, vmax=1)
            title = f"{title}\n{int(grid_map.sum())}/{grid_map.numel()} patches masked"
        else:
            ax.imshow(overlay, cmap="viridis", alpha=0.6, origin="lower", vmin=0, vmax=1)
        ax.contour(contour.T, levels=[0.5], colors="cyan", linewidths=0.8, origin="lower")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Mid-slice through the tumour (cyan), patch {PATCH}^3, grid 12^3, "
                 f"ratio {RATIO}; red = masked", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images/masks.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    render(args.out, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
