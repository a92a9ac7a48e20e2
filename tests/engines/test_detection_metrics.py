"""COCO + FROC on world boxes, the seg-probability baseline, and box geometry through MONAI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_mask.data.boxes import boxes_from_label
from monai_mask.engines.detection_metrics import (
    FP_RATES,
    cccwhd_to_xyzxyz,
    coco_summary,
    evaluate_detections,
    froc_hits,
    froc_summary,
)
from monai_mask.engines.seg_to_boxes import prob_to_boxes, segmentation_detections

GT = np.array([[0.0, 0.0, 0.0, 10.0, 10.0, 10.0], [50.0, 50.0, 50.0, 6.0, 6.0, 6.0]])


def _case(pred, scores, gt=GT, case_id="c"):
    pred = np.asarray(pred, dtype=float).reshape(-1, 6)
    return {"case_id": case_id, "pred_box": pred, "pred_score": np.asarray(scores, float),
            "pred_label": np.zeros(len(pred), int), "gt_box": gt,
            "gt_label": np.zeros(len(gt), int)}


def test_cccwhd_to_xyzxyz():
    np.testing.assert_allclose(cccwhd_to_xyzxyz(GT[:1]), [[-5, -5, -5, 5, 5, 5]])


def test_froc_hits_one_per_lesion_duplicates_ignored():
    pred = np.array([GT[0], GT[0] + [1, 0, 0, 0, 0, 0], [200, 0, 0, 5, 5, 5]])
    tp, fp = froc_hits(pred, [0.6, 0.9, 0.3], GT)
    np.testing.assert_allclose(tp, [0.9])  # lesion 1 once, with its best score; lesion 2 missed
    np.testing.assert_allclose(fp, [0.3])  # the duplicate is neither TP nor FP
    tp, fp = froc_hits(np.zeros((0, 6)), [], GT)
    assert tp.size == 0 and fp.size == 0
    tp, fp = froc_hits(pred, [0.6, 0.9, 0.3], np.zeros((0, 6)))
    assert tp.size == 0 and fp.size == 3


def test_froc_known_values():
    # scan 1: lesion A hit at 0.9, FP at 0.95; scan 2: lesion B hit at 0.4, FP at 0.8
    fps = [np.array([0.95]), np.array([0.8])]
    tps = [np.array([0.9]), np.array([0.4])]
    out = froc_summary(tps, fps, num_gt=2, num_scans=2)
    # operating points (FP/scan, sens): (0.5, 0) at 0.95, (0.5, .5) at 0.9, (1, .5) at 0.8,
    # (1, 1) at 0.4 (every detection counted)
    assert out["sens@0.125"] == pytest.approx(0.0) and out["sens@0.25"] == pytest.approx(0.0)
    assert out["sens@2"] == pytest.approx(1.0) and out["sens@8"] == pytest.approx(1.0)
    assert 0.0 <= out["sens@0.5"] <= out["sens@1"] <= 1.0
    assert out["cpm"] == pytest.approx(np.mean([out[f"sens@{r:g}"] for r in FP_RATES]))


def test_froc_counts_the_lowest_scored_detection():
    """A lone true positive gives sensitivity 1 (MONAI's curve alone drops its lowest score)."""
    out = froc_summary([np.array([0.7])], [np.zeros(0)], num_gt=1, num_scans=1)
    assert out["cpm"] == pytest.approx(1.0)
    assert froc_summary([], [], num_gt=0, num_scans=3)["cpm"] is None


def test_perfect_and_empty_detections():
    perfect = evaluate_detections([_case(GT, [0.9, 0.8])])
    assert perfect["overall"]["cpm"] == pytest.approx(1.0)
    map_key = next(k for k in perfect["overall"] if k.startswith("mAP_IoU_0.10_0.50"))
    assert perfect["overall"][map_key] == pytest.approx(1.0)
    assert perfect["per_case"]["c"]["num_gt"] == 2 and perfect["per_case"]["c"]["cpm"] == 1.0
    empty = evaluate_detections([_case(np.zeros((0, 6)), [])])
    assert empty["overall"]["cpm"] == 0.0
    assert coco_summary([_case(np.zeros((0, 6)), [])])[map_key] <= 0.0


def test_per_case_and_negative_scans():
    cases = [_case(GT[:1], [0.9], case_id="a"),
             _case([[100, 100, 100, 5, 5, 5]], [0.6], gt=np.zeros((0, 6)), case_id="neg")]
    rep = evaluate_detections(cases)
    assert rep["per_case"]["neg"]["cpm"] is None and rep["per_case"]["neg"]["num_pred"] == 1
    assert rep["per_case"]["a"]["cpm"] == pytest.approx(0.5)  # one of two lesions
    assert rep["overall"]["num_gt"] == 2 and rep["overall"]["num_scans"] == 2
    assert rep["overall"]["sens@8"] == pytest.approx(0.5)


def test_seg_probability_baseline_boxes_and_scores():
    prob = np.zeros((32, 32, 32))
    prob[4:9, 4:9, 4:9] = 0.7
    prob[6, 6, 6] = 0.95
    prob[20:24, 20:26, 10:13] = 0.6
    prob[30, 30, 30] = 0.55  # a one-voxel speck, dropped by min_voxels
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    affine[:3, 3] = [-10, 5, 30]
    boxes, scores, labels = prob_to_boxes(prob, affine, threshold=0.5, min_voxels=2)
    assert len(boxes) == 2 and (labels == 0).all()
    np.testing.assert_allclose(scores, [0.95, 0.6])
    label = np.zeros(prob.shape, np.int16)
    label[4:9, 4:9, 4:9] = 1
    ref, _, _ = boxes_from_label(label, affine)
    np.testing.assert_allclose(boxes[0], ref[0])
    _, mean_scores, _ = prob_to_boxes(prob, affine, score="mean", min_voxels=2)
    assert 0.7 < mean_scores[0] < 0.95
    rep = evaluate_detections([{"case_id": "x", "pred_box": boxes, "pred_score": scores,
                                "pred_label": labels, "gt_box": ref, "gt_label": [0]}])
    assert rep["overall"]["sens@1"] == pytest.approx(1.0)
    assert prob_to_boxes(np.zeros((8, 8, 8)), affine)[0].shape == (0, 6)


class _IntensityLogits(torch.nn.Module):
    """A fixed "segmenter": tumour logit = 20 * (intensity - 0.5), background logit 0."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), 20.0 * (x - 0.5)], dim=1)


def test_segmentation_detections_run_the_network_and_return_world_boxes():
    """Network probabilities on a MetaTensor with an anisotropic, shifted affine -> one box per
    bright blob, in world LPS mm (the geometry of the label's own boxes), scored by max prob;
    ground truth passed through; evaluate_detections counts both lesions as found."""
    from monai.data import MetaTensor
    from monai.inferers import SimpleInferer

    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    affine[:3, 3] = [-10, 5, 30]
    img = np.zeros((24, 24, 16), np.float32)
    img[3:8, 4:9, 2:5] = 1.0
    img[15:19, 14:20, 9:12] = 0.6
    label = np.zeros(img.shape, np.int16)
    label[3:8, 4:9, 2:5] = 1
    label[15:19, 14:20, 9:12] = 1
    gt, _, _ = boxes_from_label(label, affine)
    sample = {"case_id": "c1", "image": MetaTensor(torch.from_numpy(img)[None], affine=affine),
              "box": gt, "box_label": [0, 0]}
    (case,) = segmentation_detections(_IntensityLogits(), SimpleInferer(), [sample],
                                      threshold=0.5)
    assert case["case_id"] == "c1"
    np.testing.assert_allclose(case["pred_box"], gt, atol=1e-6)
    np.testing.assert_allclose(case["pred_score"], [1 / (1 + np.exp(-10)), 1 / (1 + np.exp(-2))],
                               rtol=1e-5)
    np.testing.assert_allclose(case["gt_box"], gt)
    assert evaluate_detections([case])["overall"]["sens@1"] == pytest.approx(1.0)
    # a threshold above the dimmer blob's probability (0.88) keeps only the bright one
    (high,) = segmentation_detections(_IntensityLogits(), SimpleInferer(), [sample],
                                      threshold=0.95)
    np.testing.assert_allclose(high["pred_box"], gt[:1], atol=1e-6)


def test_pipeline_boxes_map_back_to_the_original_world_boxes():
    """Datalist world boxes -> voxels of the reoriented, resampled image (MONAI transform) ->
    world through that image's affine (the evaluator's mapping): centres within 1e-3 mm."""
    from pathlib import Path

    from monai_mask.data.datalist import load_datalist
    from monai_mask.data.detection_presets import detection_transforms
    from monai_mask.engines.detection import image_boxes_to_world

    prepared = Path(__file__).resolve().parents[2] / "sample_data" / "ct" / "prepared"
    entry = next(e for e in load_datalist(prepared / "datalist.json") if len(e["box"]) == 3)
    d = detection_transforms(prepared / "plan.json", mode="eval")(entry)
    world = image_boxes_to_world(d["box"], d["image"].affine)
    np.testing.assert_allclose(world[:, :3], np.asarray(entry["box"])[:, :3], atol=1e-3)
    # oblique grid: sizes come back as the tight world box of the rotated voxel box (larger)
    size = np.asarray(entry["box"])[:, 3:]
    assert (world[:, 3:] >= 0.99 * size).all() and (world[:, 3:] <= 1.6 * size).all()
    np.testing.assert_allclose(d["box_world"], entry["box"], atol=1e-4)
