"""monai_mask.engines.monailabel_adapters: the pieces MONAI Label's BundleInferTask calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacingd

from monai_mask.engines.monailabel_adapters import (
    BundleDetector,
    DetectorBoxesToWorldd,
    StringItemsGuardd,
    guard_string_items,
)
from monai_mask.io.writers import image_to_world_boxes
from tests.bundles.helpers import REPO

CASE = REPO / "sample_data" / "ct" / "imagesTr" / "case_001.nii.gz"
PLAN = REPO / "sample_data" / "ct" / "prepared" / "plan.json"


def _chain():
    from monai_mask.data.presets import load_plan
    from monai_mask.engines.segment_io import inference_transforms

    return inference_transforms(load_plan(PLAN))


def _run(chain, data):
    for t in chain:
        data = t(data)
    return data


def test_spacingd_fails_on_a_string_image_item_and_the_guard_fixes_it():
    request = {"image": str(CASE), "image_path": str(CASE), "model": "m"}  # MONAI Label's data
    with pytest.raises(AttributeError, match="'str' object has no attribute 'update'"):
        _run(_chain(), dict(request))  # MONAI 1.6 Spacingd on a NIfTI input
    guarded = guard_string_items(_chain())
    kinds = [type(t).__name__ for t in guarded]
    i = kinds.index("Spacingd")
    assert kinds[i - 1:i + 2] == ["StringItemsGuardd", "Spacingd", "StringItemsGuardd"]
    out = _run(guarded, dict(request))
    assert out["image_path"] == str(CASE) and out["model"] == "m"
    assert not [k for k in out if str(k).startswith("__hidden__")]
    assert out["image"].shape[0] == 1


def test_guard_leaves_other_items_alone():
    data = {"image": 1, "image_meta_dict": {"a": 1}, "image_path": "p", "label_path": "q"}
    hidden = StringItemsGuardd("image", hide=True)(data)
    assert "image_path" not in hidden and hidden["image_meta_dict"] == {"a": 1}
    assert hidden["label_path"] == "q"
    assert StringItemsGuardd("image", hide=False)(hidden) == data
    assert guard_string_items([Spacingd("image", pixdim=1.0)])[0].hide is True


def test_detector_boxes_to_world_filters_sorts_and_maps_through_the_affine():
    affine = torch.tensor([[-0.8, 0.0, 0.0, 10.0], [0.0, 0.9, 0.0, -5.0], [0.0, 0.0, 2.0, 3.0],
                           [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    image = MetaTensor(torch.zeros(1, 8, 8, 8), affine=affine)
    boxes = torch.tensor([[0.0, 0, 0, 2, 2, 2], [1.0, 1, 1, 5, 3, 4], [2.0, 2, 2, 4, 4, 4]])
    data = {"image": image, "box": boxes, "box_label": torch.tensor([0, 0, 0]),
            "box_label_scores": torch.tensor([0.3, 0.9, 0.01]), "image_path": "x.nii.gz"}
    out = DetectorBoxesToWorldd(min_score=0.05)(data)
    np.testing.assert_allclose(out["score"].numpy(), [0.9, 0.3])
    cccwhd = np.array([[3.0, 2.0, 2.5, 4, 2, 3], [1.0, 1.0, 1.0, 2, 2, 2]])
    np.testing.assert_allclose(out["box"].numpy(), image_to_world_boxes(cccwhd, affine.numpy()))
    assert out["label"].tolist() == [0, 0] and out["image_path"] == "x.nii.gz"
    # best box centre voxel (3, 2, 2.5) -> RAS (7.6, -3.2, 8) -> LPS (-7.6, 3.2, 8)
    np.testing.assert_allclose(out["box"][0, :3].numpy(), [-7.6, 3.2, 8.0])


def test_bundle_detector_runs_the_network_it_was_given():
    from monai_mask.networks.detection import build_detector

    torch.manual_seed(0)
    det = build_detector("cnn", img_size=(32, 32, 32), sw_roi_size=(32, 32, 32))
    adapter = BundleDetector()
    with pytest.raises(RuntimeError, match="no network"):
        adapter(torch.zeros(1, 1, 32, 32, 32))
    adapter.network = det.train()
    assert adapter.eval() is adapter and not det.training
    batch = MetaTensor(torch.randn(1, 1, 32, 32, 32))
    with torch.no_grad():
        (out,) = adapter(batch, use_inferer=True)
    assert out["box"].shape[1] == 6 and out["box_label"].shape == out["box_label_scores"].shape
