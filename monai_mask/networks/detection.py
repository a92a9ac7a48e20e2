"""RetinaNet tumour detectors on a pretrained MAE encoder, built in one factory.

* ``backbone="cnn"``: the residual encoder of :class:`~monai_mask.networks.cnn_mae.SparkMAE3D`
  (DynUNet names ``input_block``, ``downsamples.*``, ``bottleneck``) with a feature pyramid
  (MONAI ``FeaturePyramidNetwork``, Lin et al., CVPR 2017) over the stages from ``fpn_stages``
  on; with the tiny encoder (strides 1, 2, 2, 2, 2) the default levels have strides 4, 8, 16.
* ``backbone="vit"``: MONAI ``ViT`` (the encoder of
  :class:`~monai_mask.networks.vit_mae.MaskedAutoencoderViT3D`) with a simple feature pyramid
  (ViTDet, Li et al., ECCV 2022): the last feature map at stride ``p`` is upsampled by
  transposed convolutions to ``p/2`` (and ``p/4`` for ``p >= 8``) and pooled to ``2p``.

:func:`build_detector` returns a MONAI ``RetinaNetDetector`` (Lin et al., Focal Loss for Dense
Object Detection, ICCV 2017) with every training and inference component set: anchors
(``AnchorGeneratorWithAnchorShape``), ATSS matching (Zhang et al., CVPR 2020), hard-negative
sampling, the box selector and the sliding-window inferer. Boxes in and out of the detector are
``xyzxyz`` in voxel coordinates of the network input (voxel ``i`` centred at ``i``).

Example:
    >>> det = build_detector("cnn", img_size=(48, 48, 32), pretrained_ckpt="mae/model.pt")
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.losses import DiceCELoss, FocalLoss
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
from monai.networks.nets import ViT
from monai.utils import ensure_tuple_rep, look_up_option

from monai_mask.errors import ConfigError
from monai_mask.networks.cnn_mae import ResidualEncoder

__all__ = ["ATSSRetinaNetDetector", "CNNFPNBackbone", "ViTSimpleFPN", "FocalLossPerPositive",
           "SegmentationAuxHead", "build_detector", "load_pretrained_detector",
           "trained_fpn_stages", "trained_seg_head", "DETECTOR_HEAD_PATTERNS"]  # fmt: skip

BACKBONES = ("cnn", "vit")
CLS_LOSSES = ("focal", "hard_negative")
#: detector keys a pretrained MAE does not provide (pyramid and heads), allowed to stay missing.
DETECTOR_HEAD_PATTERNS = (
    "network.feature_extractor.fpn.*",
    "network.feature_extractor.pyramid.*",
    "network.classification_head.*",
    "network.regression_head.*",
    "network.seg_head.*",
)
_ENCODER = "network.feature_extractor.encoder."
_VIT = "network.feature_extractor.vit."
_CNN_MAE_DROPPED = ("mask_tokens", "densify_proj.", "decoder_up.", "decoder_blocks.",
                    "decoder_pred.")  # fmt: skip
_CNN_DEFAULTS = {"filters": (8, 16, 32, 64, 64), "strides": (1, 2, 2, 2, 2), "kernel_size": 3,
                 "fpn_stages": 2}  # fmt: skip
_VIT_DEFAULTS = {"patch_size": 8, "hidden_size": 96, "num_layers": 2, "num_heads": 3,
                 "mlp_dim": 192, "qkv_bias": False}  # fmt: skip


class CNNFPNBackbone(nn.Module):
    """Residual CNN encoder + FPN; outputs ``[P_s, ..., P_last]`` finest first, ``out_channels``.

    Args:
        in_channels: image channels.
        filters, kernel_size, strides: the encoder (as in ``SparkMAE3D`` / DynUNet).
        fpn_stages: index of the first encoder stage fed to the FPN; every later stage is used
            too (so every parameter receives gradients, as DDP requires).
        out_channels: FPN width.
        spatial_dims: 2 or 3.
    """

    def __init__(self, in_channels: int, filters: Sequence[int], kernel_size: Any,
                 strides: Sequence[Any], fpn_stages: int = 2, out_channels: int = 32,
                 spatial_dims: int = 3) -> None:  # fmt: skip
        super().__init__()
        kernels = [kernel_size] * len(strides) if isinstance(kernel_size, int) else kernel_size
        self.encoder = ResidualEncoder(spatial_dims, in_channels, filters, kernels, strides)
        if not 0 <= fpn_stages < len(strides):
            raise ConfigError(f"fpn_stages must be in [0, {len(strides)}), got {fpn_stages}")
        self.first = fpn_stages
        stride_nd = [ensure_tuple_rep(s, spatial_dims) for s in strides]
        self.level_strides = []
        for i in range(fpn_stages, len(strides)):
            self.level_strides.append(
                tuple(int(torch.tensor([s[d] for s in stride_nd[: i + 1]]).prod())
                      for d in range(spatial_dims)))  # fmt: skip
        chans = list(filters)[fpn_stages: len(strides)]
        self.fpn = FeaturePyramidNetwork(spatial_dims, chans, out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, *S)`` -> FPN maps ``(B, out_channels, *S / stride_l)``, finest first."""
        feats = self.encoder(x)[self.first:]
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        return list(out.values())


class ViTSimpleFPN(nn.Module):
    """MONAI ``ViT`` + simple feature pyramid from its last feature map (ViTDet style).

    Levels, finest first: ``p/4`` (if ``p >= 8``), ``p/2``, ``p`` and ``2p`` for patch size
    ``p``; each a 3x3 conv to ``out_channels`` after the rescaling.

    Args:
        in_channels, img_size, patch_size, hidden_size, num_layers, num_heads, mlp_dim,
            qkv_bias: the ViT (as the pretrained MAE).
        out_channels: pyramid width.
        spatial_dims: 3.
    """

    def __init__(self, in_channels: int, img_size: Sequence[int], patch_size: int,
                 hidden_size: int, num_layers: int, num_heads: int, mlp_dim: int,
                 qkv_bias: bool = False, out_channels: int = 32, spatial_dims: int = 3) -> None:
        super().__init__()
        p = int(patch_size)
        if p < 4 or p & (p - 1):
            raise ConfigError(f"ViT detector needs a power-of-two patch size >= 4, got {p}")
        self.vit = ViT(in_channels, img_size, p, hidden_size, mlp_dim, num_layers, num_heads,
                       proj_type="conv", classification=False, spatial_dims=spatial_dims,
                       qkv_bias=qkv_bias)  # fmt: skip
        self.grid = tuple(s // p for s in ensure_tuple_rep(img_size, spatial_dims))
        up = [4, 2] if p >= 8 else [2]
        self.level_strides = [(p // u,) * spatial_dims for u in up] + [(p,) * spatial_dims,
                                                                       (2 * p,) * spatial_dims]
        self.pyramid = nn.ModuleList([self._level(hidden_size, out_channels, f)
                                      for f in [*up, 1, -2]])  # fmt: skip
        self.out_channels = out_channels

    @staticmethod
    def _level(hidden: int, out: int, factor: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        c = hidden
        while factor > 1:  # transposed convs, x2 each, halving channels
            layers += [nn.ConvTranspose3d(c, c // 2, 2, stride=2), nn.GroupNorm(1, c // 2),
                       nn.GELU()]  # fmt: skip
            c, factor = c // 2, factor // 2
        if factor == -2:
            layers.append(nn.MaxPool3d(2))
        layers += [nn.Conv3d(c, out, 1), nn.Conv3d(out, out, 3, padding=1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, *img_size)`` -> maps at the ``level_strides``, finest first."""
        tokens, _ = self.vit(x)
        fmap = tokens.transpose(1, 2).reshape(x.shape[0], tokens.shape[-1], *self.grid)
        return [level(fmap) for level in self.pyramid]


class FocalLossPerPositive(nn.Module):
    """Sigmoid focal loss summed over every anchor and divided by the number of positives.

    The normalisation of the RetinaNet paper (Lin et al., ICCV 2017, section 3.3 and 4), which
    keeps the few positive anchors of small lesions from being averaged away by the many
    easy negatives; the per-anchor loss is MONAI's ``FocalLoss`` (``reduction="none"``).

    Args:
        gamma: focusing parameter. alpha: weight of the positive class.
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25) -> None:
        super().__init__()
        self.focal = FocalLoss(gamma=gamma, alpha=alpha, use_softmax=False, reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` logits and one-hot targets -> scalar loss."""
        return self.focal(logits.float(), target.float()).sum() / target.sum().clamp(min=1.0)


class SegmentationAuxHead(nn.Module):
    """Voxel-wise class logits from the finest pyramid level (Retina U-Net's segmentation head).

    A 3x3 conv + instance norm + ReLU and a 1x1 conv to ``num_classes`` (background included) on
    the finest feature map, upsampled (trilinear) to the input size.
    """

    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int = 3) -> None:
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        norm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
        self.block = nn.Sequential(conv(in_channels, in_channels, 3, padding=1),
                                   norm(in_channels, affine=True), nn.ReLU(inplace=True),
                                   conv(in_channels, num_classes, 1))  # fmt: skip
        self.mode = "trilinear" if spatial_dims == 3 else "bilinear"

    def forward(self, finest: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``(B, C, *S/s)`` finest level -> ``(B, num_classes, *size)`` logits."""
        return F.interpolate(self.block(finest), size=tuple(size), mode=self.mode,
                             align_corners=False)  # fmt: skip


class ATSSRetinaNetDetector(RetinaNetDetector):
    """MONAI ``RetinaNetDetector`` whose matching step needs no torchvision, with an optional
    auxiliary segmentation loss (Retina U-Net).

    MONAI's ``compute_anchor_matched_idxs`` first tests ``isinstance(matcher, torchvision
    Matcher)``, which raises when torchvision is absent (it is not a dependency here). This
    override runs the same code path for the ATSS matcher that :func:`build_detector` sets.

    When the network has a ``seg_head`` (:func:`build_detector` with ``seg_loss_weight > 0``),
    training also returns ``losses["segmentation"]``: Dice + cross-entropy of the head's
    logits against the label map of every training crop (target key ``seg_key``, ``(1, *S)``),
    times ``seg_loss_weight`` (Jaeger et al., Retina U-Net, ML4H 2019: a dense voxel-wise
    signal for the small lesions that get only a few positive anchors). Inference is unchanged.
    """

    seg_key: str = "label"
    seg_loss_weight: float = 0.0
    _seg_loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    def forward(self, input_images: list[torch.Tensor] | torch.Tensor,
                targets: list[dict[str, torch.Tensor]] | None = None,
                use_inferer: bool = False) -> Any:  # fmt: skip
        """MONAI's forward, plus the segmentation loss in training when there is a head."""
        head = getattr(self.network, "seg_head", None)
        if not self.training or head is None:
            return super().forward(input_images, targets, use_inferer)
        if targets is None or any(self.seg_key not in t for t in targets):
            raise ConfigError(f"seg_loss_weight > 0 needs the label map of every training crop "
                              f"(target key {self.seg_key!r}; detection_transforms(seg_key="
                              f"'label'))")  # fmt: skip
        stash: dict[str, torch.Tensor] = {}
        hook = self.network.feature_extractor.register_forward_hook(
            lambda _m, _i, out: stash.__setitem__("finest", out[0]))
        try:
            losses = super().forward(input_images, targets)
        finally:
            hook.remove()
        finest = stash["finest"]
        stride = self.network.feature_extractor.level_strides[0]
        padded = [int(f * s) for f, s in zip(finest.shape[2:], stride, strict=True)]
        logits = head(finest, padded)
        per_crop = []
        for i, (image, target) in enumerate(zip(input_images, targets, strict=True)):
            size = image.shape[-len(padded):]  # the crop before MONAI's divisibility padding
            crop_logits = logits[i: i + 1][(..., *(slice(0, n) for n in size))]
            label = target[self.seg_key].to(logits.device).reshape(1, 1, *size)
            per_crop.append(self._seg_loss(crop_logits, label))
        losses["segmentation"] = self.seg_loss_weight * torch.stack(per_crop).mean()
        return losses

    def compute_anchor_matched_idxs(self, anchors: list[torch.Tensor],
                                    targets: list[dict[str, torch.Tensor]],
                                    num_anchor_locs_per_level: Sequence[int]) -> list[torch.Tensor]:
        """Matched GT index per anchor per image (``-1``: background), ATSS only."""
        out = []
        for anchors_i, targets_i in zip(anchors, targets, strict=True):
            gt = targets_i[self.target_box_key].to(anchors_i.device)
            if gt.numel() == 0:
                out.append(torch.full((anchors_i.size(0),), -1, dtype=torch.int64,
                                      device=anchors_i.device))  # fmt: skip
                continue
            _, matched = self.proposal_matcher(gt, anchors_i, num_anchor_locs_per_level,
                                               self.num_anchors_per_loc)  # fmt: skip
            out.append(matched)
        return out


def _anchor_generator(level_strides: Sequence[Sequence[int]],
                      base_anchor_shapes: Sequence[Sequence[float]]) -> nn.Module:
    """Anchors ``base_anchor_shapes`` (voxels) on the finest level, scaled x2 per level."""
    finest = level_strides[0]
    scales = [int(round(s[0] / finest[0])) for s in level_strides]
    return AnchorGeneratorWithAnchorShape(feature_map_scales=scales,
                                          base_anchor_shapes=[list(a) for a in base_anchor_shapes])


def _feature_extractor(backbone: str, in_channels: int, img_size: Sequence[int],
                       fpn_channels: int, arch: Mapping[str, Any]) -> nn.Module:
    defaults = _CNN_DEFAULTS if backbone == "cnn" else _VIT_DEFAULTS
    unknown = sorted(set(arch) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown {backbone} detector settings: {', '.join(unknown)}")
    a = {**defaults, **arch}
    if backbone == "cnn":
        return CNNFPNBackbone(in_channels, a["filters"], a["kernel_size"], a["strides"],
                              a["fpn_stages"], fpn_channels)  # fmt: skip
    return ViTSimpleFPN(in_channels, img_size, a["patch_size"], a["hidden_size"],
                        a["num_layers"], a["num_heads"], a["mlp_dim"], a["qkv_bias"],
                        fpn_channels)  # fmt: skip


def _sw_roi(backbone: str, sw_roi_size: Sequence[int] | None, img_size: tuple[int, ...],
            coarsest: Sequence[int]) -> tuple[int, ...]:
    sw_roi = tuple(ensure_tuple_rep(sw_roi_size, len(img_size))) if sw_roi_size else img_size
    if backbone == "vit" and sw_roi != img_size:
        raise ConfigError(f"the ViT detector needs sw_roi_size == img_size {img_size}")
    if any(s % c for s, c in zip(sw_roi, coarsest, strict=True)):
        raise ConfigError(f"sw_roi_size {sw_roi} is not divisible by the stride {coarsest}")
    return sw_roi


def build_detector(
    backbone: Literal["cnn", "vit"], *, img_size: Sequence[int], in_channels: int = 1,
    num_classes: int = 1, spatial_dims: int = 3,
    base_anchor_shapes: Sequence[Sequence[float]] = ((6, 6, 3), (10, 10, 5)),
    fpn_channels: int = 32, atss_candidates: int = 4,
    cls_loss: Literal["focal", "hard_negative"] = "focal", hard_negative_batch: int = 64,
    positive_fraction: float = 0.3, score_thresh: float = 0.02, nms_thresh: float = 0.22,
    topk_candidates_per_level: int = 1000, detections_per_img: int = 100,
    sw_overlap: float = 0.25, sw_batch_size: int = 1,
    sw_roi_size: Sequence[int] | None = None, box_key: str = "box",
    label_key: str = "box_label", pretrained_ckpt: str | os.PathLike | None = None,
    seg_loss_weight: float = 0.0, arch: Mapping[str, Any] | None = None, **arch_kwargs: Any,
) -> RetinaNetDetector:  # fmt: skip
    """A ready-to-train and ready-to-infer MONAI ``RetinaNetDetector``.

    Args:
        backbone: ``"cnn"`` (residual encoder + FPN) or ``"vit"`` (ViT + simple pyramid).
        img_size: training crop and sliding-window size (voxels); for the ViT also the size its
            position embeddings are built for. Must be divisible by the coarsest stride.
        in_channels: image channels. num_classes: foreground classes (tumour = 1).
        spatial_dims: 3 (2 only for the CNN).
        base_anchor_shapes: anchor sizes (voxels) on the finest level; x2 per coarser level.
        fpn_channels: pyramid width.
        atss_candidates: ATSS candidates per level (``set_atss_matcher``; centres need not be in
            the box, the right choice for small lesions).
        cls_loss: ``"focal"``: :class:`FocalLossPerPositive` over all anchors (default; learns
            small lesions from few crops); ``"hard_negative"``: MONAI's BCE on a hard-negative
            sample of anchors (``hard_negative_batch``, ``positive_fraction``), as in MONAI's
            LUNA16 tutorial.
        score_thresh, nms_thresh, topk_candidates_per_level, detections_per_img: box selector.
        sw_overlap, sw_batch_size: sliding-window inference settings (images smaller than a
            window are padded by replicating their border, air for a body in the field of
            view, rather than with zeros, which the normalisation maps to soft tissue).
        sw_roi_size: sliding-window size (default ``img_size``; the ViT needs ``img_size``, the
            CNN takes any size divisible by its coarsest stride, larger windows are faster).
        box_key, label_key: target keys of the training dicts (the datalist's ``box`` and
            ``box_label``); predicted scores are under ``f"{label_key}_scores"``.
        pretrained_ckpt: MAE or segmentation checkpoint whose encoder is loaded strictly (see
            :func:`load_pretrained_detector`); None or "" for a random initialisation.
        seg_loss_weight: > 0 adds a segmentation head on the finest pyramid level
            (:class:`SegmentationAuxHead`, ``num_classes + 1`` classes) whose Dice + CE loss
            against the training crops' label maps, times this weight, joins the detection
            losses (Retina U-Net); the training crops must carry the label map (``label``).
            0: no head (the checkpoint has no ``network.seg_head.*``).
        arch, **arch_kwargs: backbone settings, as a mapping (what the bundle configs pass,
            ``detector_archs``) and/or keywords (keywords win). cnn: ``filters``, ``strides``,
            ``kernel_size``, ``fpn_stages`` (first encoder stage in the pyramid: 2 gives strides
            4/8/16, 1 adds the stride-2 level small lesions need, at ~3x the compute); vit:
            ``patch_size``, ``hidden_size``, ``num_layers``, ``num_heads``, ``mlp_dim``,
            ``qkv_bias``. Defaults match ``cnn_mae_resenc_tiny_s16_i32`` and
            ``vit_mae_tiny_p8_i32``.

    Raises:
        ConfigError: unknown settings, sizes that do not divide.
        CheckpointError: the pretrained encoder does not load fully.
    """
    backbone = look_up_option(backbone, BACKBONES)
    img_size = tuple(int(s) for s in ensure_tuple_rep(img_size, spatial_dims))
    extractor = _feature_extractor(backbone, in_channels, img_size, fpn_channels,
                                   {**(arch or {}), **arch_kwargs})
    coarsest = extractor.level_strides[-1]
    if any(s % c for s, c in zip(img_size, coarsest, strict=True)):
        raise ConfigError(f"img_size {img_size} is not divisible by the coarsest stride {coarsest}")
    anchors = _anchor_generator(extractor.level_strides, base_anchor_shapes)
    net = RetinaNet(spatial_dims, num_classes, anchors.num_anchors_per_location()[0], extractor,
                    size_divisible=coarsest)  # fmt: skip
    if seg_loss_weight < 0:
        raise ConfigError(f"seg_loss_weight must be >= 0, got {seg_loss_weight}")
    if seg_loss_weight > 0:
        net.seg_head = SegmentationAuxHead(fpn_channels, num_classes + 1, spatial_dims)
    det = ATSSRetinaNetDetector(net, anchors, debug=False)
    det.seg_loss_weight = float(seg_loss_weight)
    det.set_target_keys(box_key=box_key, label_key=label_key)
    det.set_atss_matcher(num_candidates=atss_candidates, center_in_gt=False)
    if look_up_option(cls_loss, CLS_LOSSES) == "focal":
        det.set_cls_loss(FocalLossPerPositive())
    else:
        det.set_hard_negative_sampler(batch_size_per_image=hard_negative_batch,
                                      positive_fraction=positive_fraction, pool_size=20,
                                      min_neg=16)  # fmt: skip
    det.set_box_selector_parameters(score_thresh=score_thresh, nms_thresh=nms_thresh,
                                    topk_candidates_per_level=topk_candidates_per_level,
                                    detections_per_img=detections_per_img)  # fmt: skip
    sw_roi = _sw_roi(backbone, sw_roi_size, img_size, coarsest)
    det.set_sliding_window_inferer(roi_size=sw_roi, sw_batch_size=sw_batch_size,
                                   overlap=sw_overlap, mode="constant",
                                   padding_mode="replicate")  # fmt: skip
    det.backbone = backbone
    if pretrained_ckpt:
        load_pretrained_detector(det, pretrained_ckpt, backbone)
    return det


_DYNUNET_ENCODER = ("input_block.", "downsamples.", "bottleneck.")
_DYNUNET_DROPPED = ("upsamples.", "output_block.", "deep_supervision_heads.", "skip_layers.")


def _cnn_to_detector(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CNN encoder keys -> detector encoder keys; keys the detector has no use for dropped.

    Two layouts are accepted: a ``SparkMAE3D`` (``encoder.*``; its pretraining-only decoder and
    mask tokens are dropped) and a segmentation ``DynUNet`` with the same encoder settings, as
    the ``tumor_segmentation`` bundle trains (``input_block``, ``downsamples``, ``bottleneck``;
    its decoder, output block and ``skip_layers`` aliases are dropped). Anything else raises.
    """
    from monai_mask.errors import CheckpointError

    dynunet = any(k.startswith(_DYNUNET_ENCODER) for k in sd)
    if dynunet and any(k.startswith("encoder.") for k in sd):
        raise CheckpointError(None, "state dict mixes MAE (encoder.*) and DynUNet keys")
    out = {}
    for key, value in sd.items():
        if dynunet and key.startswith(_DYNUNET_ENCODER):
            out[_ENCODER + key] = value
        elif not dynunet and key.startswith("encoder."):
            out[_ENCODER + key[len("encoder."):]] = value
        elif not key.startswith(_DYNUNET_DROPPED if dynunet else _CNN_MAE_DROPPED):
            kind = "DynUNet" if dynunet else "CNN MAE"
            raise CheckpointError(None, f"unexpected key {key!r} in a {kind} state dict")
    return out


def _vit_to_detector(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ViT MAE keys, or the ``vit.*`` encoder of a segmentation ``UNETR`` -> detector keys."""
    from monai_mask.io import checkpoint as ckpt

    if any(k.startswith("vit.") for k in sd):  # UNETR: keep its ViT, drop its decoder
        return {_VIT + k[len("vit."):]: v for k, v in sd.items() if k.startswith("vit.")}
    return ckpt.add_prefix(ckpt.vit_mae_to_vit(sd), _VIT)


def load_pretrained_detector(
    detector: nn.Module, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    backbone: Literal["cnn", "vit"],
) -> Any:  # fmt: skip
    """Load a pretrained encoder into a detector from :func:`build_detector`, strictly.

    The checkpoint is an MAE (``mae_pretrain``) or a segmentation network trained by
    ``tumor_segmentation`` with the same backbone (CNN: DynUNet; ViT: UNETR), whose encoder
    carries a dense, supervised signal at every stride (the two-step recipe in
    docs/studies.md). Every encoder tensor must load (``required_prefix``); only the pyramid
    and the heads (``DETECTOR_HEAD_PATTERNS``) may stay missing; nothing unexpected may remain.

    Returns:
        the ``LoadReport`` of :func:`monai_mask.io.checkpoint.load_into`.

    Raises:
        CheckpointError: a missing, unexpected or mis-shaped encoder tensor.
    """
    from monai_mask.io import checkpoint as ckpt

    backbone = look_up_option(backbone, BACKBONES)
    path = None if isinstance(checkpoint, Mapping) else os.fspath(checkpoint)
    raw = checkpoint if path is None else ckpt.load_checkpoint(path)
    state = ckpt.strip_prefix(ckpt.extract_state_dict(raw, path=path), "module.")
    if backbone == "cnn":
        maps, prefix = [_cnn_to_detector], _ENCODER
    else:
        maps, prefix = [_vit_to_detector], _VIT
    return ckpt.load_into(detector, state, key_map=maps, allow_missing=DETECTOR_HEAD_PATTERNS,
                          allow_unexpected=(), required_prefix=prefix, path=path)  # fmt: skip


def _trained_keys(path: str | os.PathLike | None) -> tuple[str, ...] | None:
    """Tensor names of a trained detector checkpoint, or None when there is no such file.

    Read once per file version: inference configs ask for several settings of one checkpoint.
    """
    if not path or not os.path.isfile(path):
        return None  # the checkpoint loader reports the missing file with its own error
    st = os.stat(path)
    return _read_keys(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _read_keys(path: str, _mtime_ns: int, _size: int) -> tuple[str, ...]:
    from monai_mask.io import checkpoint as ckpt

    sd = ckpt.extract_state_dict(ckpt.load_checkpoint(path), path=path)
    return tuple(ckpt.strip_prefix(sd, "module.").keys())


def trained_fpn_stages(path: str | os.PathLike | None, default: int = 2) -> int:
    """``fpn_stages`` of the CNN detector saved in ``path`` (from its pyramid and encoder keys).

    Inference configs call it so that a model trained with any ``fpn_stages`` is rebuilt with
    the same pyramid (MONAI Label and ``monai-mask detect`` pass no training settings);
    ``default`` when the file is missing or holds no CNN pyramid.
    """
    keys = _trained_keys(path)
    inner = {k.split(".")[4] for k in keys or () if k.startswith("network.feature_extractor.fpn."
                                                                 "inner_blocks.")}  # fmt: skip
    down = {k.split(".")[4] for k in keys or ()
            if k.startswith(_ENCODER + "downsamples.")}  # fmt: skip
    if not inner or not down:
        return int(default)
    return len(down) + 2 - len(inner)  # stages: input block + downsamples + bottleneck


def trained_seg_head(path: str | os.PathLike | None) -> bool:
    """Whether the detector saved in ``path`` has a Retina U-Net head (``seg_loss_weight > 0``)."""
    return any(k.startswith("network.seg_head.") for k in _trained_keys(path) or ())
