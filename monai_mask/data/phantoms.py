"""Anatomy of the synthetic phantoms: oblique voxel grids and analytic CT trunk / MR head models.

Every structure is an analytic shape evaluated at the *world* position (mm) of each voxel
centre, expressed in an anatomical frame (``x`` towards the patient's right, ``y`` anterior,
``z`` superior, RAS) that is a rigid transform of the nibabel world frame. The anatomy is
therefore physically consistent under any affine: anisotropic spacing or an oblique grid
changes how it is sampled, not its shape. Anatomy scales with the field of view (so a
32^3 volume still holds a whole trunk or head) while tumours are sized in millimetres
(``monai_mask.data.synthetic``).

The tissue map is an ``int8`` array of the ``TISSUE_*`` codes below; intensities are painted
from it by ``monai_mask.data.synthetic``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "Grid",
    "draw_grid",
    "random_rotation",
    "ct_anatomy",
    "mr_anatomy",
    "smooth_noise",
    "TISSUES",
    "CT_HU",
    "MR_INTENSITY",
]

# tissue codes shared by both modalities (a phantom uses a subset)
TISSUES = {
    "air": 0, "fat": 1, "soft_tissue": 2, "lung": 3, "liver": 4, "kidney": 5, "spleen": 6,
    "cortical_bone": 7, "trabecular_bone": 8, "scalp": 9, "skull": 10, "csf": 11,
    "grey_matter": 12, "white_matter": 13,
}
#: nominal Hounsfield units of the CT tissues (before texture, partial volume and noise)
CT_HU = {
    "air": -1000.0, "fat": -100.0, "soft_tissue": 40.0, "lung": -850.0, "liver": 60.0,
    "kidney": 30.0, "spleen": 50.0, "cortical_bone": 900.0, "trabecular_bone": 450.0,
}
#: nominal T1-weighted intensities (arbitrary units) of the MR tissues (before bias and noise)
MR_INTENSITY = {
    "air": 0.0, "scalp": 700.0, "skull": 60.0, "csf": 150.0, "grey_matter": 450.0,
    "white_matter": 750.0,
}


@dataclass(frozen=True)
class Grid:
    """An oblique, anisotropic voxel grid and the anatomical coordinates of its voxels.

    Attributes:
        affine: (4, 4) float64 nibabel (RAS) affine, rounded to float32 precision so it
            survives a NIfTI sform round trip exactly.
        spacing: (3,) voxel size in mm along the three voxel axes.
        index_to_anat: (3, 4) map from homogeneous voxel index to anatomical-frame mm.
        coords: three (X, Y, Z) float32 arrays, anatomical-frame mm of every voxel centre.
        half_extent: (3,) half the field of view (mm) along each voxel axis.
        axes_in_anat: (3, 3) unit vectors of the voxel axes in the anatomical frame (columns).
    """

    affine: np.ndarray
    spacing: np.ndarray
    index_to_anat: np.ndarray
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]
    half_extent: np.ndarray
    axes_in_anat: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.coords[0].shape  # type: ignore[return-value]


def _rodrigues(axis: np.ndarray, angle: float) -> np.ndarray:
    """(3, 3) rotation by ``angle`` radians about the unit vector ``axis``."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def random_rotation(rng: np.random.Generator, min_deg: float, max_deg: float) -> np.ndarray:
    """(3, 3) rotation about a random axis by an angle drawn uniformly in [min_deg, max_deg]."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    return _rodrigues(axis, np.deg2rad(rng.uniform(min_deg, max_deg)))


def draw_grid(rng: np.random.Generator, shape: tuple[int, int, int]) -> Grid:
    """Draw spacing, orientation and origin of one case and the anatomical voxel coordinates.

    Spacing: in-plane ``U(0.8, 1.2)`` mm (square pixels), slices ``U(1.5, 3.0)`` mm. The
    direction matrix is a 5-20 degree rotation about a random axis applied to either the RAS
    identity or the DICOM-style ``diag(-1, -1, 1)`` voxel order. The anatomical frame is the
    grid rotation times a residual 0-4 degree rotation (the patient is not perfectly aligned
    with the acquisition) and is centred on a world point drawn in ``U(-60, 60)`` mm, which is
    also where the centre of the grid lands (the origin offset).
    """
    s_in, s_z = rng.uniform(0.8, 1.2), rng.uniform(1.5, 3.0)
    spacing = np.array([s_in, s_in, s_z])
    flip = np.diag([1.0, 1.0, 1.0] if rng.random() < 0.5 else [-1.0, -1.0, 1.0])
    rot = random_rotation(rng, 5.0, 20.0)
    frame = rot @ random_rotation(rng, 0.0, 4.0)  # anatomical axes in world RAS (columns)
    centre = rng.uniform(-60.0, 60.0, size=3)
    direction = rot @ flip @ np.diag(spacing)
    origin = centre - direction @ ((np.asarray(shape, dtype=np.float64) - 1) / 2)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = direction, origin
    affine = affine.astype(np.float32).astype(np.float64)  # exact through a NIfTI sform
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    index_to_anat = frame.T @ np.concatenate([affine[:3, :3], (affine[:3, 3] - centre)[:, None]], 1)
    ijk = [np.arange(n, dtype=np.float64) for n in shape]
    coords = tuple(
        (
            index_to_anat[k, 0] * ijk[0][:, None, None]
            + index_to_anat[k, 1] * ijk[1][None, :, None]
            + index_to_anat[k, 2] * ijk[2][None, None, :]
            + index_to_anat[k, 3]
        ).astype(np.float32)
        for k in range(3)
    )
    return Grid(
        affine=affine,
        spacing=spacing,
        index_to_anat=index_to_anat,
        coords=coords,  # type: ignore[arg-type]
        half_extent=np.asarray(shape) * spacing / 2,
        axes_in_anat=index_to_anat[:, :3] / spacing,
    )


def fit_scale(grid: Grid, unit: np.ndarray, fixed: np.ndarray, axes: tuple[int, ...]) -> float:
    """Largest ``s`` such that the ellipsoid of semi-axes ``s * unit + fixed`` fits the grid.

    The ellipsoid (centred on the grid centre, axis-aligned in the anatomical frame) must lie
    two voxels inside the field of view along each voxel axis in ``axes``; its support along a
    unit direction ``n`` is ``sqrt(sum_j (a_j n_j)^2)``.
    """
    scale = np.inf
    for i in axes:
        n = grid.axes_in_anat[:, i]
        room = max(grid.half_extent[i] - 2 * grid.spacing[i], 1.0) ** 2
        room -= float(np.sum((fixed * n) ** 2))
        scale = min(scale, np.sqrt(max(room, 1.0) / float(np.sum((unit * n) ** 2))))
    return float(scale)


def ellipsoid(grid: Grid, centre, semi) -> np.ndarray:
    """Squared normalised radius ``sum_k ((x_k - c_k) / a_k)^2`` of every voxel (<= 1 inside)."""
    q = np.zeros(grid.shape, dtype=np.float32)
    for x, c, a in zip(grid.coords, centre, semi, strict=True):
        q += ((x - np.float32(c)) / np.float32(a)) ** 2
    return q


def smooth_noise(rng: np.random.Generator, grid: Grid, sigma_mm: float) -> np.ndarray:
    """Unit-variance Gaussian noise low-passed with a ``sigma_mm`` (world mm) Gaussian."""
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=sigma_mm / grid.spacing, mode="reflect")
    return noise / max(float(noise.std()), 1e-6)


def _paint_organs(grid: Grid, tissue: np.ndarray, b: np.ndarray, hz: float) -> None:
    """Liver, spleen, kidneys, then lungs (over the liver dome), anatomical mm (RAS)."""
    t = TISSUES
    organs = [
        ("liver", (0.35, 0.05, -0.25), (0.40, 0.52, 0.38)),
        ("spleen", (-0.50, -0.30, -0.15), (0.17, 0.26, 0.24)),
        ("kidney", (0.36, -0.42, -0.62), (0.13, 0.20, 0.26)),
        ("kidney", (-0.36, -0.42, -0.66), (0.13, 0.20, 0.26)),
        ("lung", (0.46, 0.02, 0.58), (0.33, 0.60, 0.62)),
        ("lung", (-0.46, 0.02, 0.58), (0.33, 0.58, 0.62)),
    ]
    scale = np.array([b[0], b[1], hz])
    for name, centre, semi in organs:
        inside = ellipsoid(grid, np.multiply(centre, scale), np.multiply(semi, scale)) <= 1
        tissue[inside & (tissue == t["soft_tissue"])] = t[name]
        if name == "lung":
            tissue[inside & (tissue == t["liver"])] = t[name]


def _paint_bones(rng: np.random.Generator, grid: Grid, tissue: np.ndarray, b: np.ndarray,
                 inner: np.ndarray, hz: float) -> None:
    """Spine (vertebral bodies with discs, posterior arch) and ribs (banded shell, z > -0.2)."""
    t = TISSUES
    x, y, z = grid.coords
    r = np.sqrt((x / (0.15 * b[1])) ** 2 + ((y + 0.5 * b[1]) / (0.15 * b[1])) ** 2)
    pitch = max(0.55 * b[1], 4.0 * grid.spacing[2])
    phase = rng.uniform(0, 2 * np.pi)
    disc = np.cos(2 * np.pi * z / pitch + phase) > 0.8
    tissue[(r <= 1) & ~disc] = t["trabecular_bone"]
    tissue[(r > 0.75) & (r <= 1) & ~disc] = t["cortical_bone"]
    arch = np.sqrt((x / (0.12 * b[1])) ** 2 + ((y + 0.76 * b[1]) / (0.1 * b[1])) ** 2)
    tissue[(arch <= 1) & (arch > 0.55)] = t["cortical_bone"]
    ribs = (inner > 0.82**2) & (inner <= 0.90**2) & (y > -0.5 * b[1]) & (z > -0.2 * hz)
    ribs &= np.cos(2 * np.pi * z / pitch + phase + np.pi) > 0.45
    tissue[ribs] = t["cortical_bone"]


def ct_anatomy(rng: np.random.Generator, grid: Grid) -> np.ndarray:
    """(X, Y, Z) int8 tissue map of a CT trunk (chest above, upper abdomen below).

    The body is an ellipsoid (left-right wider than antero-posterior, longer than the field of
    view superior-inferiorly so it is cut by the first and last slices) with a subcutaneous fat
    layer, two lungs, liver (patient's right), spleen (left), two kidneys (posterior), a spine
    and ribs.
    """
    hz = float(grid.half_extent[2])
    fixed = np.array([0.0, 0.0, 1.35 * hz])
    unit = np.array([1.0, rng.uniform(0.66, 0.78), 0.0])  # left-right : antero-posterior
    b = unit * fit_scale(grid, unit, fixed, axes=(0, 1)) + fixed
    tissue = np.zeros(grid.shape, dtype=np.int8)
    tissue[ellipsoid(grid, (0, 0, 0), b) <= 1] = TISSUES["fat"]
    fat = rng.uniform(0.10, 0.16) * b[1]
    inner = ellipsoid(grid, (0, 0, 0), b - fat)
    tissue[inner <= 1] = TISSUES["soft_tissue"]
    _paint_organs(grid, tissue, b, hz)
    _paint_bones(rng, grid, tissue, b, inner, hz)
    return tissue


def _folding(rng: np.random.Generator, grid: Grid, semi: np.ndarray, amp: float) -> np.ndarray:
    """Low-frequency radial perturbation (gyral folding) of an ellipsoid, ``|f| <= amp``."""
    x, y, z = (c / np.float32(a) for c, a in zip(grid.coords, semi, strict=True))
    rho = np.sqrt(x**2 + y**2 + z**2) + np.float32(1e-6)
    waves = np.zeros(grid.shape, dtype=np.float32)
    weights = rng.uniform(0.5, 1.0, size=4)
    for w in weights:
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        proj = (x * d[0] + y * d[1] + z * d[2]) / rho
        waves += np.float32(w) * np.cos(np.float32(rng.integers(3, 7) * np.pi) * proj
                                        + np.float32(rng.uniform(0, 2 * np.pi)))
    return waves * np.float32(amp / weights.sum())


def mr_anatomy(rng: np.random.Generator, grid: Grid) -> np.ndarray:
    """(X, Y, Z) int8 tissue map of a head: scalp, skull, CSF, grey and white matter.

    A closed ellipsoidal head fitted inside the field of view; the grey/white boundary is
    folded by a low-frequency perturbation; two lateral ventricles (CSF) and two deep grey
    nuclei sit near the centre.
    """
    unit = np.array([0.80, 1.0, 0.0]) * rng.uniform(0.95, 1.05, size=3)
    h = unit * fit_scale(grid, unit, np.zeros(3), axes=(0, 1))
    h[2] = min(rng.uniform(0.85, 1.0) * h[1], fit_scale(grid, np.array([0, 0, 1.0]), h, (2,)))
    t = TISSUES
    tissue = np.zeros(grid.shape, dtype=np.int8)
    layers = [("scalp", 0.0), ("skull", 0.07), ("csf", 0.13), ("grey_matter", 0.17)]
    for name, depth in layers:
        tissue[ellipsoid(grid, (0, 0, 0), h * (1 - depth)) <= 1] = t[name]
    wm_semi = h * 0.70
    wm = np.sqrt(ellipsoid(grid, (0, 0, 0), wm_semi)) <= 1 + _folding(rng, grid, wm_semi, 0.08)
    tissue[wm & (tissue == t["grey_matter"])] = t["white_matter"]
    for side in (-1, 1):
        nucleus = ellipsoid(grid, (side * 0.17 * h[0], -0.12 * h[1], -0.12 * h[2]), 0.1 * h)
        tissue[nucleus <= 1] = t["grey_matter"]
        ventricle = ellipsoid(grid, (side * 0.11 * h[0], 0.08 * h[1], 0.14 * h[2]),
                              (0.07 * h[0], 0.26 * h[1], 0.10 * h[2]))
        tissue[ventricle <= 1] = t["csf"]
    return tissue
