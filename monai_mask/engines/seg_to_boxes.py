"""Baseline detector: segmentation probabilities -> scored boxes by connected components.

The foreground probability map of a segmentation model is thresholded, split into connected
components, and each component becomes one box (the world bounding box of its voxels, in the
convention of :func:`monai_mask.data.boxes.boxes_from_label`) scored by the maximum or mean
probability inside it. The boxes are evaluated exactly as the detector's
(:func:`monai_mask.engines.detection_metrics.evaluate_detections`);
:func:`segmentation_detections` runs a segmentation network over preprocessed cases and returns
them in that function's input format (:func:`segmentation_probabilities` +
:func:`detections_from_probabilities`, to run the network once for several thresholds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import numpy as np
import torch
from monai.utils import look_up_option
from scipy import ndimage

from monai_mask.data.boxes import boxes_from_label

__all__ = ["prob_to_boxes", "segmentation_probabilities", "detections_from_probabilities",
           "segmentation_detections"]  # fmt: skip


def prob_to_boxes(
    prob: np.ndarray, affine_ras: np.ndarray, threshold: float = 0.5,
    score: Literal["max", "mean"] = "max", min_voxels: int = 1, connectivity: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Scored world boxes from a foreground probability map.

    Args:
        prob: ``(X, Y, Z)`` foreground probabilities in [0, 1] (e.g. softmax channel 1).
        affine_ras: ``(4, 4)`` nibabel (RAS) affine of ``prob``.
        threshold: voxels with ``prob >= threshold`` form the components.
        score: ``"max"`` or ``"mean"`` probability over the component's voxels.
        min_voxels: smaller components are dropped.
        connectivity: 1 (faces), 2 (edges) or 3 (corners).

    Returns:
        ``(boxes (N, 6) cccwhd LPS mm, scores (N,), labels (N,) all 0)``, by decreasing score.
    """
    score = look_up_option(score, ("max", "mean"))
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim != 3:
        raise ValueError(f"prob must be (X, Y, Z), got shape {prob.shape}")
    structure = ndimage.generate_binary_structure(3, connectivity)
    comps, n = ndimage.label(prob >= threshold, structure=structure)
    if n == 0:
        return np.zeros((0, 6)), np.zeros(0), np.zeros(0, dtype=np.int64)
    index = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones_like(prob), comps, index)
    reduce = ndimage.maximum if score == "max" else ndimage.mean
    scores = np.asarray(reduce(prob, comps, index), dtype=np.float64)
    keep = index[sizes >= min_voxels]
    relabelled = np.zeros_like(comps)
    for new, old in enumerate(keep, start=1):
        relabelled[comps == old] = new
    # one "class" per kept component: boxes_from_label returns them in label-value order
    boxes, _, _ = boxes_from_label(relabelled, affine_ras, connectivity=3)
    scores = scores[keep - 1]
    order = np.argsort(-scores, kind="stable")
    return boxes[order], scores[order], np.zeros(len(order), dtype=np.int64)


def segmentation_probabilities(
    network: torch.nn.Module, inferer: Callable, samples: Iterable[Mapping], foreground: int = 1,
    device: str | torch.device = "cpu",
) -> list[tuple[Mapping, np.ndarray, np.ndarray]]:  # fmt: skip
    """Run a segmentation network over preprocessed samples, once each.

    Args:
        network: a segmentation network (logits ``(1, C, *S)``; softmax over ``C``).
        inferer: e.g. the bundle's ``SlidingWindowInferer``; called as ``inferer(image, network)``.
        samples: preprocessed dicts with ``image`` (a ``MetaTensor`` ``(1, *S)`` whose affine
            is RAS).
        foreground: the softmax channel returned.
        device: where the network runs.

    Returns:
        per sample ``(sample, foreground probability (*S), RAS affine of that grid)``.
    """
    network.eval()
    out = []
    with torch.no_grad():
        for s in samples:
            image = s["image"]
            logits = inferer(image[None].to(device), network)
            prob = torch.softmax(logits.float(), dim=1)[0, foreground].cpu().numpy()
            out.append((s, prob, np.asarray(image.affine, dtype=np.float64)))
    return out


def detections_from_probabilities(
    probabilities: Iterable[tuple[Mapping, np.ndarray, np.ndarray]], threshold: float = 0.5,
    score: Literal["max", "mean"] = "max", min_voxels: int = 1,
) -> list[dict]:  # fmt: skip
    """:func:`prob_to_boxes` over the output of :func:`segmentation_probabilities`.

    Returns:
        one dict per sample with ``case_id`` (the sample's, else its index), ``pred_box``,
        ``pred_score``, ``pred_label``, and the ground truth ``gt_box`` / ``gt_label`` from the
        sample's optional ``box`` (``cccwhd`` LPS mm) / ``box_label``: the input of
        :func:`monai_mask.engines.detection_metrics.evaluate_detections`.
    """
    cases = []
    for i, (s, prob, affine) in enumerate(probabilities):
        boxes, scores, labels = prob_to_boxes(prob, affine, threshold, score, min_voxels)
        gt = np.asarray(s.get("box", np.zeros((0, 6))), dtype=np.float64).reshape(-1, 6)
        cases.append({"case_id": str(s.get("case_id", i)), "pred_box": boxes,
                      "pred_score": scores, "pred_label": labels, "gt_box": gt,
                      "gt_label": np.asarray(s.get("box_label", np.zeros(len(gt))),
                                             dtype=np.int64).reshape(-1)})  # fmt: skip
    return cases


def segmentation_detections(
    network: torch.nn.Module, inferer: Callable, samples: Iterable[Mapping],
    threshold: float = 0.5, score: Literal["max", "mean"] = "max", min_voxels: int = 1,
    foreground: int = 1, device: str | torch.device = "cpu",
) -> list[dict]:  # fmt: skip
    """Run a segmentation network and turn its probabilities into scored world boxes.

    :func:`segmentation_probabilities` then :func:`detections_from_probabilities`; to compare
    several thresholds, call those two and run the network once.

    Args:
        samples: as :func:`segmentation_probabilities`, optionally with ``case_id``, ``box``
            (ground truth, ``cccwhd`` LPS mm) and ``box_label``.
        threshold, score, min_voxels: as :func:`prob_to_boxes`.
        network, inferer, foreground, device: as :func:`segmentation_probabilities`.

    Returns:
        the input of :func:`monai_mask.engines.detection_metrics.evaluate_detections`.
    """
    probs = segmentation_probabilities(network, inferer, samples, foreground, device)
    return detections_from_probabilities(probs, threshold, score, min_voxels)
