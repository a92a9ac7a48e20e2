"""Fine-tuning pieces for ``bundles/tumor_segmentation``: network, encoder transfer, LR groups.

* :func:`segmentation_network_from_mae` builds the UNETR (ViT) or DynUNet (CNN) whose encoder
  matches a registered MAE at the fine-tuning crop size.
* :func:`init_from_pretrained` loads a pretraining checkpoint into it through
  :func:`monai_mask.networks.heads.load_pretrained_encoder` (strict, fails with a
  ``CheckpointError`` naming the file and the mismatch); an empty path means from scratch.
* :func:`param_groups_lrd` gives the optimizer layer-wise learning-rate decay groups
  (Clark et al., ELECTRA, ICLR 2020; Bao et al., BEiT, ICLR 2022; as in facebookresearch/mae
  ``util/lr_decay.py``): the deeper a pretrained layer, the larger its learning rate; the
  randomly initialised decoder trains at the base rate.
* :func:`select_labelled` keeps a seeded fraction of the labelled training cases
  (label-efficiency runs).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch.nn as nn
from monai.utils import look_up_option

from monai_mask.errors import ConfigError

__all__ = [
    "segmentation_network_from_mae",
    "init_from_pretrained",
    "layer_id",
    "num_encoder_layers",
    "param_groups_lrd",
    "select_labelled",
]

logger = logging.getLogger(__name__)
BACKBONES = ("vit", "cnn")


def segmentation_network_from_mae(
    mae_name: str, roi_size: Sequence[int], out_channels: int, in_channels: int = 1
) -> nn.Module:
    """Segmentation network whose encoder matches the registered MAE ``mae_name``.

    Args:
        mae_name: registered MAE (``vit_mae_tiny_p8_i32``, ``cnn_mae_resenc_tiny_s16_i32``...).
        roi_size: crop size (UNETR's position embeddings are built for it).
        out_channels: classes including background.
        in_channels: image channels.

    Returns:
        ``UNETR``/``ViTUNETR`` (ViT MAE) or ``DynUNet(res_block=True)`` (CNN MAE).
    """
    from monai_mask.networks.heads import build_segmentation_network, seg_config_from_mae
    from monai_mask.networks.registry import create_model

    mae = create_model(mae_name, img_size=list(roi_size), in_channels=in_channels)
    return build_segmentation_network(out_channels=out_channels, **seg_config_from_mae(mae))


def init_from_pretrained(
    network: nn.Module, checkpoint: str | os.PathLike | None, backbone: Literal["vit", "cnn"]
) -> nn.Module:
    """Load a pretrained MAE encoder into ``network`` (in place) and return the network.

    Args:
        network: from :func:`segmentation_network_from_mae`.
        checkpoint: MAE checkpoint (``models/model.pt`` of the pretraining bundle); ``""`` or
            None trains from scratch.
        backbone: ``"vit"`` or ``"cnn"``.

    Raises:
        CheckpointError: the checkpoint's encoder does not fit the network (other backbone,
            other width or depth, missing tensors).
    """
    from monai_mask.networks.heads import load_pretrained_encoder

    backbone = look_up_option(backbone, BACKBONES)
    if not checkpoint:
        logger.info("no pretrained checkpoint: training from scratch")
        return network
    report = load_pretrained_encoder(network, checkpoint, backbone=backbone)
    logger.info("loaded pretrained %s encoder from %s: %s", backbone, checkpoint, report)
    return network


def num_encoder_layers(network: nn.Module, backbone: Literal["vit", "cnn"]) -> int:
    """Number of encoder stages ``L``: ViT blocks, or CNN downsampling stages + bottleneck."""
    backbone = look_up_option(backbone, BACKBONES)
    names = [n for n, _ in getattr(network, "module", network).named_parameters()]
    pattern = r"vit\.blocks\.(\d+)\." if backbone == "vit" else r"downsamples\.(\d+)\."
    found = [int(m.group(1)) for n in names if (m := re.match(pattern, n))]
    if backbone == "vit" and not found:
        raise ConfigError(f"{type(network).__name__} has no `vit.blocks.*` (not a UNETR)")
    if backbone == "cnn" and not any(n.startswith("input_block.") for n in names):
        raise ConfigError(f"{type(network).__name__} has no `input_block` (not a DynUNet)")
    depth = max(found, default=-1) + 1
    return depth if backbone == "vit" else depth + 1


def layer_id(name: str, backbone: Literal["vit", "cnn"], num_layers: int) -> int:
    """Depth index of parameter ``name``: 0 = stem, ``num_layers + 1`` = head / decoder.

    ViT: ``vit.patch_embedding`` 0, ``vit.blocks.i`` i + 1, the rest (final norm, UNETR
    decoder) ``num_layers + 1``. CNN (DynUNet): ``input_block`` 0, ``downsamples.i`` i + 1,
    ``bottleneck`` ``num_layers``, the decoder ``num_layers + 1``.
    """
    if backbone == "vit":
        if name.startswith("vit.patch_embedding."):
            return 0
        m = re.match(r"vit\.blocks\.(\d+)\.", name)
        return int(m.group(1)) + 1 if m else num_layers + 1
    if name.startswith("input_block."):
        return 0
    m = re.match(r"downsamples\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return num_layers if name.startswith("bottleneck.") else num_layers + 1


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or "position_embeddings" in name


def param_groups_lrd(
    network: nn.Module,
    backbone: Literal["vit", "cnn"],
    base_lr: float,
    weight_decay: float = 0.05,
    layer_decay: float = 0.75,
) -> list[dict]:
    """Optimizer parameter groups with layer-wise learning-rate decay.

    A parameter at depth ``i`` (:func:`layer_id`) trains at ``base_lr * layer_decay **
    (L + 1 - i)``, ``L`` = :func:`num_encoder_layers`; the decoder (depth ``L + 1``) at
    ``base_lr``. Biases, norm weights and position embeddings get no weight decay (MAE).
    ``layer_decay = 1`` gives plain groups (from-scratch training).

    Args:
        network: UNETR/ViTUNETR (``"vit"``) or DynUNet (``"cnn"``).
        backbone: ``"vit"`` or ``"cnn"``.
        base_lr: learning rate of the decoder.
        weight_decay: decay of the weight matrices and kernels.
        layer_decay: per-layer factor in (0, 1].

    Returns:
        groups ``{"params", "lr", "lr_scale", "weight_decay"}``, each parameter in exactly
        one group (shared DynUNet aliases counted once), ordered by depth.
    """
    backbone = look_up_option(backbone, BACKBONES)
    network = getattr(network, "module", network)  # DistributedDataParallel
    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay}")
    depth = num_encoder_layers(network, backbone)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in network.named_parameters():  # yields shared tensors once
        if not param.requires_grad:
            continue
        lid, no_wd = layer_id(name, backbone, depth), _no_decay(name, param)
        scale = layer_decay ** (depth + 1 - lid)
        group = groups.setdefault((lid, no_wd), {
            "params": [], "lr": base_lr * scale, "lr_scale": scale,
            "weight_decay": 0.0 if no_wd else weight_decay,
        })  # fmt: skip
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def select_labelled(data: Sequence[dict], fraction: float = 1.0, seed: int = 0,
                    label_key: str = "label") -> list[dict]:
    """The labelled cases kept for a label-efficient run; the others are dropped.

    ``round(fraction * n)`` cases (at least one) of the ``n`` entries that have
    ``label_key`` are chosen by a seeded shuffle; they keep their datalist order. The same
    ``(data, fraction, seed)`` always gives the same cases, and a smaller fraction with the
    same seed keeps a subset of a larger one.

    Raises:
        ConfigError: ``fraction`` outside (0, 1], or no labelled case.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ConfigError(f"label_fraction must be in (0, 1], got {fraction}")
    labelled = [i for i, d in enumerate(data) if d.get(label_key)]
    if not labelled:
        raise ConfigError(f"no training case has a {label_key!r}; cannot fine-tune")
    n = max(1, int(round(float(fraction) * len(labelled))))
    order = np.random.default_rng(int(seed)).permutation(len(labelled))
    keep = sorted(labelled[j] for j in order[:n])
    return [data[i] for i in keep]
