"""Fixed 3D sine-cosine position embeddings and their resampling to other patch grids.

The layout follows facebookresearch/mae ``util/pos_embed.py`` extended to three axes: each
axis gets ``2 * (embed_dim // 6)`` channels, ``[sin, cos]`` of the grid index times
``1 / 10000 ** (k / n)``; channels left over when ``embed_dim`` is not a multiple of 6 are zero.
Token order is C-order over the grid ``(gh, gw, gd)``, as MONAI's ``PatchEmbeddingBlock``.

References:
    He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
    https://arxiv.org/abs/2111.06377
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["get_3d_sincos_pos_embed", "interpolate_pos_embed"]


def _sincos_1d(positions: torch.Tensor, dim: int, temperature: float) -> torch.Tensor:
    """``(N,)`` positions -> ``(N, dim)`` with ``dim`` even: ``[sin(pos * w), cos(pos * w)]``."""
    half = dim // 2
    omega = 1.0 / temperature ** (torch.arange(half, dtype=torch.float64) / max(half, 1))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_3d_sincos_pos_embed(
    embed_dim: int, grid: Sequence[int], temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding for a patch grid.

    Args:
        embed_dim: token width E (any value >= 6; the tail beyond ``6 * (E // 6)`` is zero).
        grid: patch-grid size ``(gh, gw, gd)``.
        temperature: frequency base, 10000 as in the transformer and MAE papers.

    Returns:
        float32 tensor ``(1, gh * gw * gd, E)``, tokens in C-order over the grid.
    """
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive sizes, got {tuple(grid)}")
    if embed_dim < 6:
        raise ValueError(f"embed_dim must be >= 6 for a 3D sin-cos embedding, got {embed_dim}")
    axis_dim = 2 * (embed_dim // 6)
    coords = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    parts = [_sincos_1d(c.reshape(-1), axis_dim, temperature) for c in coords]
    emb = torch.cat(parts, dim=1)
    emb = F.pad(emb, (0, embed_dim - emb.shape[1]))
    return emb.to(torch.float32).unsqueeze(0)


def interpolate_pos_embed(
    pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]
) -> torch.Tensor:
    """Resample a ``(1, L, E)`` position embedding from ``old_grid`` to ``new_grid`` (trilinear).

    Lets a model pretrained on, e.g., 96^3 crops with 16^3 patches (grid 6^3) run on 128^3
    inputs (grid 8^3). On the same grid the input is returned unchanged.

    Args:
        pos_embed: ``(1, prod(old_grid), E)`` embedding, C-order tokens.
        old_grid: ``(gh, gw, gd)`` the embedding was built for.
        new_grid: target ``(gh', gw', gd')``.

    Returns:
        ``(1, prod(new_grid), E)`` tensor with the dtype and device of ``pos_embed``.
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    n_old = old_grid[0] * old_grid[1] * old_grid[2]
    if pos_embed.ndim != 3 or pos_embed.shape[1] != n_old:
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not fit grid {old_grid}"
        )
    if old_grid == new_grid:
        return pos_embed
    emb = pos_embed.reshape(1, *old_grid, -1).permute(0, 4, 1, 2, 3).float()
    emb = F.interpolate(emb, size=new_grid, mode="trilinear", align_corners=False)
    return emb.permute(0, 2, 3, 4, 1).reshape(1, -1, pos_embed.shape[-1]).to(pos_embed.dtype)
