"""Detection transform chains: crops and flips keep boxes on the voxels they describe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from monai_mask.data.datalist import load_datalist
from monai_mask.data.detection_presets import detection_transforms

PREPARED = Path(__file__).resolve().parents[2] / "sample_data" / "ct" / "prepared"


@pytest.fixture(scope="module")
def entry() -> dict:
    return next(e for e in load_datalist(PREPARED / "datalist.json") if len(e["box"]) >= 2)


def _sorted(boxes: np.ndarray) -> np.ndarray:
    return boxes[np.lexsort(boxes.T[::-1])]


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_train_flip_mirrors_boxes_about_the_voxel_centres(entry, flip):
    """Voxel ``i`` is centred at ``i``: a flip maps ``x`` to ``W - 1 - x`` (MONAI's own box flip
    assumes ``[i, i + 1)`` voxels and moved every flipped box by one voxel)."""
    ref = detection_transforms(PREPARED / "plan.json", mode="eval")(dict(entry))
    # a crop larger than the image keeps the whole image, so only the flips move the boxes
    chain = detection_transforms(PREPARED / "plan.json", mode="train", roi_size=(512, 512, 512),
                                 num_samples=1, flip_prob=flip)  # fmt: skip
    out = chain(dict(entry))[0]
    size = np.asarray(out["image"].shape[1:], dtype=np.float64)
    assert tuple(size) == tuple(ref["image"].shape[1:])
    boxes = np.asarray(ref["box"], dtype=np.float64)
    if flip:
        lo, hi = boxes[:, :3], boxes[:, 3:]
        boxes = np.concatenate([size - 1 - hi, size - 1 - lo], axis=1)
        np.testing.assert_allclose(np.asarray(out["image"][0]),
                                   np.asarray(ref["image"][0])[::-1, ::-1, ::-1], atol=1e-6)
    np.testing.assert_allclose(_sorted(np.asarray(out["box"], dtype=np.float64)), _sorted(boxes),
                               atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_train_label_map_is_cropped_and_flipped_with_the_image_and_boxes(entry, flip):
    """``seg_key``: the label map travels with the image, so the lesion voxels stay inside
    the boxes after random crops and flips (the Retina U-Net loss trains on it)."""
    chain = detection_transforms(PREPARED / "plan.json", mode="train", roi_size=(32, 32, 16),
                                 num_samples=4, flip_prob=flip, seg_key="label")  # fmt: skip
    for crop in chain(dict(entry)):
        label = np.asarray(crop["label"])
        assert label.shape == tuple(crop["image"].shape) and set(np.unique(label)) <= {0, 1}
        ijk = np.argwhere(label[0] > 0)
        if not len(ijk):
            continue
        boxes = np.asarray(crop["box"], dtype=np.float64)
        inside = np.zeros(len(ijk), dtype=bool)
        for b in boxes:
            # one voxel of slack: the label is resampled (nearest), the boxes are exact
            inside |= np.all((ijk >= b[:3] - 1.0) & (ijk <= b[3:] + 1.0), axis=1)
        assert inside.mean() > 0.97, f"{inside.mean():.3f} of the lesion voxels outside the boxes"
    assert "label" not in detection_transforms(PREPARED / "plan.json", mode="eval",
                                               seg_key="label")(dict(entry))  # fmt: skip
