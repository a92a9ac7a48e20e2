"""SparK-style masked autoencoder for a residual-encoder U-Net (MONAI ``DynUNet(res_block=True)``).

Sparse convolutions are emulated densely, as in nnssl's MAE for CNNs (Wald et al., "An OpenMind
for 3D medical vision self-supervised learning", CVPR 2025) following SparK (Tian et al.,
"Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling", ICLR 2023):

* the mask lives on the coarsest grid (one cell = the encoder's total stride) with
  ``1 = masked``; it is upsampled (nearest, exactly) to every stage's resolution;
* masked input voxels are zeroed, and every convolution output and every stage output is
  multiplied by the visible mask, so nothing of a masked region reaches a visible feature and the
  mask pattern does not blur away with depth;
* instance-norm statistics are computed over visible voxels only (``sparse_norm=True``, the
  instance-norm analogue of SparK's sparse batch norm); with ``sparse_norm=False`` the norm sees
  the zeros of the masked regions, as in nnssl's dense masking;
* before decoding, masked positions of every scale are filled with a learned mask token
  ("densifying") and a light UNet-like decoder predicts the voxels; the loss is the MSE on
  masked voxels only, optionally against per-patch normalised targets (He et al., MAE).

The encoder (``SparkMAE3D.encoder``) has exactly DynUNet's module names (``input_block``,
``downsamples.{i}``, ``bottleneck``) and shapes, so it loads strictly into the segmentation
``DynUNet`` (see :func:`monai_mask.networks.heads.cnn_mae_to_dynunet`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock, get_conv_layer
from monai.networks.nets import DynUNet
from monai.utils import ensure_tuple_rep, look_up_option

from monai_mask.networks.registry import register_model

__all__ = [
    "ResidualEncoder",
    "SparkMAE3D",
    "cnn_mae_resenc_tiny_s16_i32",
    "cnn_mae_resenc_small_s16_i96",
    "cnn_mae_resenc_base_s32_i160",
]

_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


def _per_dim(values: Sequence[Sequence[int] | int], spatial_dims: int) -> list[tuple[int, ...]]:
    """Per-stage values as tuples of ``spatial_dims`` ints."""
    return [tuple(ensure_tuple_rep(v, spatial_dims)) for v in values]


def _masked_instance_norm(norm: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Instance norm whose statistics use visible voxels only (SparK's sparse norm, dense).

    Args:
        norm: the block's ``nn.InstanceNorm{2,3}d``; its ``eps`` and affine parameters are used.
        x: features ``(B, C, *S)``, zero at masked positions.
        keep: visible mask ``(B, 1, *S)`` (1 = visible) as a float tensor.

    Returns:
        normalised features ``(B, C, *S)``, zero at masked positions.
    """
    dtype, dims = x.dtype, tuple(range(2, x.ndim))
    x, keep = x.float(), keep.float()
    count = keep.sum(dim=dims, keepdim=True).clamp_min(1.0)
    mean = (x * keep).sum(dim=dims, keepdim=True) / count
    var = ((x - mean) * keep).square().sum(dim=dims, keepdim=True) / count
    y = (x - mean) * torch.rsqrt(var + norm.eps)
    if norm.affine:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y = y * norm.weight.float().view(shape) + norm.bias.float().view(shape)
    return (y * keep).to(dtype)


def _masked_res_block(
    block: UnetResBlock, x: torch.Tensor, keep: torch.Tensor, sparse_norm: bool
) -> torch.Tensor:
    """``UnetResBlock.forward`` with every convolution output re-masked (sparse conv, dense).

    Args:
        block: a MONAI ``UnetResBlock`` (its modules are used as they are).
        x: input features ``(B, Cin, *S_in)``, zero at masked positions.
        keep: visible mask at the block's *output* resolution ``(B, 1, *S_out)``.
        sparse_norm: normalise over visible voxels only; else the plain (dense) norm layers.
    """

    def norm(layer: nn.Module, t: torch.Tensor) -> torch.Tensor:
        return _masked_instance_norm(layer, t, keep) if sparse_norm else layer(t)

    def remask(t: torch.Tensor) -> torch.Tensor:
        return t * keep.to(t.dtype)  # keeps bf16 activations bf16 under autocast

    out = block.lrelu(norm(block.norm1, remask(block.conv1(x))))
    out = norm(block.norm2, remask(block.conv2(out)))
    residual = x
    if hasattr(block, "conv3"):
        residual = remask(block.conv3(residual))
    if hasattr(block, "norm3"):
        residual = norm(block.norm3, residual)
    return remask(block.lrelu(out + residual))


class ResidualEncoder(nn.Module):
    """The encoder of MONAI ``DynUNet(res_block=True)``, with DynUNet's module names and init.

    State-dict keys are ``input_block.*``, ``downsamples.{i}.*`` and ``bottleneck.*``, exactly as
    in ``DynUNet`` built with the same ``filters``, ``kernel_size``, ``strides``, ``norm_name``,
    ``act_name`` and ``dropout``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        filters: output channels per stage (one per stride; extra entries are dropped as DynUNet).
        kernel_size: per-stage kernel sizes (int or per-dimension tuple each).
        strides: per-stage strides; ``strides[0]`` belongs to the input block.
        norm_name: MONAI norm spec.
        act_name: MONAI activation spec.
        dropout: MONAI dropout spec.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        filters: Sequence[int],
        kernel_size: Sequence[Sequence[int] | int],
        strides: Sequence[Sequence[int] | int],
        norm_name: tuple | str = ("INSTANCE", {"affine": True}),
        act_name: tuple | str = _ACT,
        dropout: tuple | str | float | None = None,
    ) -> None:
        super().__init__()
        if len(kernel_size) != len(strides) or len(strides) < 3:
            raise ValueError("kernel_size and strides need the same length, at least 3")
        if len(filters) < len(strides):
            raise ValueError(f"need {len(strides)} filters (one per stride), got {len(filters)}")
        filters = list(filters)[: len(strides)]
        chans = [in_channels, *filters]

        def block(i: int) -> UnetResBlock:
            return UnetResBlock(
                spatial_dims, chans[i], chans[i + 1], kernel_size[i], strides[i],
                norm_name, act_name, dropout=dropout,
            )

        self.input_block = block(0)
        self.downsamples = nn.ModuleList([block(i) for i in range(1, len(strides) - 1)])
        self.bottleneck = block(len(strides) - 1)
        self.apply(DynUNet.initialize_weights)

    @property
    def stages(self) -> list[UnetResBlock]:
        """The blocks in order: ``input_block``, ``downsamples...``, ``bottleneck``."""
        return [self.input_block, *self.downsamples, self.bottleneck]

    def forward(
        self, x: torch.Tensor, keeps: Sequence[torch.Tensor] | None = None, sparse_norm: bool = True
    ) -> list[torch.Tensor]:
        """Features of every stage, finest first.

        Args:
            x: images ``(B, C, *S)``; masked voxels must already be zero when ``keeps`` is given.
            keeps: visible masks per stage output ``(B, 1, *S_i)`` (1 = visible); ``None`` runs
                the plain DynUNet blocks (no masking).
            sparse_norm: with ``keeps``, normalise over visible voxels only.

        Returns:
            ``[f_0, ..., f_n]`` with ``f_i`` of shape ``(B, filters[i], *S_i)``.
        """
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x) if keeps is None else _masked_res_block(stage, x, keeps[i], sparse_norm)
            feats.append(x)
        return feats


class SparkMAE3D(nn.Module):
    """SparK-style masked autoencoder on a MONAI residual-encoder U-Net (dense emulation).

    Args:
        in_channels: image channels.
        spatial_dims: 2 or 3 (masks are ``(B, *grid)`` with ``len(grid) == spatial_dims``).
        filters: encoder channels per stage (DynUNet ``filters``).
        kernel_size: int or per-stage kernel sizes.
        strides: per-stage strides (DynUNet ``strides``); their product per dimension is the
            mask patch size.
        norm_name: MONAI norm spec of the encoder and decoder.
        act_name: MONAI activation spec.
        decoder_channels: decoder widths per stage, finest first; default ``max(8, f // 2)``.
        norm_pix_loss: normalise targets per patch (mean/var over its voxels and channels).
        img_size: training crop size; must be divisible by the patch size.
        mask_ratio: fraction of grid cells masked when ``forward`` draws the mask itself.
        patch_size: optional expected mask patch size; ``ValueError`` unless it equals the
            encoder's total stride.
        sparse_norm: instance-norm statistics over visible voxels only (needs instance norm).
    """

    def __init__(
        self,
        in_channels: int = 1,
        spatial_dims: int = 3,
        filters: Sequence[int] = (32, 64, 128, 256, 320),
        kernel_size: Sequence[Sequence[int] | int] | int = 3,
        strides: Sequence[Sequence[int] | int] = (1, 2, 2, 2, 2),
        norm_name: tuple | str = ("INSTANCE", {"affine": True}),
        act_name: tuple | str = _ACT,
        decoder_channels: Sequence[int] | None = None,
        norm_pix_loss: bool = False,
        img_size: Sequence[int] | int = 96,
        mask_ratio: float = 0.75,
        patch_size: Sequence[int] | int | None = None,
        sparse_norm: bool = True,
    ) -> None:
        super().__init__()
        n = len(strides)
        kernels = [kernel_size] * n if isinstance(kernel_size, int) else list(kernel_size)
        filters = list(filters)[:n]
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.strides = _per_dim(strides, spatial_dims)
        self.img_size = tuple(ensure_tuple_rep(img_size, spatial_dims))
        self.norm_pix_loss, self.mask_ratio = norm_pix_loss, mask_ratio
        self.sparse_norm = sparse_norm
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if patch_size is not None and tuple(ensure_tuple_rep(patch_size, spatial_dims)) != (
            self.patch_size
        ):
            raise ValueError(
                f"mask patch size {patch_size} must equal the encoder's total stride "
                f"{self.patch_size}"
            )
        self.mask_grid(self.img_size)  # validates img_size against the total stride
        self.encoder = ResidualEncoder(
            spatial_dims, in_channels, filters, kernels, strides, norm_name, act_name
        )
        norm = self.encoder.input_block.norm1
        if sparse_norm and not isinstance(norm, nn.modules.instancenorm._InstanceNorm):
            raise ValueError("sparse_norm=True needs an instance norm; pass sparse_norm=False")
        dec = list(decoder_channels) if decoder_channels else [max(8, f // 2) for f in filters]
        if len(dec) != n:
            raise ValueError(f"decoder_channels needs {n} entries, got {len(dec)}")
        self._build_decoder(filters, dec, norm_name, act_name)
        self.config = {
            "in_channels": in_channels, "spatial_dims": spatial_dims, "filters": tuple(filters),
            "kernel_size": tuple(kernels), "strides": tuple(strides), "norm_name": norm_name,
            "act_name": act_name, "decoder_channels": tuple(dec), "norm_pix_loss": norm_pix_loss,
            "img_size": self.img_size, "mask_ratio": mask_ratio, "sparse_norm": sparse_norm,
        }

    def _build_decoder(
        self, filters: list[int], dec: list[int], norm_name: tuple | str, act_name: tuple | str
    ) -> None:
        """Mask tokens, densifying projections, upsampling blocks and the voxel head."""
        sd, n = self.spatial_dims, len(filters)
        self.mask_tokens = nn.ParameterList(
            [nn.Parameter(torch.zeros((1, f) + (1,) * sd)) for f in filters]
        )
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02)
        self.densify_proj = nn.ModuleList(
            get_conv_layer(sd, filters[i], dec[i], kernel_size=1 if i == n - 1 else 3, bias=True)
            for i in range(n)
        )
        self.decoder_up = nn.ModuleList(
            get_conv_layer(sd, dec[i + 1], dec[i], kernel_size=self.strides[i + 1],
                           stride=self.strides[i + 1], bias=True, is_transposed=True)
            for i in range(n - 1)
        )
        self.decoder_blocks = nn.ModuleList(
            UnetBasicBlock(sd, dec[i], dec[i], 3, 1, norm_name, act_name) for i in range(n - 1)
        )
        s0 = self.strides[0]
        self.decoder_pred = get_conv_layer(
            sd, dec[0], self.in_channels, kernel_size=s0, stride=s0, bias=True,
            is_transposed=any(s > 1 for s in s0),
        )

    @property
    def patch_size(self) -> tuple[int, ...]:
        """Mask patch size per dimension = the encoder's total stride (e.g. ``(16, 16, 16)``)."""
        return tuple(math.prod(s[d] for s in self.strides) for d in range(self.spatial_dims))

    def mask_grid(self, img_size: Sequence[int] | int) -> tuple[int, ...]:
        """Mask grid ``img_size // patch_size``; ``ValueError`` when not divisible."""
        size = tuple(ensure_tuple_rep(img_size, self.spatial_dims))
        if any(s % p for s, p in zip(size, self.patch_size, strict=True)):
            raise ValueError(
                f"image size {size} is not divisible by the mask patch size (total encoder "
                f"stride) {self.patch_size}"
            )
        return tuple(s // p for s, p in zip(size, self.patch_size, strict=True))

    def _stage_factors(self) -> list[tuple[int, ...]]:
        """Upsampling factor from the mask grid to each stage output (and the input first)."""
        factors, cum = [self.patch_size], [1] * self.spatial_dims
        for s in self.strides:
            cum = [c * si for c, si in zip(cum, s, strict=True)]
            factors.append(tuple(p // c for p, c in zip(self.patch_size, cum, strict=True)))
        return factors

    def visible_masks(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """Visible masks (1 = visible) at the input and at every stage output.

        Args:
            mask: ``(B, *grid)`` with 1/True = masked.

        Returns:
            ``[keep_input, keep_0, ..., keep_n]``, each ``(B, 1, *S)`` float, upsampled from the
            grid by exact nearest-neighbour repetition.
        """
        keep = (~mask.bool()).float().unsqueeze(1)
        out = []
        for factor in self._stage_factors():
            k = keep
            for d, f in enumerate(factor):
                k = k.repeat_interleave(f, dim=d + 2)
            out.append(k)
        return out

    def _check_mask(self, imgs: torch.Tensor, mask: torch.Tensor) -> None:
        grid = self.mask_grid(imgs.shape[2:])
        if tuple(mask.shape) != (imgs.shape[0], *grid):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match the grid {(imgs.shape[0], *grid)} "
                f"of images {tuple(imgs.shape)} with patch size {self.patch_size}"
            )

    def random_masking(
        self, batch: int, grid: Sequence[int], generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Exact-ratio random mask ``(B, *grid)`` (bool, 1 = masked), MAE's argsort of noise.

        Draws from ``generator`` (on ``device``) and never from the global RNG when one is given.
        """
        length = math.prod(grid)
        len_masked = int(round(length * self.mask_ratio))
        noise = torch.rand(batch, length, generator=generator, device=device)
        ids_shuffle = torch.argsort(noise, dim=1)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        mask.scatter_(1, ids_shuffle[:, :len_masked], True)
        return mask.view(batch, *grid)

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Masked encoder features.

        Args:
            x: images ``(B, C, *S)``.
            mask: ``(B, *grid)``, 1 = masked; ``grid = S // patch_size``.

        Returns:
            features per stage, finest first, ``(B, filters[i], *S_i)``, zero at masked positions.
        """
        self._check_mask(x, mask)
        keeps = self.visible_masks(mask.to(x.device))
        return self.encoder(x * keeps[0].to(x.dtype), keeps[1:], sparse_norm=self.sparse_norm)

    def forward_decoder(self, features: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Densify every scale with its mask token and decode to voxels.

        Args:
            features: output of :meth:`forward_encoder`.
            mask: ``(B, *grid)``, 1 = masked.

        Returns:
            predicted images ``(B, C, *S)``.
        """
        keeps = self.visible_masks(mask.to(features[0].device))[1:]
        dense = [
            f * k.to(f.dtype) + tok.to(f.dtype) * (1 - k.to(f.dtype))
            for f, k, tok in zip(features, keeps, self.mask_tokens, strict=True)
        ]
        x = self.densify_proj[-1](dense[-1])
        for i in range(len(dense) - 2, -1, -1):
            x = self.decoder_up[i](x) + self.densify_proj[i](dense[i])
            x = self.decoder_blocks[i](x)
        return self.decoder_pred(x)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, L, prod(patch_size) * C)`` in C-order over the grid."""
        b, c, *size = imgs.shape
        grid, p, sd = self.mask_grid(size), self.patch_size, self.spatial_dims
        x = imgs.reshape(b, c, *[v for gp in zip(grid, p, strict=True) for v in gp])
        perm = (0, *range(2, 2 + 2 * sd, 2), *range(3, 3 + 2 * sd, 2), 1)
        return x.permute(perm).reshape(b, math.prod(grid), math.prod(p) * c)

    def per_patch_loss(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Mean squared error per mask-grid cell ``(B, L)`` (targets per-patch normalised if set).

        Used by :meth:`forward_loss` and by the self-guided (reconstruction-error) prior.
        """
        target = self.patchify(imgs.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return (self.patchify(pred.float()) - target).square().mean(dim=-1)

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
        reduction: Literal["mean", "none"] = "mean",
    ) -> torch.Tensor:  # fmt: skip
        """Reconstruction loss on the masked voxels only.

        Args:
            imgs: ``(B, C, *S)`` targets.
            pred: ``(B, C, *S)`` predictions.
            mask: ``(B, *grid)`` or ``(B, L)``, 1 = masked; visible cells do not count.
            reduction: ``"mean"`` (scalar over masked cells) or ``"none"`` (the ``(B, L)``
                per-patch loss, visible cells included, e.g. for the self-guided prior).
        """
        reduction = look_up_option(reduction, ("mean", "none"))
        loss = self.per_patch_loss(imgs, pred)
        if reduction == "none":
            return loss
        m = mask.reshape(loss.shape).to(loss.dtype)
        return (loss * m).sum() / m.sum().clamp_min(1.0)

    def forward(
        self, imgs: torch.Tensor, mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, encode, decode and score.

        Args:
            imgs: ``(B, C, *S)`` with ``S`` divisible by ``patch_size``.
            mask: ``(B, *grid)`` (1 = masked); drawn with ``mask_ratio`` from ``generator``
                when ``None``.
            generator: RNG for the mask draw.

        Returns:
            ``(loss, pred, mask)``: scalar loss, ``pred`` ``(B, C, *S)``, bool ``mask``.
        """
        if mask is None:
            grid = self.mask_grid(imgs.shape[2:])
            mask = self.random_masking(imgs.shape[0], grid, generator, imgs.device)
        mask = mask.bool()
        pred = self.forward_decoder(self.forward_encoder(imgs, mask), mask)
        return self.forward_loss(imgs, pred, mask), pred, mask


def _build(defaults: dict, overrides: dict) -> SparkMAE3D:
    return SparkMAE3D(**{**defaults, **overrides})


@register_model
def cnn_mae_resenc_tiny_s16_i32(**overrides) -> SparkMAE3D:
    """Tiny ResEnc MAE: filters (8, 16, 32, 64, 64), strides (1, 2, 2, 2, 2), 32^3 crops."""
    defaults = {"filters": (8, 16, 32, 64, 64), "strides": (1, 2, 2, 2, 2), "img_size": 32}
    return _build(defaults, overrides)


@register_model
def cnn_mae_resenc_small_s16_i96(**overrides) -> SparkMAE3D:
    """Small ResEnc MAE: filters (16, 32, 64, 128, 256), strides (1, 2, 2, 2, 2), 96^3 crops."""
    defaults = {"filters": (16, 32, 64, 128, 256), "strides": (1, 2, 2, 2, 2), "img_size": 96}
    return _build(defaults, overrides)


@register_model
def cnn_mae_resenc_base_s32_i160(**overrides) -> SparkMAE3D:
    """Base (nnU-Net-like) ResEnc MAE: filters (32, 64, 128, 256, 320, 320), strides
    (1, 2, 2, 2, 2, 2), 160^3 crops."""
    defaults = {
        "filters": (32, 64, 128, 256, 320, 320), "strides": (1, 2, 2, 2, 2, 2), "img_size": 160,
    }
    return _build(defaults, overrides)
