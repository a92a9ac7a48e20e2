"""Step masker: draws each batch's patch mask on the images' device inside the training step.

The masker owns the masking settings of a pretraining run (sampler, ratio, block sizes, prior
source) and, for the self-guided prior, the running reconstruction-error state, which is
updated from the step's per-patch losses. Its generator is reseeded from ``(seed, iteration)`` at
every step, so a resumed run draws exactly the masks the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn as nn
from monai.utils import ensure_tuple_rep, look_up_option

from monai_mask.masking import functional as MF
from monai_mask.masking import priors as MP

__all__ = ["StepMasker", "MASK_MODES", "PRIOR_SOURCES"]

MASK_MODES = ("random", "block", "lesion_aware")
PRIOR_SOURCES = ("none", "label", "intensity", "self")
_SEED_STRIDE = 1_000_003


class StepMasker(nn.Module):
    """Batch mask sampler for the pretraining step (1 = masked, shape ``(B, gh, gw, gd)``).

    Args:
        patch_size: the network's mask patch (ViT patch size or CNN total stride).
        ratio: masking ratio, exact per sample.
        mode: ``random``, ``block`` or ``lesion_aware``.
        prior_source: where the lesion prior comes from (``lesion_aware`` only): ``label``
            (the batch's ``label`` key), ``intensity`` (the batch's ``raw`` key: un-normalised
            HU for CT), ``self`` (running reconstruction error), or ``none``.
        block_size: ``(lo, hi)`` block side range in patches.
        temperature, uniform_floor, prior_fraction, margin: see
            :func:`monai_mask.masking.functional.lesion_aware_block_masking`.
        modality: ``ct`` or ``mr`` for the intensity prior.
        label_dilation: dilation (patches) of the label prior.
        ema: momentum of the self-guided error EMA.
        seed: base seed; the step's generator is seeded with ``seed * 1000003 + iteration``.
    """

    def __init__(
        self,
        patch_size: Sequence[int] | int,
        ratio: float = 0.75,
        mode: Literal["random", "block", "lesion_aware"] = "random",
        prior_source: Literal["none", "label", "intensity", "self"] = "none",
        block_size: Sequence[int] = (2, 4),
        temperature: float = 1.0,
        uniform_floor: float = 0.1,
        prior_fraction: float = 0.7,
        margin: int = 1,
        modality: Literal["ct", "mr"] = "ct",
        label_dilation: int = 1,
        ema: float = 0.9,
        grid: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.patch_size = ensure_tuple_rep(patch_size, 3)
        self.ratio = float(ratio)
        MF.num_masked(self.ratio, 1)  # validates the ratio
        self.mode = look_up_option(mode, MASK_MODES)
        self.prior_source = look_up_option(prior_source, PRIOR_SOURCES)
        self.block_size = tuple(int(b) for b in block_size)
        self.lesion_kwargs = dict(temperature=temperature, uniform_floor=uniform_floor,
                                  prior_fraction=prior_fraction, margin=margin)
        self.modality = look_up_option(modality.lower(), ("ct", "mr"))
        self.label_dilation = label_dilation
        self.seed = int(seed)
        self.self_prior = (MP.ReconstructionErrorPrior(tuple(grid), momentum=ema)
                           if self.prior_source == "self" and grid is not None else None)
        self._gen: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device, iteration: int) -> torch.Generator:
        """The step's generator on ``device``, seeded from ``(seed, iteration)``."""
        key = str(device)
        if key not in self._gen:
            self._gen[key] = torch.Generator(device=device)
        return self._gen[key].manual_seed(self.seed * _SEED_STRIDE + int(iteration))

    def grid(self, images: torch.Tensor) -> tuple[int, int, int]:
        """Patch grid ``(gh, gw, gd)`` of a ``(B, C, H, W, D)`` batch."""
        return tuple(s // p for s, p in zip(images.shape[2:], self.patch_size, strict=True))

    def prior(self, images: torch.Tensor, batch: Mapping, progress: float) -> torch.Tensor:
        """Lesion prior ``(B, gh, gw, gd)`` on the images' device."""
        b, device = images.shape[0], images.device
        if self.prior_source == "label":
            label = batch["label"].to(device)
            return MP.prior_from_labels(label, self.patch_size, dilation=self.label_dilation)
        if self.prior_source == "intensity":
            raw = batch["raw"].to(device) if "raw" in batch else images
            return MP.prior_from_intensity(raw, self.patch_size, modality=self.modality)
        if self.prior_source == "self" and self.self_prior is not None:
            return self.self_prior.prior(b, progress=progress).to(device)
        return torch.zeros((b, *self.grid(images)), device=device)

    def forward(self, images: torch.Tensor, batch: Mapping | None = None, iteration: int = 0,
                progress: float = 1.0) -> torch.Tensor:
        """Draw the mask of one batch: bool ``(B, gh, gw, gd)``, True = masked."""
        g = self.generator(images.device, iteration)
        grid, b = self.grid(images), images.shape[0]
        if self.mode == "random":
            return MF.random_masking(b, grid, self.ratio, g, device=images.device)
        if self.mode == "block":
            return MF.block_masking(b, grid, self.ratio, g, block_size=self.block_size,
                                    device=images.device)
        prior = self.prior(images, batch or {}, progress)
        return MF.lesion_aware_block_masking(prior, self.ratio, g, block_size=self.block_size,
                                             **self.lesion_kwargs)

    @torch.no_grad()
    def update(self, mask: torch.Tensor, per_patch_loss: torch.Tensor) -> None:
        """Feed the step's per-patch losses ``(B, L)`` to the self-guided prior (if any)."""
        if self.self_prior is not None:
            self.self_prior.update(mask.reshape(mask.shape[0], -1),
                                   per_patch_loss.detach().float())
