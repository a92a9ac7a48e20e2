"""3D ViT masked autoencoder with a visible-token encoder and an external patch-grid mask.

House style after facebookresearch/mae ``models_mae.py`` (``patchify``, ``unpatchify``,
``random_masking``, ``forward_encoder``, ``forward_decoder``, ``forward_loss``), in 3D and for
any channel count. The encoder reuses MONAI's ``PatchEmbeddingBlock`` and ``TransformerBlock``
(attention through ``torch.nn.functional.scaled_dot_product_attention``), so its parameter
names are those of ``monai.networks.nets.ViT`` and the encoder loads into MONAI ``ViT`` /
``UNETR`` with ``monai_mask.io.checkpoint.vit_mae_to_vit`` (plus ``add_prefix(sd, "vit.")``).

Mask convention: over the patch grid ``1 / True = masked (hidden)``, ``0 / False = visible``;
a mask is ``(B, gh, gw, gd)`` or ``(B, L)`` with ``L = gh * gw * gd`` in C-order over the grid
(the token order of ``PatchEmbeddingBlock``). Every sample must hide the same number of
patches, so the visible tokens form a dense ``(B, L_vis, E)`` batch.

References:
    He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
    https://arxiv.org/abs/2111.06377 and https://github.com/facebookresearch/mae
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
from monai.networks.blocks.patchembedding import PatchEmbeddingBlock
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.utils import ensure_tuple_rep, look_up_option

from monai_mask.networks.pos_embed import get_3d_sincos_pos_embed, interpolate_pos_embed
from monai_mask.networks.registry import register_model

__all__ = [
    "MaskedAutoencoderViT3D",
    "vit_mae_base_p16_i96",
    "vit_mae_base_p8_i96",
    "vit_mae_small_p16_i96",
    "vit_mae_tiny_p8_i32",
    "vit_mae_tiny_p4_i32",
]


def _transformer_block(hidden: int, mlp_dim: int, heads: int, qkv_bias: bool) -> TransformerBlock:
    """MONAI ``TransformerBlock`` with SDPA attention; its unused cross-attention norm is frozen.

    MONAI >= 1.6 always creates ``norm_cross_attn`` (kept for checkpoint compatibility) even
    without cross-attention; freezing it keeps DDP and optimisers from waiting on its grads.
    """
    blk = TransformerBlock(hidden, mlp_dim, heads, 0.0, qkv_bias, use_flash_attention=True)
    if hasattr(blk, "norm_cross_attn"):
        blk.norm_cross_attn.requires_grad_(False)
    return blk


class MaskedAutoencoderViT3D(nn.Module):
    """Masked autoencoder with a MONAI-compatible 3D ViT encoder and a light decoder.

    Args:
        in_channels: image channels C (any count; the prediction head emits ``p^3 * C``).
        img_size: crop size ``(H, W, D)`` the fixed position embeddings are built for; other
            sizes (multiples of the patch) run with trilinearly interpolated embeddings.
        patch_size: patch size ``(ph, pw, pd)``; must divide ``img_size``.
        hidden_size, mlp_dim, num_layers, num_heads: encoder width, MLP width, depth, heads
            (same meaning as in ``monai.networks.nets.ViT``).
        decoder_hidden_size, decoder_mlp_dim, decoder_num_layers, decoder_num_heads: decoder.
        mask_ratio: fraction of patches hidden by ``random_masking`` (external masks rule).
        norm_pix_loss: regress per-patch normalised pixels (MAE paper, Sec. 4) if True.
        cls_token: prepend a learned class token in the encoder (MONAI ``ViT`` without
            classification has none, so it is dropped when transferring weights).
        qkv_bias: bias in the qkv projection (MONAI's default is False).
    """

    def __init__(
        self,
        in_channels: int = 1,
        img_size: Sequence[int] | int = 96,
        patch_size: Sequence[int] | int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        decoder_hidden_size: int = 384,
        decoder_mlp_dim: int = 1536,
        decoder_num_layers: int = 4,
        decoder_num_heads: int = 12,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        cls_token: bool = False,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.img_size = ensure_tuple_rep(img_size, 3)
        self.patch_size = ensure_tuple_rep(patch_size, 3)
        if any(i % p for i, p in zip(self.img_size, self.patch_size, strict=True)):
            raise ValueError(f"patch_size {self.patch_size} must divide img_size {self.img_size}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.grid_size = tuple(i // p for i, p in zip(self.img_size, self.patch_size, strict=True))
        self.num_patches = math.prod(self.grid_size)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        # constructor settings: heads.seg_config_from_mae derives the fine-tuning network from it
        self.config = dict(
            in_channels=in_channels, img_size=self.img_size, patch_size=self.patch_size,
            hidden_size=hidden_size, mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads,
            decoder_hidden_size=decoder_hidden_size, decoder_mlp_dim=decoder_mlp_dim,
            decoder_num_layers=decoder_num_layers, decoder_num_heads=decoder_num_heads,
            mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, cls_token=cls_token,
            qkv_bias=qkv_bias,
        )  # fmt: skip
        # --- encoder (MONAI ViT names) ---
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels, self.img_size, self.patch_size, hidden_size, num_heads,
            proj_type="conv", pos_embed_type="none", spatial_dims=3,
        )  # fmt: skip
        self.patch_embedding.position_embeddings = nn.Parameter(
            get_3d_sincos_pos_embed(hidden_size, self.grid_size), requires_grad=False
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if cls_token else None
        self.blocks = nn.ModuleList(
            _transformer_block(hidden_size, mlp_dim, num_heads, qkv_bias) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        # --- decoder (MAE names) ---
        self.decoder_embed = nn.Linear(hidden_size, decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))
        self.decoder_pos_embed = nn.Parameter(
            get_3d_sincos_pos_embed(decoder_hidden_size, self.grid_size), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            _transformer_block(decoder_hidden_size, decoder_mlp_dim, decoder_num_heads, qkv_bias)
            for _ in range(decoder_num_layers)
        )
        self.decoder_norm = nn.LayerNorm(decoder_hidden_size)
        self.decoder_pred = nn.Linear(decoder_hidden_size, math.prod(self.patch_size) * in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE initialisation: xavier-uniform linears (and the patch projection seen as a
        linear), zero biases, unit LayerNorms, N(0, 0.02) mask/class tokens."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        proj = self.patch_embedding.patch_embeddings
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    # ------------------------------------------------------------------ patches
    def patch_grid(self, imgs: torch.Tensor) -> tuple[int, int, int]:
        """Patch grid ``(gh, gw, gd)`` of ``imgs`` ``(B, C, H, W, D)``; sizes must be multiples."""
        if imgs.ndim != 5:
            raise ValueError(f"expected images (B, C, H, W, D), got shape {tuple(imgs.shape)}")
        spatial = tuple(imgs.shape[2:])
        if len(spatial) != 3 or any(s % p for s, p in zip(spatial, self.patch_size, strict=True)):
            raise ValueError(f"image size {tuple(spatial)} is not a multiple of {self.patch_size}")
        return tuple(s // p for s, p in zip(spatial, self.patch_size, strict=True))  # type: ignore[return-value]

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W, D)`` -> ``(B, L, ph * pw * pd * C)``; inside a patch C is fastest."""
        b, c = imgs.shape[:2]
        (gh, gw, gd), (ph, pw, pd) = self.patch_grid(imgs), self.patch_size
        x = imgs.reshape(b, c, gh, ph, gw, pw, gd, pd)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # B gh gw gd ph pw pd C
        return x.reshape(b, gh * gw * gd, ph * pw * pd * c)

    def unpatchify(self, x: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, L, ph * pw * pd * C)`` -> ``(B, C, H, W, D)``; inverse of ``patchify``.

        Args:
            x: patch tokens; C is inferred from the last dimension.
            grid: ``(gh, gw, gd)`` with ``gh * gw * gd == L``; defaults to the built grid.
        """
        gh, gw, gd = self.grid_size if grid is None else tuple(grid)
        (ph, pw, pd), b = self.patch_size, x.shape[0]
        if x.shape[1] != gh * gw * gd or x.shape[2] % (ph * pw * pd):
            raise ValueError(f"tokens {tuple(x.shape)} do not fit grid {(gh, gw, gd)}")
        c = x.shape[2] // (ph * pw * pd)
        x = x.reshape(b, gh, gw, gd, ph, pw, pd, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, gh * ph, gw * pw, gd * pd)

    # ------------------------------------------------------------------ masks
    def random_masking(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        *,
        grid: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform random mask hiding ``int(L * mask_ratio)`` patches per sample.

        Args:
            batch: B.
            generator: explicit RNG (its device is where the noise is drawn).
            grid: patch grid, defaults to the built one.
            device: where to put the result (default: the generator's device, else CPU).

        Returns:
            ``mask`` bool ``(B, L)`` (True = masked) and ``ids_restore`` long ``(B, L)``.
        """
        n = math.prod(self.grid_size if grid is None else grid)
        draw_device = generator.device if generator is not None else device
        noise = torch.rand(batch, n, generator=generator, device=draw_device)
        noise = noise.to(device or draw_device)
        len_keep = n - int(n * self.mask_ratio)
        ids_shuffle = torch.argsort(noise, dim=1)  # small noise = keep
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(batch, n, dtype=torch.bool, device=noise.device)
        mask[:, :len_keep] = False
        return torch.gather(mask, 1, ids_restore), ids_restore

    def _check_mask(self, mask: torch.Tensor, batch: int, grid: Sequence[int]) -> torch.Tensor:
        """Validate a ``(B, gh, gw, gd)`` or ``(B, L)`` mask; return it as bool ``(B, L)``.

        Raises:
            ValueError: wrong shape, or samples hiding different numbers of patches.
        """
        n = math.prod(grid)
        if tuple(mask.shape) not in ((batch, *grid), (batch, n)):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} fits neither (B, gh, gw, gd) = "
                f"{(batch, *grid)} nor (B, L) = {(batch, n)}"
            )
        mask = mask.reshape(batch, n) != 0
        counts = mask.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"every sample must mask the same number of patches, got {counts.tolist()}"
            )
        return mask

    # ------------------------------------------------------------------ model
    def _pos_embed(self, pos: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        return interpolate_pos_embed(pos, self.grid_size, grid)

    def forward_encoder(
        self, imgs: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed and encode only the visible patches.

        The patch projection (MONAI's Conv3d with kernel = stride = patch) is applied as the
        equivalent linear map to the gathered visible patches, so no full-length work is done.

        Args:
            imgs: ``(B, C, H, W, D)``.
            mask: ``(B, gh, gw, gd)`` or ``(B, L)``, 1 = masked; same count in every sample.

        Returns:
            ``latent`` ``(B, [1 +] L_vis, E)`` (normed; class token first when enabled) and
            ``ids_restore`` ``(B, L)`` (argsort that undoes the visible-first shuffle).
        """
        grid, b = self.patch_grid(imgs), imgs.shape[0]
        mask = self._check_mask(mask, b, grid)
        ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # visible first
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, : mask.shape[1] - int(mask[0].sum())]
        patches = self.patchify(imgs)
        patches = torch.gather(patches, 1, ids_keep[..., None].expand(-1, -1, patches.shape[-1]))
        proj = self.patch_embedding.patch_embeddings
        weight = proj.weight.permute(0, 2, 3, 4, 1).reshape(proj.weight.shape[0], -1)
        x = nn.functional.linear(patches, weight, proj.bias)
        pos = self._pos_embed(self.patch_embedding.position_embeddings, grid).expand(b, -1, -1)
        x = x + torch.gather(pos, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), ids_restore

    def forward_decoder(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Fill the masked positions with the mask token and predict every patch.

        Args:
            latent: encoder output ``(B, [1 +] L_vis, E)``.
            ids_restore: ``(B, L)`` from ``forward_encoder``.
            grid: patch grid of the input, defaults to the built one.

        Returns:
            predictions ``(B, L, ph * pw * pd * C)`` in patchified order.
        """
        grid = self.grid_size if grid is None else tuple(grid)
        x = self.decoder_embed(latent)
        if self.cls_token is not None:
            x = x[:, 1:]
        b, n_vis, width = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - n_vis, -1)], dim=1)
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, width))
        x = x + self._pos_embed(self.decoder_pos_embed, grid)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def per_patch_loss(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Mean squared error of every patch, float32 ``(B, L)`` (masked and visible alike).

        With ``norm_pix_loss`` the target patch is normalised by its own mean and variance.
        """
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return (pred.float() - target).pow(2).mean(dim=-1)

    def forward_loss(
        self,
        imgs: torch.Tensor,
        pred: torch.Tensor,
        mask: torch.Tensor,
        reduction: Literal["mean", "none"] = "mean",
    ) -> torch.Tensor:
        """Reconstruction loss on the masked patches only.

        Args:
            imgs: ``(B, C, H, W, D)`` targets.
            pred: ``(B, L, p^3 * C)`` from ``forward_decoder``.
            mask: ``(B, L)`` or ``(B, gh, gw, gd)``, 1 = masked.
            reduction: ``"mean"`` (scalar mean over masked patches) or ``"none"`` (the
                ``(B, L)`` per-patch loss, e.g. for the self-guided masking prior; visible
                patches are included there, weight them with ``mask``).
        """
        reduction = look_up_option(reduction, ("mean", "none"))
        per_patch = self.per_patch_loss(imgs, pred)
        if reduction == "none":
            return per_patch
        m = mask.reshape(per_patch.shape).to(per_patch.dtype)
        return (per_patch * m).sum() / m.sum().clamp_min(1.0)

    def forward(
        self,
        imgs: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One MAE pass.

        Args:
            imgs: ``(B, C, H, W, D)``, sizes multiples of the patch size.
            mask: external mask ``(B, gh, gw, gd)`` or ``(B, L)`` (1 = masked; the main path);
                if None, ``random_masking`` draws one with ``generator``.
            generator: RNG for the random mask.

        Returns:
            ``loss`` (scalar), ``pred`` ``(B, L, p^3 * C)``, ``mask`` bool ``(B, L)``.
        """
        grid, b = self.patch_grid(imgs), imgs.shape[0]
        if mask is None:
            mask, _ = self.random_masking(b, generator, grid=grid, device=imgs.device)
        mask = self._check_mask(mask, b, grid)
        latent, ids_restore = self.forward_encoder(imgs, mask)
        pred = self.forward_decoder(latent, ids_restore, grid)
        return self.forward_loss(imgs, pred, mask), pred, mask


# ---------------------------------------------------------------------- factories
def _build(defaults: dict, overrides: dict) -> MaskedAutoencoderViT3D:
    return MaskedAutoencoderViT3D(**{**defaults, **overrides})


_BASE = dict(hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12, decoder_hidden_size=384,
             decoder_mlp_dim=1536, decoder_num_layers=4, decoder_num_heads=12)  # fmt: skip
_SMALL = dict(hidden_size=384, mlp_dim=1536, num_layers=12, num_heads=6, decoder_hidden_size=256,
              decoder_mlp_dim=1024, decoder_num_layers=4, decoder_num_heads=8)  # fmt: skip
_TINY = dict(hidden_size=96, mlp_dim=192, num_layers=2, num_heads=3, decoder_hidden_size=64,
             decoder_mlp_dim=128, decoder_num_layers=1, decoder_num_heads=4)  # fmt: skip


@register_model
def vit_mae_base_p16_i96(**overrides) -> MaskedAutoencoderViT3D:
    """ViT-B/16 MAE (768 wide, 12 layers, 12 heads, MLP 3072), 96^3 crops, 6^3 = 216 tokens."""
    return _build({**_BASE, "patch_size": 16, "img_size": 96}, overrides)


@register_model
def vit_mae_base_p8_i96(**overrides) -> MaskedAutoencoderViT3D:
    """ViT-B/8 MAE, 96^3 crops, 12^3 = 1728 tokens."""
    return _build({**_BASE, "patch_size": 8, "img_size": 96}, overrides)


@register_model
def vit_mae_small_p16_i96(**overrides) -> MaskedAutoencoderViT3D:
    """ViT-S/16 MAE (384 wide, 12 layers, 6 heads, MLP 1536), 96^3 crops."""
    return _build({**_SMALL, "patch_size": 16, "img_size": 96}, overrides)


@register_model
def vit_mae_tiny_p8_i32(**overrides) -> MaskedAutoencoderViT3D:
    """Tiny test/CPU model (96 wide, 2 layers, 3 heads; decoder 64 x 1), 32^3, 4^3 tokens."""
    return _build({**_TINY, "patch_size": 8, "img_size": 32}, overrides)


@register_model
def vit_mae_tiny_p4_i32(**overrides) -> MaskedAutoencoderViT3D:
    """Tiny model with 4^3 patches on 32^3 crops (8^3 = 512 tokens)."""
    return _build({**_TINY, "patch_size": 4, "img_size": 32}, overrides)
