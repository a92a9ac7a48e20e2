"""RetinaNet factory: levels, train/eval forward, strict pretrained loading, box geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_mask.errors import CheckpointError, ConfigError
from monai_mask.io.writers import image_to_world_boxes, world_to_image_boxes
from monai_mask.networks.detection import (
    build_detector,
    load_pretrained_detector,
    trained_fpn_stages,
    trained_seg_head,
)
from monai_mask.networks.registry import create_model


def _targets():
    return [{"box": torch.tensor([[10.0, 12.0, 6.0, 17.0, 18.0, 10.0]]),
             "box_label": torch.tensor([0])},
            {"box": torch.zeros(0, 6), "box_label": torch.zeros(0, dtype=torch.long)}]


@pytest.mark.parametrize("backbone,size,strides", [
    ("cnn", (32, 32, 32), [(4,) * 3, (8,) * 3, (16,) * 3]),
    ("vit", (32, 32, 32), [(2,) * 3, (4,) * 3, (8,) * 3, (16,) * 3]),
])
def test_train_and_eval_forward(backbone, size, strides):
    torch.manual_seed(0)
    det = build_detector(backbone, img_size=size)
    assert det.network.feature_extractor.level_strides == strides
    det.train()
    losses = det(torch.randn(2, 1, *size), _targets())
    assert set(losses) == {"classification", "box_regression"}
    total = losses["classification"] + losses["box_regression"]
    assert torch.isfinite(total)
    total.backward()
    enc = det.network.feature_extractor
    first = next((enc.encoder if backbone == "cnn" else enc.vit).parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    det.eval()
    with torch.no_grad():  # a whole image larger than the window: sliding window
        out = det([torch.randn(1, 40, 36, 33)], use_inferer=True)
    assert set(out[0]) == {"box", "box_label", "box_label_scores"}
    assert out[0]["box"].shape[1] == 6


@pytest.mark.parametrize("backbone,mae", [("cnn", "cnn_mae_resenc_tiny_s16_i32"),
                                          ("vit", "vit_mae_tiny_p8_i32")])
def test_pretrained_encoder_loads_every_tensor(tmp_path, backbone, mae):
    torch.manual_seed(1)
    model = create_model(mae)
    path = tmp_path / "mae.pt"
    torch.save({"model": model.state_dict()}, path)
    det = build_detector(backbone, img_size=(32, 32, 32), pretrained_ckpt=str(path))
    sd = det.state_dict()
    if backbone == "cnn":
        src = {k[len("encoder."):]: v for k, v in model.state_dict().items()
               if k.startswith("encoder.")}
        prefix = "network.feature_extractor.encoder."
    else:
        src = {k: v for k, v in model.state_dict().items()
               if k.startswith(("patch_embedding.", "blocks.", "norm."))}
        prefix = "network.feature_extractor.vit."
    assert src and all(torch.equal(sd[prefix + k], v) for k, v in src.items())
    report = load_pretrained_detector(det, path, backbone)
    assert len(report.loaded) == len(src)
    assert all(k.startswith(("network.feature_extractor.fpn", "network.feature_extractor.pyr",
                             "network.classification_head", "network.regression_head"))
               for k in report.missing)


@pytest.mark.parametrize("backbone,mae", [("cnn", "cnn_mae_resenc_tiny_s16_i32"),
                                          ("vit", "vit_mae_tiny_p8_i32")])
def test_segmentation_encoder_loads_into_the_detector(tmp_path, backbone, mae):
    """The two-step recipe: a tumor_segmentation network's encoder initialises the detector."""
    from monai_mask.engines.finetune import segmentation_network_from_mae

    torch.manual_seed(2)
    seg = segmentation_network_from_mae(mae, roi_size=(32, 32, 32), out_channels=2)
    path = tmp_path / "seg.pt"
    torch.save(seg.state_dict(), path)
    arch = {"fpn_stages": 1} if backbone == "cnn" else None
    det = build_detector(backbone, img_size=(32, 32, 32), pretrained_ckpt=str(path), arch=arch)
    if backbone == "cnn":  # the stride-2 level is in the pyramid
        assert det.network.feature_extractor.level_strides[0] == (2, 2, 2)
        src = {k: v for k, v in seg.state_dict().items()
               if k.startswith(("input_block.", "downsamples.", "bottleneck."))}
        prefix = "network.feature_extractor.encoder."
    else:
        src = {k[len("vit."):]: v for k, v in seg.state_dict().items() if k.startswith("vit.")}
        prefix = "network.feature_extractor.vit."
    sd = det.state_dict()
    assert src and all(torch.equal(sd[prefix + k], v) for k, v in src.items())
    assert len(load_pretrained_detector(det, path, backbone).loaded) == len(src)
    bad = {**seg.state_dict(), "encoder.extra": torch.zeros(1)} if backbone == "cnn" else None
    if bad is not None:  # MAE and DynUNet keys in one dict: refused, not half-loaded
        with pytest.raises(CheckpointError, match="mixes"):
            load_pretrained_detector(det, bad, backbone)


def test_arch_mapping_and_keywords_merge():
    det = build_detector("cnn", img_size=(32, 32, 32), arch={"fpn_stages": 1}, fpn_stages=3)
    assert det.network.feature_extractor.level_strides == [(8,) * 3, (16,) * 3]
    det = build_detector("cnn", img_size=(32, 32, 32), arch={"fpn_stages": 1})
    assert det.network.feature_extractor.level_strides[0] == (2,) * 3
    with pytest.raises(ConfigError, match="unknown"):
        build_detector("cnn", img_size=(32, 32, 32), arch={"patch_size": 8})


def test_mismatched_checkpoint_fails_loudly(tmp_path):
    wide = create_model("cnn_mae_resenc_tiny_s16_i32", filters=(8, 16, 32, 64, 128))
    path = tmp_path / "wide.pt"
    torch.save(wide.state_dict(), path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        build_detector("cnn", img_size=(32, 32, 32), pretrained_ckpt=str(path))
    vit = create_model("vit_mae_tiny_p8_i32")
    with pytest.raises(CheckpointError):  # a ViT checkpoint into the CNN detector
        load_pretrained_detector(build_detector("cnn", img_size=(32, 32, 32)),
                                 vit.state_dict(), "cnn")
    cnn_sd = create_model("cnn_mae_resenc_tiny_s16_i32").state_dict()
    with pytest.raises(CheckpointError):  # a CNN checkpoint into the ViT detector
        load_pretrained_detector(build_detector("vit", img_size=(32, 32, 32)), cnn_sd, "vit")


def test_config_errors():
    with pytest.raises(ConfigError, match="divisible"):
        build_detector("cnn", img_size=(40, 32, 32))
    with pytest.raises(ConfigError, match="unknown"):
        build_detector("cnn", img_size=(32, 32, 32), patch_size=8)
    with pytest.raises(ConfigError, match="sw_roi_size"):
        build_detector("vit", img_size=(32, 32, 32), sw_roi_size=(64, 64, 64))
    with pytest.raises(ValueError):
        build_detector("resnet", img_size=(32, 32, 32))


def _oblique_affine(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    aff = np.eye(4)
    aff[:3, :3] = q @ np.diag(rng.uniform(0.5, 3.0, 3))
    aff[:3, 3] = rng.uniform(-100, 100, 3)
    return aff


@pytest.mark.parametrize("seed", range(5))
def test_world_image_world_round_trip(seed):
    """Centres round-trip to 1e-3 mm on oblique affines; whole boxes on axis-aligned ones."""
    rng = np.random.default_rng(100 + seed)
    boxes = np.concatenate([rng.uniform(-80, 80, (6, 3)), rng.uniform(2, 30, (6, 3))], axis=1)
    oblique = _oblique_affine(seed)
    back = image_to_world_boxes(world_to_image_boxes(boxes, oblique), oblique)
    np.testing.assert_allclose(back[:, :3], boxes[:, :3], atol=1e-3)
    assert (back[:, 3:] >= boxes[:, 3:] - 1e-9).all()  # the tight box of a rotated box
    perm = np.eye(4)
    perm[:3, :3] = np.diag(rng.choice([-1, 1], 3) * rng.uniform(0.5, 3.0, 3))[rng.permutation(3)]
    perm[:3, 3] = rng.uniform(-50, 50, 3)
    back = image_to_world_boxes(world_to_image_boxes(boxes, perm), perm)
    np.testing.assert_allclose(back, boxes, atol=1e-3)


def test_retina_unet_segmentation_loss_trains_the_head_and_the_encoder():
    """seg_loss_weight > 0: a segmentation head on the finest level joins the losses; crops
    smaller than the divisibility padding are scored on their own voxels only."""
    torch.manual_seed(0)
    det = build_detector("cnn", img_size=(32, 32, 32), seg_loss_weight=0.5,
                         arch={"fpn_stages": 1})  # fmt: skip
    assert any(k.startswith("network.seg_head.") for k in det.state_dict())
    label = torch.zeros(1, 30, 32, 32, dtype=torch.long)  # 30: padded to 32 by the detector
    label[0, 10:18, 12:19, 6:11] = 1
    targets = [{**_targets()[0], "label": label},
               {**_targets()[1], "label": torch.zeros_like(label)}]
    images = [torch.randn(1, 30, 32, 32) + 2.0 * label.float(), torch.randn(1, 30, 32, 32)]
    det.train()
    opt = torch.optim.Adam(det.parameters(), lr=3e-3)
    seg_losses = []
    for _ in range(15):
        losses = det(images, targets)
        assert set(losses) == {"classification", "box_regression", "segmentation"}
        opt.zero_grad()
        sum(losses.values()).backward()
        assert det.network.seg_head.block[0].weight.grad.abs().sum() > 0
        assert next(det.network.feature_extractor.encoder.parameters()).grad.abs().sum() > 0
        opt.step()
        seg_losses.append(float(losses["segmentation"]))
    assert seg_losses[-1] < 0.8 * seg_losses[0], seg_losses
    with pytest.raises(ConfigError, match="label map"):
        det(images, _targets())
    det.eval()
    with torch.no_grad():  # inference does not need (or use) the head
        out = det([torch.randn(1, 40, 36, 33)], use_inferer=True)
    assert out[0]["box"].shape[1] == 6
    with pytest.raises(ConfigError, match="seg_loss_weight"):
        build_detector("cnn", img_size=(32, 32, 32), seg_loss_weight=-1.0)


@pytest.mark.parametrize("fpn_stages,seg", [(1, True), (2, False), (3, False)])
def test_trained_detector_settings_are_read_back_from_its_checkpoint(tmp_path, fpn_stages, seg):
    det = build_detector("cnn", img_size=(32, 32, 32), seg_loss_weight=float(seg),
                         fpn_stages=fpn_stages)  # fmt: skip
    path = tmp_path / "model.pt"
    torch.save({f"module.{k}": v for k, v in det.state_dict().items()}, path)  # DDP names too
    assert trained_fpn_stages(path) == fpn_stages and trained_seg_head(path) is seg
    assert trained_fpn_stages(tmp_path / "none.pt", 2) == 2 and not trained_seg_head(None)
    vit = tmp_path / "vit.pt"
    torch.save(build_detector("vit", img_size=(32, 32, 32)).state_dict(), vit)
    assert trained_fpn_stages(vit, 2) == 2
