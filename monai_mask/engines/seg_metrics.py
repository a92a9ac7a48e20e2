"""Per-case, per-class Dice and HD95 of a segmentation evaluator, to CSV with a summary.

MONAI's ``MetricsSaver`` writes HD95 in voxels (its ``HausdorffDistance`` handler passes no
spacing); this handler calls MONAI's ``DiceMetric`` and ``HausdorffDistanceMetric(percentile=95)``
per case with the voxel spacing of the evaluated grid, so HD95 is in millimetres.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import DiceMetric, HausdorffDistanceMetric

__all__ = ["SegmentationMetricsSaver", "summarise"]


def summarise(values: list[float]) -> dict[str, float]:
    """``n`` (finite values), mean, std, median, min, max of ``values`` (NaN/inf skipped)."""
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "median": math.nan,
                "min": math.nan, "max": math.nan}  # fmt: skip
    return {"n": int(finite.size), "mean": float(finite.mean()), "std": float(finite.std()),
            "median": float(np.median(finite)), "min": float(finite.min()),
            "max": float(finite.max())}  # fmt: skip


class SegmentationMetricsSaver:
    """Dice and HD95 (mm) per case and per foreground class, written when the run completes.

    Files in ``output_dir``: ``metrics_per_case.csv`` (``case, class, dice, hd95_mm,
    label_voxels, pred_voxels``), ``metrics_summary.csv`` (per class and metric: n, mean,
    std, median, min, max over cases where the metric is defined) and
    ``metrics_summary.json`` (the same). Dice is undefined (empty) for a case whose class is
    absent from the reference (MONAI ``ignore_empty``); HD95 when the reference or the
    prediction is empty.

    Args:
        output_dir: destination folder.
        class_names: ``{index: name}`` including background 0 (not reported).
        pred_key, label_key, image_key: one-hot (C, X, Y, Z) prediction and label; the
            image's meta gives the case name and spacing.
    """

    def __init__(self, output_dir: str | os.PathLike, class_names: Mapping[int | str, str],
                 pred_key: str = "pred", label_key: str = "label",
                 image_key: str = "image") -> None:
        self.output_dir = Path(output_dir)
        self.class_names = {int(k): v for k, v in class_names.items()}
        self.keys = (pred_key, label_key, image_key)
        self.rows: list[dict] = []
        self.dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        self.hd95 = HausdorffDistanceMetric(include_background=False, percentile=95,
                                            reduction="none")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        """Add the rows of the cases in the engine's (decollated) output."""
        from monai_mask.io.readers import case_name

        pred_key, label_key, image_key = self.keys
        for item in engine.state.output:
            pred = item[pred_key][None].float().cpu()
            label = item[label_key][None].float().cpu()
            meta = getattr(item[image_key], "meta", {})
            spacing = _spacing(meta, pred.ndim - 2)
            dice = self.dice(pred, label)[0]
            hd95 = self.hd95(pred, label, spacing=spacing)[0]
            case = case_name(str(meta.get("filename_or_obj", f"case_{len(self.rows)}")))
            for c in range(1, pred.shape[1]):
                self.rows.append({
                    "case": case, "class": self.class_names.get(c, str(c)),
                    "dice": float(dice[c - 1]), "hd95_mm": float(hd95[c - 1]),
                    "label_voxels": int(label[0, c].sum()), "pred_voxels": int(pred[0, c].sum()),
                })  # fmt: skip

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{class: {"dice": stats, "hd95_mm": stats}}`` over the collected cases."""
        out: dict[str, dict] = {}
        for name in dict.fromkeys(r["class"] for r in self.rows):
            rows = [r for r in self.rows if r["class"] == name]
            out[name] = {m: summarise([r[m] for r in rows]) for m in ("dice", "hd95_mm")}
        return out

    def write(self, engine: Engine | None = None) -> None:
        """Write the per-case CSV and the summaries (atomically, by rename)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fields = ["case", "class", "dice", "hd95_mm", "label_voxels", "pred_voxels"]
        _write_csv(self.output_dir / "metrics_per_case.csv", fields,
                   [{k: _fmt(r[k]) for k in fields} for r in self.rows])
        summary = self.summary()
        rows = [{"class": c, "metric": m, **{k: _fmt(v) for k, v in stats.items()}}
                for c, metrics in summary.items() for m, stats in metrics.items()]
        _write_csv(self.output_dir / "metrics_summary.csv",
                   ["class", "metric", "n", "mean", "std", "median", "min", "max"], rows)
        tmp = self.output_dir / ".metrics_summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=True))
        tmp.replace(self.output_dir / "metrics_summary.json")


def _spacing(meta: Mapping, spatial_dims: int) -> list[float] | None:
    affine = meta.get("affine")
    if affine is None:
        return None
    affine = torch.as_tensor(affine, dtype=torch.float64)
    return [float(s) for s in torch.linalg.norm(affine[:spatial_dims, :spatial_dims], dim=0)]


def _fmt(value) -> str | int:
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return value


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
