"""Detection engines: MONAI ``SupervisedTrainer``/``SupervisedEvaluator`` around a RetinaNet.

Batches come from a ``DataLoader`` with ``collate_fn=monai.data.utils.no_collation`` (images and
box lists of different sizes do not stack): a list of cases, each a dict or a list of crops.

* :class:`DetectionTrainer` runs the detector in train mode (it returns its classification
  and box-regression losses) and steps on their sum.
* :class:`DetectionEvaluator` runs it in eval mode with its sliding-window inferer and returns,
  per image, the predicted boxes in **world LPS mm** ``cccwhd``: the detector's voxel boxes of the
  preprocessed image are mapped through that image's affine (from its ``MetaTensor``), which
  undoes the reorientation and resampling, so the boxes belong to the original image.
* :class:`DetectionMetric` (ignite) accumulates those outputs and reports COCO and FROC
  (:mod:`monai_mask.engines.detection_metrics`); :class:`DetectionWriter` writes per-case box
  JSON and Slicer markups.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.data.box_utils import convert_box_mode
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from monai_mask.engines.detection_metrics import evaluate_detections
from monai_mask.engines.pretrain import autocast_for

__all__ = ["DetectionTrainer", "DetectionEvaluator", "DetectionMetric", "DetectionWriter",
           "flatten_batch", "case_name", "image_boxes_to_world"]  # fmt: skip


def flatten_batch(batchdata) -> list[dict]:
    """``no_collation`` batch (cases, each a dict or a list of crop dicts) -> flat list of dicts."""
    items = batchdata if isinstance(batchdata, list) else [batchdata]
    flat: list[dict] = []
    for item in items:
        flat.extend(item if isinstance(item, list) else [item])
    return flat


def case_name(sample: Mapping) -> str:
    """The case id of a sample, else its image file name without extensions."""
    if sample.get("case_id"):
        return str(sample["case_id"])
    image = sample[Keys.IMAGE]
    path = str(getattr(image, "meta", {}).get("filename_or_obj", "case"))
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def image_boxes_to_world(boxes_xyzxyz: torch.Tensor | np.ndarray,
                         affine_ras: torch.Tensor | np.ndarray) -> np.ndarray:
    """Detector boxes (voxel ``xyzxyz`` of an image) -> world LPS mm ``cccwhd`` via its affine."""
    from monai_mask.io.writers import image_to_world_boxes

    boxes = torch.as_tensor(boxes_xyzxyz, dtype=torch.float64).reshape(-1, 6)
    cccwhd = convert_box_mode(boxes, src_mode="xyzxyz", dst_mode="cccwhd")
    affine = np.asarray(torch.as_tensor(affine_ras).detach().cpu(), dtype=np.float64)
    return image_to_world_boxes(cccwhd.numpy(), affine)


def _plain(x: torch.Tensor, device) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    return x.to(device)


class DetectionTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration trains a MONAI ``RetinaNetDetector``.

    Args:
        box_key, label_key: target keys of the samples (the detector's target keys).
        seg_key: sample key of the crop's label map, passed on in the targets when present
            (for a detector with a segmentation head; every returned loss is summed).
        amp: bf16 autocast (fp16 on CUDA without bf16). clip_grad: max gradient norm or None.
        The others are ``SupervisedTrainer``'s; ``loss_function`` is unused (the detector
        computes its losses) and outputs are not decollated (``loss``, ``loss_cls``,
        ``loss_box`` and, with a segmentation head, ``loss_seg`` scalars).
    """

    def __init__(self, device, max_epochs: int, train_data_loader, network, optimizer,
                 box_key: str = "box", label_key: str = "box_label", seg_key: str = "label",
                 amp: bool = False, clip_grad: float | None = None,
                 loss_function: Callable | None = None,
                 train_handlers: Sequence | None = None, **kwargs) -> None:
        super().__init__(device=device, max_epochs=max_epochs,
                         train_data_loader=train_data_loader, network=network,
                         optimizer=optimizer, loss_function=loss_function or _unused_loss,
                         amp=False, train_handlers=train_handlers, decollate=False, **kwargs)
        self.box_key, self.label_key, self.seg_key = box_key, label_key, seg_key
        self.use_amp, self.clip_grad = amp, clip_grad

    def _iteration(self, engine, batchdata) -> dict:
        dev = engine.state.device
        samples = flatten_batch(batchdata)
        images = [_plain(s[Keys.IMAGE], dev).float() for s in samples]
        targets = [{self.box_key: _plain(s[self.box_key], dev).float().reshape(-1, 6),
                    self.label_key: _plain(s[self.label_key], dev).long().reshape(-1)}
                   for s in samples]  # fmt: skip
        for s, t in zip(samples, targets, strict=True):  # label maps for a segmentation head
            if self.seg_key in s:
                t[self.seg_key] = _plain(s[self.seg_key], dev).long()
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with autocast_for(dev, self.use_amp):
            losses = engine.network(images, targets)
        loss = sum(losses.values())
        engine.state.output = {Keys.LOSS: loss, "loss_cls": losses["classification"],
                               "loss_box": losses["box_regression"]}  # fmt: skip
        if "segmentation" in losses:
            engine.state.output["loss_seg"] = losses["segmentation"]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.clip_grad)
        engine.optimizer.step()
        engine.state.output = {k: v.detach() for k, v in engine.state.output.items()}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class DetectionEvaluator(SupervisedEvaluator):
    """Sliding-window detection of whole images; outputs world-mm boxes per image.

    Output (``engine.state.output``, a list with one dict per image): ``case_id``,
    ``pred_box`` (N, 6) cccwhd LPS mm, ``pred_score`` (N,), ``pred_label`` (N,), and when the
    sample has ground truth, ``gt_box`` (M, 6) cccwhd LPS mm (the sample's ``gt_key``, the
    datalist boxes kept before conversion to voxels) and ``gt_label`` (M,).

    Args:
        label_key: the detector's label key (scores are under ``f"{label_key}_scores"``).
        gt_key: sample key of the world ground-truth boxes.
        amp: autocast as in :class:`DetectionTrainer`.
    """

    def __init__(self, device, val_data_loader, network, box_key: str = "box",
                 label_key: str = "box_label", gt_key: str = "box_world", amp: bool = False,
                 **kwargs) -> None:
        super().__init__(device=device, val_data_loader=val_data_loader, network=network,
                         amp=False, decollate=False, **kwargs)
        self.box_key, self.label_key, self.gt_key = box_key, label_key, gt_key
        self.use_amp = amp

    def _iteration(self, engine, batchdata) -> list[dict]:
        dev = engine.state.device
        samples = flatten_batch(batchdata)
        images = [_plain(s[Keys.IMAGE], dev).float() for s in samples]
        engine.network.eval()
        with torch.no_grad(), autocast_for(dev, self.use_amp):
            preds = engine.network(images, use_inferer=True)
        engine.state.output = [self._result(s, p) for s, p in zip(samples, preds, strict=True)]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _result(self, sample: Mapping, pred: Mapping) -> dict:
        out = {
            "case_id": case_name(sample),
            "pred_box": image_boxes_to_world(pred[self.box_key].float().cpu(),
                                             sample[Keys.IMAGE].affine),
            "pred_score": pred[f"{self.label_key}_scores"].float().cpu().numpy(),
            "pred_label": pred[self.label_key].cpu().numpy().astype(np.int64),
        }  # fmt: skip
        if self.gt_key in sample:
            out["gt_box"] = np.asarray(torch.as_tensor(sample[self.gt_key]).cpu(),
                                       dtype=np.float64).reshape(-1, 6)  # fmt: skip
            out["gt_label"] = np.asarray(torch.as_tensor(sample[self.label_key]).cpu(),
                                         dtype=np.int64).reshape(-1)  # fmt: skip
        return out


class DetectionMetric(Metric):
    """Ignite metric over :class:`DetectionEvaluator` outputs: COCO + FROC, per case and overall.

    ``compute`` returns ``overall[key]`` (default the CPM; 0.0 when there is no lesion) and,
    when ``report_path`` is set, writes the whole report of
    :func:`~monai_mask.engines.detection_metrics.evaluate_detections` there as JSON.
    """

    def __init__(self, key: str = "cpm", report_path: str | os.PathLike | None = None,
                 iou_thresh: float = 0.1, output_transform: Callable = lambda x: x) -> None:
        self.key, self.iou_thresh = key, iou_thresh
        self.report_path = Path(report_path) if report_path else None
        self.report: dict = {}
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._cases: list[dict] = []

    def update(self, output) -> None:
        self._cases.extend(o for o in (output if isinstance(output, list) else [output])
                           if "gt_box" in o)  # fmt: skip

    def compute(self) -> float:
        from monai_mask.data.datalist import write_json_atomic

        self.report = evaluate_detections(self._cases, iou_thresh=self.iou_thresh)
        if self.report_path is not None:
            write_json_atomic(_jsonable(self.report), self.report_path)
        value = self.report["overall"].get(self.key)
        return float(value) if value is not None else 0.0


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


class DetectionWriter:
    """Writes ``<case>_boxes.json`` and ``<case>.mrk.json`` per image after each iteration.

    Args:
        output_dir: destination folder.
        label_names: class label -> name (default ``{0: "tumour"}``).
        min_score: boxes scoring below are not written.
    """

    def __init__(self, output_dir: str | os.PathLike, label_names: Mapping | None = None,
                 min_score: float = 0.0) -> None:
        self.output_dir = Path(output_dir)
        self.label_names = {int(k): str(v) for k, v in (label_names or {0: "tumour"}).items()}
        self.min_score = float(min_score)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from monai_mask.io.writers import write_boxes_json, write_markups_roi

        self.output_dir.mkdir(parents=True, exist_ok=True)
        for out in engine.state.output:
            keep = out["pred_score"] >= self.min_score
            boxes, scores = out["pred_box"][keep], out["pred_score"][keep]
            labels, case = out["pred_label"][keep], out["case_id"]
            write_boxes_json(boxes, scores, labels, self.output_dir / f"{case}_boxes.json",
                             image_path_name=case, label_names=self.label_names)  # fmt: skip
            write_markups_roi(boxes, scores, labels, self.output_dir / f"{case}.mrk.json",
                              label_names=self.label_names)  # fmt: skip


def _unused_loss(*_args, **_kwargs):  # pragma: no cover - never called
    raise RuntimeError("DetectionTrainer takes its losses from the detector")
