"""PNG figures of cases: orthogonal slices with the tumour outline, plus a dataset summary."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["case_slices", "overview_png", "mae_preview_png", "save_figure",
           "segmentation_overlay_png", "detection_overlay_png"]


def save_figure(fig, out_png: str | Path, dpi: int = 90) -> Path:
    """Save a matplotlib figure as PNG atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


def case_slices(image: np.ndarray, label: np.ndarray | None, center: tuple[int, int, int]):
    """Axial, coronal and sagittal slices ``(image, label)`` through ``center`` (RAS array)."""
    x, y, z = center
    views = [(image[:, :, z], None if label is None else label[:, :, z]),
             (image[:, y, :], None if label is None else label[:, y, :]),
             (image[x, :, :], None if label is None else label[x, :, :])]
    return [(np.rot90(i), None if lab is None else np.rot90(lab)) for i, lab in views]


def _largest_lesion_center(label: np.ndarray) -> np.ndarray:
    """Voxel centroid of the largest connected foreground component."""
    from scipy import ndimage

    comps, n = ndimage.label(label > 0)
    sizes = ndimage.sum_labels(np.ones_like(comps), comps, index=range(1, n + 1))
    return np.argwhere(comps == int(np.argmax(sizes)) + 1).mean(0).round().astype(int)


def _pick_case(datalist: dict, base: Path) -> dict:
    """The labelled case with the most tumour voxels (first case when none is labelled)."""
    best, best_n = datalist["training"][0], -1
    for item in datalist["training"]:
        if "label" not in item:
            continue
        n = int((np.asanyarray(nib.load(base / item["label"]).dataobj) > 0).sum())
        if n > best_n:
            best, best_n = item, n
    return best


def _summary_text(fingerprint: dict, plan: dict | None) -> str:
    def fmt(values, spec):
        return " x ".join(format(v, spec) for v in values)

    mods = ", ".join(fingerprint["modalities"])
    lines = [f"cases: {fingerprint['n_cases']}   modalities: {mods}",
             "median spacing (mm): " + fmt(fingerprint["median_spacing"], ".2f"),
             "median shape: " + fmt(fingerprint["median_shape"], ".0f")]
    for mod, st in fingerprint["foreground_intensity"].items():
        lines.append(f"{mod} foreground: mean {st['mean']:.1f}  std {st['std']:.1f}")
        lines.append(f"  p0.5 {st['percentile_00_5']:.1f}  p50 {st['median']:.1f}"
                     f"  p99.5 {st['percentile_99_5']:.1f}")
    if plan:
        lines.append("plan: target spacing " + fmt(plan["target_spacing"], ".2f"))
        schemes = ", ".join(n["scheme"] for n in plan["normalisation"].values())
        lines.append(f"      patch {plan['patch_size']}  norm {schemes}")
    return "\n".join(lines)


def overview_png(prepared_dir: str | Path, out_png: str | Path, case_id: str | None = None) -> Path:
    """Render a case (tumour outline in red) and the fingerprint summary of a prepared folder.

    Args:
        prepared_dir: folder holding ``datalist.json``, ``fingerprint.json`` and ``plan.json``.
        out_png: PNG path to write (atomically).
        case_id: case to show; default the labelled case with the largest tumour.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = Path(prepared_dir)
    datalist = json.loads((base / "datalist.json").read_text())
    fingerprint = json.loads((base / "fingerprint.json").read_text())
    plan_path = base / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else None
    item = (next(i for i in datalist["training"] if i["case_id"] == case_id) if case_id
            else _pick_case(datalist, base))
    img_nii = nib.as_closest_canonical(nib.load(base / item["image"]))
    image = np.asanyarray(img_nii.dataobj).astype(np.float32)
    label = None
    if "label" in item:
        label = np.asanyarray(nib.as_closest_canonical(nib.load(base / item["label"])).dataobj)
    center = _largest_lesion_center(label) if label is not None and label.any() else (
        np.array(image.shape) // 2)
    lo, hi = np.percentile(image, [0.5, 99.5])
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    sx, sy, sz = img_nii.header.get_zooms()[:3]
    views = zip(axes[:3], case_slices(image, label, tuple(center)),
                ("axial", "coronal", "sagittal"), (sy / sx, sz / sx, sz / sy), strict=True)
    for ax, (sl, lab), title, aspect in views:
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest", aspect=aspect)
        if lab is not None and lab.any():
            ax.contour(lab > 0, levels=[0.5], colors="red", linewidths=1.2)
        ax.set_title(f"{item['case_id']} {title}")
        ax.axis("off")
    axes[3].axis("off")
    axes[3].text(0.0, 1.0, _summary_text(fingerprint, plan), va="top", family="monospace",
                 fontsize=8.5, transform=axes[3].transAxes)
    return save_figure(fig, out_png, dpi=90)


def mae_preview_png(image: np.ndarray, mask_grid: np.ndarray, recon: np.ndarray,
                    out_png: str | Path, title: str = "") -> Path:
    """Input / masked input / reconstruction, axial and coronal mid slices, as one PNG.

    Args:
        image: (H, W, D) crop (normalised units).
        mask_grid: (gh, gw, gd) patch mask, 1 = masked.
        recon: (H, W, D) reconstruction in the units of ``image``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reps = [s // g for s, g in zip(image.shape, mask_grid.shape, strict=True)]
    vox_mask = np.kron(mask_grid.astype(np.float32), np.ones(reps, np.float32)) > 0
    masked = np.where(vox_mask, np.nan, image)
    lo, hi = np.percentile(image, [1, 99])
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    cz, cy = image.shape[2] // 2, image.shape[1] // 2
    cmap = matplotlib.colormaps["gray"].copy()
    cmap.set_bad("#1f4e9c")  # hidden patches in blue
    for row, take in enumerate((lambda a: a[:, :, cz], lambda a: a[:, cy, :])):
        for col, (arr, name) in enumerate(((image, "input"), (masked, "masked input"),
                                           (recon, "reconstruction"))):
            ax = axes[row, col]
            ax.imshow(np.ma.masked_invalid(np.rot90(take(arr))), cmap=cmap, vmin=lo, vmax=hi,
                      interpolation="nearest")
            ax.set_title(f"{name} ({'axial' if row == 0 else 'coronal'})", fontsize=9)
            ax.axis("off")
    fig.suptitle(title)
    return save_figure(fig, out_png, dpi=80)


def segmentation_overlay_png(image_path: str | Path, label_path: str | Path,
                             out_png: str | Path, title: str = "") -> Path:
    """Axial, coronal and sagittal slices of an image with a label's outline, as one PNG.

    Both are read with ``monai_mask.io.readers.read_image`` (NIfTI, NRRD, MHA or a DICOM series
    folder) and shown in the closest canonical (RAS) orientation, through the centre of the
    largest labelled component (the image centre when the label is empty).

    Args:
        image_path: the segmented image.
        label_path: its label map on the same grid (e.g. ``{case}_seg.nii.gz``).
        out_png: PNG path, written atomically.
        title: figure title (default: the label file name).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_mask.io.readers import read_image

    canon = [nib.as_closest_canonical(nib.Nifti1Image(v.array.astype(np.float32), v.affine))
             for v in (read_image(image_path), read_image(label_path))]
    image, label = (np.asanyarray(c.dataobj) for c in canon)
    center = _largest_lesion_center(label) if label.any() else np.array(image.shape) // 2
    lo, hi = np.percentile(image, [0.5, 99.5])
    sx, sy, sz = canon[0].header.get_zooms()[:3]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    views = zip(axes, case_slices(image, label, tuple(int(c) for c in center)),
                ("axial", "coronal", "sagittal"), (sy / sx, sz / sx, sz / sy), strict=True)
    for ax, (sl, lab), name, aspect in views:
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest", aspect=aspect)
        if lab.any():
            ax.contour(lab > 0, levels=[0.5], colors="red", linewidths=1.2)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title or Path(label_path).name)
    fig.tight_layout()
    return save_figure(fig, out_png)


def detection_overlay_png(image_path: str | Path, boxes_lps: np.ndarray, out_png: str | Path,
                          points_lps: np.ndarray | None = None, title: str = "",
                          max_views: int = 3) -> Path:
    """Axial slices of an image with detected boxes (and reference points, e.g. lesion centroids).

    One panel per reference point (at most ``max_views``; the first boxes' centres when there
    are none), through that point's axial slice of the closest canonical (RAS) orientation.
    Boxes (``cccwhd``, world LPS mm) cut by the slice are drawn in yellow, points as red
    crosses. Boxes map to voxels with :func:`monai_mask.io.writers.world_to_image_boxes` (the
    tight index-space box, exact for axis-aligned images).

    Args:
        image_path: the image (anything ``read_image`` reads).
        boxes_lps: (N, 6) boxes, e.g. MONAI Label's or ``{case}_boxes.json``'s ``box``.
        out_png: PNG path, written atomically.
        points_lps: (M, 3) reference points in world LPS mm.
        title: figure title.
        max_views: most panels drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from monai_mask.data.boxes import RAS_TO_LPS
    from monai_mask.io.readers import read_image
    from monai_mask.io.writers import world_to_image_boxes

    vol = read_image(image_path)
    canon = nib.as_closest_canonical(nib.Nifti1Image(vol.array.astype(np.float32), vol.affine))
    image, affine = np.asanyarray(canon.dataobj), canon.affine
    boxes = world_to_image_boxes(np.asarray(boxes_lps, float).reshape(-1, 6), affine)
    points = np.asarray(points_lps if points_lps is not None else
                        np.asarray(boxes_lps, float).reshape(-1, 6)[:, :3], float).reshape(-1, 3)
    points = points[:max_views] if len(points) else np.zeros((0, 3))
    lps = RAS_TO_LPS @ affine
    ijk = (points - lps[:3, 3]) @ np.linalg.inv(lps[:3, :3]).T
    lo, hi = np.percentile(image, [0.5, 99.5])
    n = max(len(ijk), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.4), squeeze=False)
    sx, sy, _ = canon.header.get_zooms()[:3]
    centres = ijk if len(ijk) else (np.array(image.shape, float)[None] - 1) / 2
    for ax, (i, j, k) in zip(axes[0], centres, strict=True):  # n panels, n centres
        z = int(np.clip(round(k), 0, image.shape[2] - 1))
        ax.imshow(np.rot90(image[:, :, z]), cmap="gray", vmin=lo, vmax=hi,
                  interpolation="nearest", aspect=sy / sx)
        top = image.shape[1] - 1  # rot90: column = i, row = top - j
        for b in boxes[np.abs(boxes[:, 2] - z) <= boxes[:, 5] / 2]:
            ax.add_patch(Rectangle((b[0] - b[3] / 2, top - b[1] - b[4] / 2), b[3], b[4],
                                   fill=False, edgecolor="yellow", linewidth=1.0))
        if len(ijk):
            ax.plot([i], [top - j], marker="+", color="red", markersize=12, mew=2)
        ax.set_title(f"axial slice {z}")
        ax.axis("off")
    fig.suptitle(title or Path(str(image_path)).name)
    return save_figure(fig, out_png)
