"""Lesion boxes in world millimetres.

Convention (used by ``monai-mask sample-data``, ``prepare`` and the detection bundle):
``cccwhd`` = centre x, y, z then size along x, y, z, **LPS** world millimetres (the DICOM, ITK
and 3D Slicer convention; x_LPS = -x_RAS, y_LPS = -y_RAS), axis-aligned in world space. A lesion's
box is the bounding box of its voxel centres in world LPS, expanded on each side by half the
voxel's extent along that world axis (``0.5 * sum_j |A[i, j]|`` for the 3x3 direction-spacing
matrix ``A``), so that a single-voxel lesion gets a box the size of its voxel.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["RAS_TO_LPS", "voxel_to_lps", "boxes_from_label"]

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def voxel_to_lps(ijk: np.ndarray, affine_ras: np.ndarray) -> np.ndarray:
    """World LPS coordinates (N, 3) of voxel indices (N, 3) under a RAS affine."""
    ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
    aff = RAS_TO_LPS @ np.asarray(affine_ras, dtype=np.float64)
    return ijk @ aff[:3, :3].T + aff[:3, 3]


def boxes_from_label(
    label: np.ndarray, affine_ras: np.ndarray, connectivity: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes of the connected components of each foreground class of ``label``.

    Args:
        label: (X, Y, Z) integer label map, 0 = background.
        affine_ras: (4, 4) nibabel (RAS) affine of the label.
        connectivity: 1 (faces), 2 (edges) or 3 (corners) neighbourhood for components.

    Returns:
        boxes (N, 6) ``cccwhd`` in world LPS mm, class labels (N,) as ``value - 1`` (0 = first
        foreground class, MONAI detection style), centroids (N, 3) in world LPS mm.
    """
    aff = RAS_TO_LPS @ np.asarray(affine_ras, dtype=np.float64)
    half = 0.5 * np.abs(aff[:3, :3]).sum(axis=1)
    structure = ndimage.generate_binary_structure(3, connectivity)
    boxes, classes, centroids = [], [], []
    for value in (int(v) for v in np.unique(label) if v > 0):
        comps, n = ndimage.label(label == value, structure=structure)
        for idx in range(1, n + 1):
            world = voxel_to_lps(np.argwhere(comps == idx), affine_ras)
            lo, hi = world.min(axis=0) - half, world.max(axis=0) + half
            boxes.append(np.concatenate([(lo + hi) / 2, hi - lo]))
            classes.append(value - 1)
            centroids.append(world.mean(axis=0))
    if not boxes:
        return np.zeros((0, 6)), np.zeros((0,), dtype=np.int64), np.zeros((0, 3))
    return np.stack(boxes), np.asarray(classes, dtype=np.int64), np.stack(centroids)
