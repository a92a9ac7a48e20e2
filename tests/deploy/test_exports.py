"""Deployment exports: ONNX / TorchScript of the segmentation and detection networks.

The segmentation bundle's own ``ckpt_export`` / ``onnx_export`` commands are tested on trained
weights in tests/bundles/test_tumor_segmentation.py; here the library exports
(:mod:`monai_mask.deploy.export`, dynamic batch axis) are checked where deployment uses them:
onnxruntime driven by MONAI's ``SlidingWindowInferer`` over a WHOLE sample volume must match
PyTorch. Seeded random weights: the check is numerical equivalence of the exported graph, which
does not depend on training. Tolerances (docs/deploy.md): outputs on one window within 1e-4
(absolute and relative); whole-volume logits within 5e-4 absolute + 1e-4 relative (measured
max 1.4e-4 for logits of std 0.46: float32 differences of the ViT on real CT windows), and
identical labels wherever the two classes' logits differ by more than 1e-3.
Cost: 10-30 s per test on 2 shared CPU cores, about 1.5 min in all.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.bundles.helpers import REPO

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SAMPLE = REPO / "sample_data" / "ct"
ATOL = RTOL = 1e-4  # one window
VOLUME_ATOL = 5e-4  # whole volume, sliding windows
# The detector's windows pad by replicating the border: windows that are mostly padded air are
# nearly constant, and instance norm divides by their tiny spread, which magnifies float32
# differences (measured max 5.9e-4 with replicate padding, 2.8e-4 with zero padding).
DET_VOLUME_ATOL = 1e-3


def _volume(case: str = "case_002") -> torch.Tensor:
    """(1, 1, X, Y, Z) sample CT case after the bundle's inference preprocessing (plan)."""
    from monai.transforms import Compose

    from monai_mask.data.presets import load_plan
    from monai_mask.engines.segment_io import inference_transforms

    chain = Compose(inference_transforms(load_plan(SAMPLE / "prepared" / "plan.json")))
    image = chain({"image": str(SAMPLE / "imagesTr" / f"{case}.nii.gz")})["image"]
    return image.as_tensor()[None].float()


@pytest.mark.slow
def test_segmentation_onnx_sliding_window_matches_pytorch_on_a_whole_volume(tmp_path):
    from monai.inferers import SlidingWindowInferer

    from monai_mask.deploy.export import OnnxPredictor, export_onnx
    from monai_mask.engines.finetune import segmentation_network_from_mae

    torch.manual_seed(0)
    net = segmentation_network_from_mae("vit_mae_tiny_p8_i32", (32, 32, 32), out_channels=2)
    path = export_onnx(net, torch.randn(1, 1, 32, 32, 32), tmp_path / "seg.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["seg.onnx"]  # no temporary file left
    predictor = OnnxPredictor(path, num_threads=2)
    (inp,), (out,) = predictor.session.get_inputs(), predictor.session.get_outputs()
    assert (inp.name, inp.shape, inp.type) == ("image", ["batch", 1, 32, 32, 32], "tensor(float)")
    assert (out.name, out.shape, out.type) == ("pred", ["batch", 2, 32, 32, 32], "tensor(float)")

    volume = _volume()
    assert volume.shape[2:] == (77, 77, 48)  # larger than one window: 4 x 4 x 2 positions
    # the bundle's inference settings (configs/inference.json)
    inferer = SlidingWindowInferer((32, 32, 32), sw_batch_size=4, overlap=0.5, mode="gaussian")
    with torch.no_grad():
        ref = inferer(volume, net.eval()).numpy()
    got = inferer(volume, predictor).numpy()
    assert got.shape == ref.shape == (1, 2, 77, 77, 48)
    np.testing.assert_allclose(got, ref, atol=VOLUME_ATOL, rtol=RTOL)
    margin = np.abs(ref[:, 1] - ref[:, 0]) > 1e-3
    assert margin.mean() > 0.9  # the label comparison covers most voxels
    np.testing.assert_array_equal(got.argmax(1)[margin], ref.argmax(1)[margin])


def _detection_net(backbone: str):
    from monai_mask.deploy.export import DetectionHeadOutputs
    from monai_mask.networks.detection import build_detector

    torch.manual_seed(0)
    window = {"cnn": (80, 80, 48), "vit": (32, 32, 32)}[backbone]  # bundle's sw_roi_size
    train_size = {"cnn": (48, 48, 32), "vit": (32, 32, 32)}[backbone]
    det = build_detector(backbone, img_size=train_size, sw_roi_size=window)
    return det, DetectionHeadOutputs(det.network).eval(), window


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["cnn", "vit"])
def test_detection_head_exports_match_pytorch_on_a_window(tmp_path, backbone):
    from monai_mask.deploy.export import OnnxPredictor, export_onnx, export_torchscript

    det, heads, window = _detection_net(backbone)
    x = torch.randn(2, 1, *window, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = heads(x)
    strides = det.network.feature_extractor.level_strides
    assert len(ref) == 2 * len(strides) == len(heads.output_names)
    onnx_path = export_onnx(heads, x[:1], tmp_path / "det.onnx", output_names=heads.output_names)
    ts_path = export_torchscript(heads, x[:1], tmp_path / "det.ts")
    predictor = OnnxPredictor(onnx_path, num_threads=2)
    assert predictor.output_names == heads.output_names
    with torch.no_grad():
        scripted = torch.jit.load(str(ts_path))(x)  # traced with batch 1, run with batch 2
    onnx_out = predictor(x)
    num_anchors = det.anchor_generator.num_anchors_per_location()[0]
    for i, (r, t, o) in enumerate(zip(ref, scripted, onnx_out, strict=True)):
        level = strides[i % len(strides)]
        channels = num_anchors * (1 if i < len(strides) else 6)  # 1 class; 6 box deltas (3D)
        assert r.shape == (2, channels, *(w // s for w, s in zip(window, level, strict=True)))
        np.testing.assert_allclose(t.numpy(), r.numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(o.numpy(), r.numpy(), atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_detection_heads_onnx_sliding_window_matches_pytorch_on_a_whole_volume(tmp_path):
    from monai_mask.deploy.export import OnnxPredictor, export_onnx

    det, heads, window = _detection_net("cnn")
    path = export_onnx(heads, torch.zeros(1, 1, *window), tmp_path / "det.onnx",
                       output_names=heads.output_names)
    volume = _volume("case_001")  # (65, 65, 53): padded to and tiled by 80x80x48 windows
    with torch.no_grad():  # the detector's own sliding-window inferer (build_detector)
        ref = det.inferer(volume, heads)
    got = det.inferer(volume, OnnxPredictor(path, num_threads=2))
    assert len(got) == len(ref) == 6
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        np.testing.assert_allclose(g.numpy(), r.numpy(), atol=DET_VOLUME_ATOL, rtol=RTOL)


def test_onnx_predictor_refuses_missing_and_corrupt_files(tmp_path):
    from monai_mask.deploy.export import OnnxPredictor
    from monai_mask.errors import InputError

    with pytest.raises(InputError, match="no such ONNX file"):
        OnnxPredictor(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(InputError, match="bad.onnx: not a loadable ONNX model"):
        OnnxPredictor(bad)
