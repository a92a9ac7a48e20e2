"""Render the docs/slicer.md pictures from what a MONAI Label server returned.

    python scripts/slicer_figures.py --image sample_data/ct/imagesTr/case_002.nii.gz \\
        --label seg.nii.gz --det-image sample_data/ct/imagesTr/case_004.nii.gz \\
        --det-json det.json --det-truth sample_data/ct/labelsTr/case_004.nii.gz --out docs/images

``seg.nii.gz``: the body of ``POST /infer/tumor_segmentation?image=case_002&output=image``;
``det.json``: the body of ``POST /infer/tumor_detection?image=case_004&output=json``.
Writes ``slicer_segmentation.png`` and ``slicer_detection.png`` (lesion centroids of the
reference label as red crosses, returned boxes in yellow).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and write both PNGs."""
    from monai_mask.data.boxes import boxes_from_label
    from monai_mask.io.readers import read_image
    from monai_mask.visualize import detection_overlay_png, segmentation_overlay_png

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--det-image", required=True)
    p.add_argument("--det-json", required=True)
    p.add_argument("--det-truth", required=True)
    p.add_argument("--out", default="docs/images")
    args = p.parse_args(argv)
    out = Path(args.out)
    print(segmentation_overlay_png(args.image, args.label, out / "slicer_segmentation.png",
                                   title="MONAI Label tumor_segmentation output (red outline)"))
    truth = read_image(args.det_truth)
    _, _, centroids = boxes_from_label(np.rint(truth.array).astype(np.int64), truth.affine)
    boxes = np.asarray(json.loads(Path(args.det_json).read_text())["box"], float)
    print(detection_overlay_png(args.det_image, boxes, out / "slicer_detection.png",
                                points_lps=centroids,
                                title="MONAI Label tumor_detection boxes (yellow), lesion "
                                      "centroids (red)"))


if __name__ == "__main__":
    main()
