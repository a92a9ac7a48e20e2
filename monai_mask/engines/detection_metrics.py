"""Detection metrics on world-millimetre boxes: COCO mAP/mAR and FROC (pure functions).

Boxes are ``cccwhd`` in LPS world mm (``monai_mask.data.boxes``); IoU is computed in world mm on
axis-aligned boxes, so the figures do not depend on the voxel grid a model ran on.

* **COCO** (Lin et al., ECCV 2014): MONAI's ``COCOMetric`` over IoU 0.1:0.5:0.05 (mAP, mAR) and
  AP/AR at IoU 0.1, 0.25 and 0.5, up to 100 detections per scan.
* **FROC** (LUNA16, Setio et al., MedIA 2017): sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false
  positives per scan and their mean, the CPM. **Hit criterion**: a detection hits a lesion when
  their IoU is above ``iou_thresh`` (default 0.1). Each lesion counts once, with the highest
  score among the detections that hit it; the other detections that hit a lesion are ignored
  (neither true nor false positives, as in LUNA16); detections that hit no lesion are false
  positives. Curves come from MONAI's ``compute_froc_curve_data`` (CAMELYON16 code).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou
from monai.metrics import compute_froc_curve_data, compute_froc_score

__all__ = ["FP_RATES", "cccwhd_to_xyzxyz", "froc_hits", "froc_summary", "coco_summary",
           "evaluate_detections"]  # fmt: skip

#: false-positive rates per scan of the FROC summary (LUNA16).
FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: below every score: makes MONAI's curve (which drops its lowest threshold) count all detections.
_SENTINEL = -1.0


def cccwhd_to_xyzxyz(boxes: np.ndarray) -> np.ndarray:
    """``(N, 6)`` centre/size boxes -> ``(N, 6)`` min/max corner boxes."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    return np.concatenate([b[:, :3] - b[:, 3:] / 2, b[:, :3] + b[:, 3:] / 2], axis=1)


def froc_hits(pred_boxes: np.ndarray, pred_scores: np.ndarray, gt_boxes: np.ndarray,
              iou_thresh: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """True-positive scores (one per lesion hit) and false-positive scores of one scan.

    Args:
        pred_boxes: ``(N, 6)`` cccwhd. pred_scores: ``(N,)``. gt_boxes: ``(M, 6)`` cccwhd.
        iou_thresh: a detection hits a lesion when IoU > ``iou_thresh``.

    Returns:
        ``(tp_scores (<= M,), fp_scores (<= N,))``.
    """
    scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    pred, gt = cccwhd_to_xyzxyz(pred_boxes), cccwhd_to_xyzxyz(gt_boxes)
    if len(gt) == 0 or len(pred) == 0:
        return np.zeros(0), scores.copy() if len(gt) == 0 else np.zeros(0)
    hit = np.asarray(box_iou(gt, pred)) > iou_thresh  # (M, N)
    tp = np.array([scores[h].max() for h in hit if h.any()])
    fp = scores[~hit.any(axis=0)]
    return tp, fp


def froc_summary(tp_scores: Sequence[np.ndarray], fp_scores: Sequence[np.ndarray],
                 num_gt: int, num_scans: int,
                 fp_rates: Sequence[float] = FP_RATES) -> dict[str, float | None]:
    """Sensitivity at each FP rate per scan and their mean (CPM); None when there is no lesion.

    Args:
        tp_scores, fp_scores: per scan, from :func:`froc_hits`.
        num_gt: lesions over all scans. num_scans: scans evaluated.
    """
    if num_gt == 0:
        return {**{f"sens@{r:g}": None for r in fp_rates}, "cpm": None}
    tp = np.concatenate([np.zeros(0), *tp_scores])
    fp = np.concatenate([np.full(1, _SENTINEL), *fp_scores])
    fps, sens = compute_froc_curve_data(fp, tp, num_gt, num_scans)
    out = {f"sens@{r:g}": float(compute_froc_score(fps, sens, (r,))) for r in fp_rates}
    out["cpm"] = float(np.mean([out[f"sens@{r:g}"] for r in fp_rates]))
    return out


def coco_summary(cases: Sequence[Mapping], class_names: Sequence[str] = ("tumour",),
                 max_detections: int = 100) -> dict[str, float]:
    """MONAI ``COCOMetric`` (IoU 0.1:0.5:0.05, AP/AR at 0.1, 0.25, 0.5) over ``cases``.

    Args:
        cases: dicts with ``pred_box`` (N, 6), ``pred_score`` (N,), ``pred_label`` (N,),
            ``gt_box`` (M, 6), ``gt_label`` (M,); boxes cccwhd in world mm.
    """
    metric = COCOMetric(classes=list(class_names), iou_list=(0.1, 0.25, 0.5),
                        iou_range=(0.1, 0.5, 0.05), max_detection=(max_detections,),
                        per_class=False, verbose=False)  # fmt: skip
    results = matching_batch(
        iou_fn=box_iou, iou_thresholds=metric.iou_thresholds,
        pred_boxes=[cccwhd_to_xyzxyz(c["pred_box"]) for c in cases],
        pred_classes=[np.asarray(c["pred_label"]).reshape(-1) for c in cases],
        pred_scores=[np.asarray(c["pred_score"], dtype=np.float64).reshape(-1) for c in cases],
        gt_boxes=[cccwhd_to_xyzxyz(c["gt_box"]) for c in cases],
        gt_classes=[np.asarray(c["gt_label"]).reshape(-1) for c in cases],
        max_detections=max_detections,
    )  # fmt: skip
    return {k: float(v) for k, v in metric(results)[0].items()}


def _case_report(case: Mapping, iou_thresh: float) -> dict:
    gt = np.asarray(case["gt_box"]).reshape(-1, 6)
    tp, fp = froc_hits(case["pred_box"], case["pred_score"], gt, iou_thresh)
    scores = np.asarray(case["pred_score"]).reshape(-1)
    return {"num_gt": len(gt), "num_pred": int(scores.size),
            "max_score": float(scores.max()) if scores.size else None,
            **froc_summary([tp], [fp], len(gt), 1)}  # fmt: skip


def evaluate_detections(cases: Sequence[Mapping], iou_thresh: float = 0.1,
                        class_names: Sequence[str] = ("tumour",)) -> dict:
    """COCO and FROC, overall and per case.

    Args:
        cases: dicts with ``case_id`` and the keys of :func:`coco_summary`.
        iou_thresh: FROC hit criterion (IoU > ``iou_thresh``).

    Returns:
        ``{"overall": {"num_scans", "num_gt", "sens@0.125" ... "sens@8", "cpm", COCO keys},
        "per_case": {case_id: {"num_gt", "num_pred", "max_score", "sens@...", "cpm"}},
        "hit_criterion": str}``.
    """
    hits = [froc_hits(c["pred_box"], c["pred_score"], c["gt_box"], iou_thresh) for c in cases]
    num_gt = sum(np.asarray(c["gt_box"]).reshape(-1, 6).shape[0] for c in cases)
    overall = {"num_scans": len(cases), "num_gt": num_gt,
               **froc_summary([h[0] for h in hits], [h[1] for h in hits], num_gt, len(cases))}
    if cases:
        overall.update(coco_summary(cases, class_names))
    per_case = {str(c.get("case_id", i)): _case_report(c, iou_thresh) for i, c in enumerate(cases)}
    return {"overall": overall, "per_case": per_case,
            "hit_criterion": f"IoU > {iou_thresh:g} in world mm, one hit per lesion"}
