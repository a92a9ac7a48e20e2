"""Segmentation networks built from a pretrained MAE encoder, and the weight transfer.

* ``backbone="cnn"``: MONAI ``DynUNet(res_block=True)`` with the filters, kernels and strides of
  :class:`~monai_mask.networks.cnn_mae.SparkMAE3D`; its encoder (``input_block``,
  ``downsamples.*``, ``bottleneck``) receives every pretrained tensor.
* ``backbone="vit"``: MONAI ``UNETR`` (Hatamizadeh et al., WACV 2022) with the ViT settings of
  :class:`~monai_mask.networks.vit_mae.MaskedAutoencoderViT3D`. MONAI's UNETR fixes the patch
  size to 16 and the depth to 12; for other settings :class:`ViTUNETR` builds the same layout
  (same module names) for any power-of-two patch size and depth.

Example:
    >>> cfg = seg_config_from_mae("cnn_mae_resenc_tiny_s16_i32")
    >>> net = build_segmentation_network(out_channels=3, **cfg)
    >>> report = load_pretrained_encoder(net, "pretrain/model.pt", backbone="cnn")
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
from monai.networks.blocks.dynunet_block import UnetOutBlock
from monai.networks.blocks.unetr_block import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.nets import UNETR, DynUNet, ViT
from monai.utils import ensure_tuple_rep, look_up_option

from monai_mask.errors import CheckpointError, ConfigError

__all__ = [
    "ViTUNETR",
    "build_segmentation_network",
    "seg_config_from_mae",
    "cnn_mae_to_dynunet",
    "load_pretrained_encoder",
    "DYNUNET_ENCODER_PREFIXES",
    "DYNUNET_DECODER_PATTERNS",
]

BACKBONES = ("vit", "cnn")
DYNUNET_ENCODER_PREFIXES = ("input_block.", "downsamples.", "bottleneck.")
# DynUNet keys that a pretrained CNN MAE does not provide (the segmentation decoder): the
# upsampling path, the heads and their ``skip_layers`` aliases (the encoder aliases are mapped).
DYNUNET_DECODER_PATTERNS = (
    "upsamples.*",
    "output_block.*",
    "deep_supervision_heads.*",
    "skip_layers*.upsample.*",
    "skip_layers*.super_head.*",
)
# SparkMAE3D keys that are pretraining-only and dropped on transfer
_CNN_MAE_DROPPED = (
    "mask_tokens.", "densify_proj.", "decoder_up.", "decoder_blocks.", "decoder_pred.",
)  # fmt: skip
_CNN_ARCH = {
    "spatial_dims": 3, "filters": None, "kernel_size": None, "strides": None,
    "norm_name": ("INSTANCE", {"affine": True}),
    "act_name": ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
    "dropout": None, "deep_supervision": False, "deep_supr_num": 1, "trans_bias": False,
}
_VIT_ARCH = {
    "patch_size": 16, "hidden_size": 768, "num_layers": 12, "num_heads": 12, "mlp_dim": 3072,
    "feature_size": 16, "proj_type": "conv", "norm_name": "instance", "conv_block": True,
    "res_block": True, "dropout_rate": 0.0, "spatial_dims": 3, "qkv_bias": False,
}
_VIT_CONFIG_KEYS = ("img_size", "patch_size", "in_channels", "hidden_size", "num_layers",
                    "num_heads", "mlp_dim")  # fmt: skip


class ViTUNETR(nn.Module):
    """UNETR for any isotropic power-of-two patch size ``p = 2**n`` and any ViT depth.

    MONAI's ``UNETR`` fixes ``p = 16`` and 12 layers (4 decoder stages, skips from layers
    3, 6, 9). Here the decoder has ``n`` stages and skips from layers ``k * num_layers // n``
    (``k = 1 .. n-1``); module names are UNETR's (``vit``, ``encoder1..n``,
    ``decoder{n+1}..2``, ``out``), so ``p = 16`` with 12 layers has exactly UNETR's state dict.

    Args:
        in_channels, out_channels, img_size, feature_size, hidden_size, mlp_dim, num_heads,
        proj_type, norm_name, conv_block, res_block, dropout_rate, spatial_dims, qkv_bias: as
            in ``monai.networks.nets.UNETR``.
        patch_size: ViT patch size, an isotropic power of two >= 2.
        num_layers: ViT depth.
    """

    def __init__(
        self, in_channels: int, out_channels: int, img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int = 16, num_layers: int = 12, feature_size: int = 16,
        hidden_size: int = 768, mlp_dim: int = 3072, num_heads: int = 12,
        proj_type: str = "conv", norm_name: tuple | str = "instance", conv_block: bool = True,
        res_block: bool = True, dropout_rate: float = 0.0, spatial_dims: int = 3,
        qkv_bias: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        p = _isotropic_pow2(patch_size, spatial_dims)
        n = int(math.log2(p))
        img_size = tuple(ensure_tuple_rep(img_size, spatial_dims))
        self.patch_size, self.num_layers = (p,) * spatial_dims, num_layers
        self.feat_size = tuple(s // p for s in img_size)
        self.taps = [k * num_layers // n for k in range(1, n)]
        self.vit = ViT(
            in_channels, img_size, self.patch_size, hidden_size, mlp_dim, num_layers, num_heads,
            proj_type=proj_type, classification=False, dropout_rate=dropout_rate,
            spatial_dims=spatial_dims, qkv_bias=qkv_bias,
        )  # fmt: skip
        common = {"spatial_dims": spatial_dims, "kernel_size": 3, "norm_name": norm_name,
                  "res_block": res_block}  # fmt: skip
        encoders = [UnetrBasicBlock(in_channels=in_channels, out_channels=feature_size,
                                    stride=1, **common)]  # fmt: skip
        for k in range(2, n + 1):
            encoders.append(UnetrPrUpBlock(
                in_channels=hidden_size, out_channels=feature_size * 2 ** (k - 1),
                num_layer=n - k, stride=1, upsample_kernel_size=2, conv_block=conv_block,
                **common,
            ))  # fmt: skip
        decoders = []
        for k in range(n + 1, 1, -1):
            c_in = hidden_size if k == n + 1 else feature_size * 2 ** (k - 1)
            decoders.append(UnetrUpBlock(in_channels=c_in, out_channels=feature_size * 2 ** (k - 2),
                                         upsample_kernel_size=2, **common))  # fmt: skip
        for k, block in enumerate(encoders, start=1):
            self.add_module(f"encoder{k}", block)
        for k, block in zip(range(n + 1, 1, -1), decoders, strict=True):
            self.add_module(f"decoder{k}", block)
        self._encoders, self._decoders = encoders, decoders  # same objects, registered above
        self.out = UnetOutBlock(spatial_dims, feature_size, out_channels)
        self.proj_axes = (0, spatial_dims + 1) + tuple(d + 1 for d in range(spatial_dims))
        self.proj_view_shape = [*self.feat_size, hidden_size]

    def proj_feat(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, L, E)`` -> feature map ``(B, E, *grid)``."""
        return x.view(x.size(0), *self.proj_view_shape).permute(self.proj_axes).contiguous()

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, out_channels, *S)`` for images ``(B, in_channels, *S)``."""
        x, hidden = self.vit(x_in)
        skips = [self._encoders[0](x_in)]
        for enc, t in zip(self._encoders[1:], self.taps, strict=True):
            skips.append(enc(self.proj_feat(hidden[t])))
        out = self.proj_feat(x)
        for dec, skip in zip(self._decoders, reversed(skips), strict=True):
            out = dec(out, skip)
        return self.out(out)


def _isotropic_pow2(patch_size: Sequence[int] | int, spatial_dims: int) -> int:
    sizes = set(ensure_tuple_rep(patch_size, spatial_dims))
    p = sizes.pop() if len(sizes) == 1 else 0
    if p < 2 or p & (p - 1):
        raise ConfigError(f"UNETR needs an isotropic power-of-two patch size, got {patch_size}")
    return p


def _arch(defaults: dict, arch: Mapping[str, Any], backbone: str) -> dict:
    unknown = sorted(set(arch) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown {backbone} segmentation settings: {', '.join(unknown)}")
    merged = {**defaults, **arch}
    missing = sorted(k for k, v in merged.items() if v is None and k != "dropout")
    if missing:
        raise ConfigError(f"{backbone} segmentation needs: {', '.join(missing)}")
    return merged


def _build_dynunet(in_channels: int, out_channels: int, img_size: Any, arch: dict) -> DynUNet:
    sd, strides = arch["spatial_dims"], list(arch["strides"])
    kernels = arch["kernel_size"]
    kernels = [kernels] * len(strides) if isinstance(kernels, int) else list(kernels)
    stride_nd = [ensure_tuple_rep(s, sd) for s in strides]
    total = [math.prod(s[d] for s in stride_nd) for d in range(sd)]
    if any(i % t for i, t in zip(ensure_tuple_rep(img_size, sd), total, strict=True)):
        raise ConfigError(f"img_size {img_size} is not divisible by the total stride {total}")
    return DynUNet(
        sd, in_channels, out_channels, kernels, strides, strides[1:], filters=list(arch["filters"]),
        dropout=arch["dropout"], norm_name=arch["norm_name"], act_name=arch["act_name"],
        deep_supervision=arch["deep_supervision"], deep_supr_num=arch["deep_supr_num"],
        res_block=True, trans_bias=arch["trans_bias"],
    )  # fmt: skip


def _build_unetr(in_channels: int, out_channels: int, img_size: Any, arch: dict) -> nn.Module:
    p = _isotropic_pow2(arch["patch_size"], arch["spatial_dims"])
    if any(s % p for s in ensure_tuple_rep(img_size, arch["spatial_dims"])):
        raise ConfigError(f"img_size {img_size} is not divisible by the patch size {p}")
    kwargs = {k: v for k, v in arch.items() if k not in ("patch_size", "num_layers")}
    if p == 16 and arch["num_layers"] == 12:
        return UNETR(in_channels, out_channels, img_size, **kwargs)
    return ViTUNETR(in_channels, out_channels, img_size, patch_size=p,
                    num_layers=arch["num_layers"], **kwargs)  # fmt: skip


def build_segmentation_network(
    backbone: Literal["vit", "cnn"], *, in_channels: int, out_channels: int,
    img_size: Sequence[int] | int, **arch: Any,
) -> nn.Module:  # fmt: skip
    """Segmentation network whose encoder matches a pretrained MAE.

    Args:
        backbone: ``"cnn"`` -> ``DynUNet(res_block=True)``; ``"vit"`` -> ``UNETR`` (MONAI's when
            patch 16 and 12 layers, else :class:`ViTUNETR`).
        in_channels: image channels.
        out_channels: classes (including background).
        img_size: crop size (UNETR's position embeddings are built for it; DynUNet checks
            divisibility by the total stride).
        **arch: cnn: ``filters``, ``kernel_size``, ``strides`` (required), ``spatial_dims``,
            ``norm_name``, ``act_name``, ``dropout``, ``deep_supervision``, ``deep_supr_num``,
            ``trans_bias``; vit: ``patch_size``, ``hidden_size``, ``num_layers``,
            ``num_heads``, ``mlp_dim``, ``feature_size``, ``proj_type``, ``norm_name``,
            ``conv_block``, ``res_block``, ``dropout_rate``, ``spatial_dims``, ``qkv_bias``.
            Use :func:`seg_config_from_mae` rather than typing them.

    Raises:
        ConfigError: unknown or missing settings, sizes that do not divide.
    """
    backbone = look_up_option(backbone, BACKBONES)
    if backbone == "cnn":
        return _build_dynunet(in_channels, out_channels, img_size, _arch(_CNN_ARCH, arch, "cnn"))
    return _build_unetr(in_channels, out_channels, img_size, _arch(_VIT_ARCH, arch, "vit"))


def seg_config_from_mae(mae: str | nn.Module) -> dict[str, Any]:
    """Keyword arguments of :func:`build_segmentation_network` matching a pretrained MAE.

    Args:
        mae: a registered MAE name (e.g. ``"cnn_mae_resenc_small_s16_i96"``) or an MAE module
            with a ``config`` dict (``SparkMAE3D`` or ``MaskedAutoencoderViT3D``).

    Returns:
        ``{"backbone", "in_channels", "img_size", **arch}``; add ``out_channels``.
    """
    from monai_mask.networks.cnn_mae import SparkMAE3D
    from monai_mask.networks.registry import create_model

    if isinstance(mae, str):
        mae = create_model(mae)
    config = getattr(mae, "config", None)
    if not isinstance(config, Mapping):
        raise ConfigError(f"{type(mae).__name__} has no `config` dict to derive settings from")
    if isinstance(mae, SparkMAE3D):
        keys = ("in_channels", "img_size", "spatial_dims", "filters", "kernel_size", "strides",
                "norm_name", "act_name")  # fmt: skip
        return {"backbone": "cnn", **{k: config[k] for k in keys}}
    missing = [k for k in _VIT_CONFIG_KEYS if k not in config]
    if missing:
        raise ConfigError(f"{type(mae).__name__}.config lacks {', '.join(missing)}")
    out = {"backbone": "vit", **{k: config[k] for k in _VIT_CONFIG_KEYS}}
    if "qkv_bias" in config:
        out["qkv_bias"] = config["qkv_bias"]
    return out


def _dynunet_alias(name: str, num_downsamples: int) -> str:
    """``skip_layers`` alias of an encoder key (DynUNet registers each block twice)."""
    stage, rest = name.split(".", 1)
    if stage == "input_block":
        return f"skip_layers.downsample.{rest}"
    if stage == "bottleneck":
        return "skip_layers" + ".next_layer" * (num_downsamples + 1) + f".{rest}"
    index, rest = rest.split(".", 1)
    return "skip_layers" + ".next_layer" * (int(index) + 1) + f".downsample.{rest}"


def cnn_mae_to_dynunet(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a :class:`SparkMAE3D` state dict to ``DynUNet(res_block=True)`` encoder keys.

    Pure function (timm ``checkpoint_filter_fn`` style): ``encoder.X`` -> ``X`` and its
    ``skip_layers`` alias; mask tokens and the pretraining decoder are dropped explicitly.

    Raises:
        CheckpointError: a key that is neither encoder nor known pretraining decoder.
    """
    prefix = "encoder."
    down = {k.split(".")[2] for k in state_dict if k.startswith(prefix + "downsamples.")}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(prefix) and key[len(prefix):].startswith(DYNUNET_ENCODER_PREFIXES):
            name = key[len(prefix):]
            out[name] = value
            out[_dynunet_alias(name, len(down))] = value
        elif not key.startswith(_CNN_MAE_DROPPED):
            raise CheckpointError(None, f"unexpected key {key!r} in a CNN MAE state dict")
    return out


def load_pretrained_encoder(
    network: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    backbone: Literal["vit", "cnn"],
) -> Any:
    """Load a pretrained MAE encoder into a segmentation network, strictly.

    Every encoder key must load; only the segmentation decoder may stay missing (asserted by
    pattern, never a silent non-strict load).

    Args:
        network: from :func:`build_segmentation_network` (``DynUNet`` or ``UNETR``).
        checkpoint: a checkpoint path or an MAE state dict.
        backbone: ``"cnn"`` or ``"vit"``.

    Returns:
        the ``LoadReport`` of :func:`monai_mask.io.checkpoint.load_into`.

    Raises:
        CheckpointError: an encoder tensor is missing or does not fit.
    """
    from monai_mask.io import checkpoint as ckpt

    backbone = look_up_option(backbone, BACKBONES)
    if backbone == "vit":
        return ckpt.load_encoder_into_unetr(network, checkpoint, source="auto")
    path = None if isinstance(checkpoint, Mapping) else os.fspath(checkpoint)
    raw = checkpoint if path is None else ckpt.load_checkpoint(path)
    state = ckpt.strip_prefix(ckpt.extract_state_dict(raw, path=path), "module.")
    # every encoder key (and its skip_layers alias) must load: only decoder patterns may miss
    return ckpt.load_into(
        network, state, key_map=cnn_mae_to_dynunet, allow_missing=DYNUNET_DECODER_PATTERNS,
        allow_unexpected=(), required_prefix=DYNUNET_ENCODER_PREFIXES, path=path,
    )  # fmt: skip
