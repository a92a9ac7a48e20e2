"""Synthetic CT / MR tumour phantoms with labels, world-space boxes and a decathlon datalist.

Each case is an anatomical phantom (``monai_mask.data.phantoms``: a Hounsfield-calibrated CT
trunk or a T1-like MR head) on an oblique, anisotropic voxel grid, with 0-3 irregular tumours
of 3-30 mm nominal diameter painted hyper- or hypo-intense relative to the tissue hosting them.
Everything is evaluated at the world position of each voxel centre, so the phantom is
physically consistent under its affine, and tumour sizes are millimetres whatever the spacing.

Boxes follow ``monai_mask.data.boxes``: ``cccwhd`` (centre x, y, z then size along x, y, z),
axis-aligned in world **LPS** millimetres (x_LPS = -x_RAS, y_LPS = -y_RAS), computed as the
bounding box of the lesion's voxel centres in world LPS expanded on each side by half the
voxel's extent along that world axis (``0.5 * sum_j |A[i, j]|`` for the 3x3 direction-spacing
matrix ``A``).

Determinism: a case depends only on ``(seed, modality, shape, n_tumours)`` through
``numpy.random.default_rng(seed)``; ``write_dataset`` derives the seed of case ``i`` from
``numpy.random.SeedSequence(seed).spawn(n)[i]``.

Example::

    case = generate_case(0, "ct")
    path = write_dataset("sample_data/ct", n=8, seed=0, modality="ct")
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from monai.utils import look_up_option
from scipy import ndimage

from monai_mask.data.boxes import RAS_TO_LPS, voxel_to_lps
from monai_mask.data.phantoms import (
    CT_HU,
    MR_INTENSITY,
    TISSUES,
    Grid,
    ct_anatomy,
    draw_grid,
    mr_anatomy,
    random_rotation,
    smooth_noise,
)
from monai_mask.errors import ConfigError

__all__ = [
    "SyntheticCase",
    "generate_case",
    "write_dataset",
    "case_seeds",
    "GENERATOR_VERSION",
    "CT_HU",
    "MR_INTENSITY",
]

GENERATOR_VERSION = "1.0"
MIN_SHAPE = 32
MAX_TUMOURS = 10
DIAMETER_MM = (3.0, 30.0)
# tumour host tissues and their drawing probabilities
_HOSTS = {
    "ct": {"liver": 0.35, "lung": 0.2, "kidney": 0.15, "spleen": 0.1, "soft_tissue": 0.2},
    "mr": {"white_matter": 0.65, "grey_matter": 0.35},
}
_BOUNDARY_PROB = 0.35  # chance that a tumour is placed touching its host's boundary
_STRUCT26 = ndimage.generate_binary_structure(3, 3)


@dataclass
class SyntheticCase:
    """One phantom.

    Attributes:
        image: (X, Y, Z) int16 Hounsfield units for CT, float32 arbitrary units for MR.
        label: (X, Y, Z) uint8, 0 = background, 1 = tumour (every tumour).
        affine: (4, 4) float64 nibabel (RAS) affine, exactly representable in a NIfTI sform.
        modality: ``"CT"`` or ``"MR"``.
        boxes: (N, 6) float64 ``cccwhd`` in world LPS mm, one per tumour.
        centroids: (N, 3) float64 mean of each tumour's voxel centres in world LPS mm.
        diameters_mm: (N,) float64 nominal tumour diameters (the shape fits in this sphere).
        hosts: N names of the tissue each tumour was placed in (keys of ``CT_HU`` or
            ``MR_INTENSITY``).
        lesion_values: (N,) float64 nominal tumour intensity (HU for CT) before texture,
            partial volume, bias and noise.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    modality: str
    boxes: np.ndarray
    centroids: np.ndarray
    diameters_mm: np.ndarray
    hosts: list[str] = field(default_factory=list)
    lesion_values: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def spacing(self) -> np.ndarray:
        """(3,) voxel size in mm along the three voxel axes."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def _check_modality(modality: str) -> str:
    try:
        return look_up_option(str(modality).lower(), ("ct", "mr"))
    except ValueError as err:
        raise ConfigError(f"unknown modality {modality!r}; expected 'ct' or 'mr'") from err


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"shape must be three integers, got {shape!r}") from err
    if len(out) != 3 or min(out) < MIN_SHAPE:
        raise ConfigError(f"shape must be three integers >= {MIN_SHAPE}, got {shape!r}")
    return out  # type: ignore[return-value]


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _physical_distance(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) of each voxel inside ``mask`` to the nearest voxel outside it or the FOV."""
    padded = np.pad(mask, 1, constant_values=False)
    return ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]


@dataclass
class _Placer:
    """Chooses tumour centres: inside a host tissue, inside the body, apart from each other."""

    rng: np.random.Generator
    grid: Grid
    tissue: np.ndarray
    body_dist: np.ndarray
    modality: str
    placed: list[tuple[np.ndarray, float]] = field(default_factory=list)
    _host_dist: dict[str, np.ndarray] = field(default_factory=dict)

    def host_dist(self, host: str) -> np.ndarray:
        if host not in self._host_dist:
            mask = self.tissue == TISSUES[host]
            self._host_dist[host] = _physical_distance(mask, self.grid.spacing)
        return self._host_dist[host]

    def candidates(self, host: str, radius: float, where: str) -> np.ndarray:
        """Flat voxel indices where a tumour of outer ``radius`` (mm) may be centred.

        ``where``: ``"boundary"`` (the tumour crosses the host's boundary), ``"interior"``
        (mostly inside the host) or ``"any"`` host voxel. Always inside the body and the
        field of view, and more than 1.5 voxel diagonals away from the other tumours (so no
        two tumours touch, even diagonally, after the sub-voxel jitter of their centres).
        """
        diag = float(np.linalg.norm(self.grid.spacing))
        dist = self.host_dist(host)
        ok = (dist > 0) & (self.body_dist > radius + 0.5 * diag)
        if where == "boundary":
            ok &= dist <= max(0.6 * radius, float(self.grid.spacing.max()))
        elif where == "interior":
            ok &= dist >= 0.5 * radius
        flat = np.flatnonzero(ok)
        if self.placed and flat.size:
            pos = np.stack([c.reshape(-1)[flat] for c in self.grid.coords], axis=1)
            for centre, r in self.placed:
                keep = np.linalg.norm(pos - centre, axis=1) > radius + r + 1.5 * diag
                flat, pos = flat[keep], pos[keep]
        return flat

    def place(self, host: str, diameter: float) -> tuple[str, float, tuple[int, ...]]:
        """(host, diameter, voxel index) of a new tumour; shrinks it or changes host to fit."""
        modes = ("boundary",) if self.rng.random() < _BOUNDARY_PROB else ()
        modes += ("interior", "any")
        hosts = [host] + [h for h in _HOSTS[self.modality] if h != host]
        for candidate_host in hosts:
            d = diameter
            while True:
                for where in modes:
                    flat = self.candidates(candidate_host, d / 2, where)
                    if flat.size:
                        index = flat[self.rng.integers(flat.size)]
                        return candidate_host, d, np.unravel_index(index, self.tissue.shape)
                if d <= DIAMETER_MM[0]:
                    break
                d = max(DIAMETER_MM[0], 0.75 * d)
        raise ConfigError(
            f"shape {self.tissue.shape} is too small to place {len(self.placed) + 1} tumours"
        )


def _tumour_mask(
    rng: np.random.Generator, grid: Grid, centre: np.ndarray, diameter: float
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Irregular tumour inside a ``diameter`` sphere: a perturbed, randomly rotated ellipsoid.

    The ellipsoid (axis ratios 0.7-1) is scaled so its radius ``rho`` satisfies
    ``rho <= 1 + f(u)`` with ``f`` a sum of low-frequency cosines of the direction ``u`` and
    ``|f| <= amp`` (amp grows with size up to 0.22, small tumours stay round), so the shape is
    star-shaped and never leaves the nominal sphere. Returns the crop and its boolean mask.
    """
    amp = 0.22 * min(1.0, diameter / 12.0)
    ratios = rng.uniform(0.7, 1.0, size=3)
    semi = (diameter / 2) / (1 + amp) * ratios / ratios.max()
    rot = random_rotation(rng, 0.0, 180.0)
    inv = np.linalg.inv(grid.index_to_anat[:, :3])
    centre_idx = inv @ (centre - grid.index_to_anat[:, 3])
    half = diameter / 2 * np.linalg.norm(inv, axis=1) + 1
    lo = np.clip(np.floor(centre_idx - half).astype(int), 0, None)
    hi = np.minimum(np.ceil(centre_idx + half).astype(int) + 1, grid.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    rel = [c[crop] - np.float32(x) for c, x in zip(grid.coords, centre, strict=True)]
    q = [sum(np.float32(rot[k, j]) * rel[k] for k in range(3)) / np.float32(semi[j])
         for j in range(3)]
    rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2) + np.float32(1e-6)
    wave = np.zeros_like(rho)
    weights = rng.uniform(0.3, 1.0, size=3)
    for w in weights:
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        proj = (q[0] * d[0] + q[1] * d[1] + q[2] * d[2]) / rho
        wave += np.float32(w) * np.cos(np.float32(rng.integers(1, 4) * np.pi) * proj
                                       + np.float32(rng.uniform(0, 2 * np.pi)))
    mask = rho <= 1 + wave * np.float32(amp / weights.sum())
    comps, n = ndimage.label(mask, structure=_STRUCT26)
    if n > 1:  # keep one piece: the largest component
        mask = comps == (np.argmax(np.bincount(comps.ravel())[1:]) + 1)
    if not mask.any():  # smaller than the sampling: keep the voxel holding the centre
        mask[tuple(np.clip(np.round(centre_idx).astype(int) - lo, 0, np.array(mask.shape) - 1))] = 1
    return crop, mask


def _lesion_value(rng: np.random.Generator, modality: str, host: str) -> float:
    """Nominal tumour intensity, hyper- or hypo-intense relative to the host tissue."""
    hyper = rng.random() < 0.5
    if modality == "ct":
        if host == "lung":  # solid nodule in aerated lung
            return float(rng.uniform(-10.0, 60.0))
        delta = rng.uniform(30.0, 90.0) if hyper else -rng.uniform(25.0, 50.0)
        return CT_HU[host] + float(delta)
    factor = rng.uniform(1.3, 1.7) if hyper else rng.uniform(0.35, 0.7)
    return MR_INTENSITY[host] * float(factor)


def _add_tumours(
    rng: np.random.Generator, grid: Grid, tissue: np.ndarray, modality: str, n: int
) -> tuple[list[tuple[tuple[slice, ...], np.ndarray]], list[str], np.ndarray, np.ndarray]:
    """Place ``n`` tumours: their (crop, mask) pairs, hosts, diameters and nominal values."""
    body_dist = _physical_distance(tissue != TISSUES["air"], grid.spacing)
    placer = _Placer(rng, grid, tissue, body_dist, modality)
    names, probs = list(_HOSTS[modality]), np.array(list(_HOSTS[modality].values()))
    lesions, hosts, diameters, values = [], [], [], []
    for _ in range(n):
        host = names[rng.choice(len(names), p=probs / probs.sum())]
        wanted = float(np.exp(rng.uniform(*np.log(DIAMETER_MM))))  # log-uniform 3-30 mm
        # at most 2x the host's inscribed radius, so that small phantoms keep room for all
        wanted = max(DIAMETER_MM[0], min(wanted, 2.0 * float(placer.host_dist(host).max())))
        host, diameter, index = placer.place(host, wanted)
        jitter = rng.uniform(-0.5, 0.5, size=3)
        centre = grid.index_to_anat @ np.append(np.asarray(index) + jitter, 1.0)
        lesions.append(_tumour_mask(rng, grid, centre, diameter))
        placer.placed.append((centre, diameter / 2))
        hosts.append(host)
        diameters.append(diameter)
        values.append(_lesion_value(rng, modality, host))
    return lesions, hosts, np.asarray(diameters, dtype=np.float64), np.asarray(values)


def _boxes(
    lesions: list[tuple[tuple[slice, ...], np.ndarray]], affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``cccwhd`` world-LPS boxes (N, 6) and centroids (N, 3) of the lesions' voxels."""
    half = 0.5 * np.abs((RAS_TO_LPS @ affine)[:3, :3]).sum(axis=1)
    boxes, centroids = np.zeros((len(lesions), 6)), np.zeros((len(lesions), 3))
    for i, (crop, mask) in enumerate(lesions):
        ijk = np.argwhere(mask) + np.array([s.start for s in crop])
        world = voxel_to_lps(ijk, affine)
        lo, hi = world.min(axis=0) - half, world.max(axis=0) + half
        boxes[i] = np.concatenate([(lo + hi) / 2, hi - lo])
        centroids[i] = world.mean(axis=0)
    return boxes, centroids


def _lookup(tissue: np.ndarray, table: dict[str, float]) -> np.ndarray:
    lut = np.zeros(max(TISSUES.values()) + 1, dtype=np.float32)
    for name, value in table.items():
        lut[TISSUES[name]] = value
    return lut[tissue]


def _partial_volume(image: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Slight blur, a 0.5 mm Gaussian in world units (sigma in voxels = 0.5 / spacing)."""
    return ndimage.gaussian_filter(image, sigma=0.5 / spacing, mode="nearest")


def _ct_image(rng, grid, tissue, lesions, values) -> np.ndarray:
    """int16 HU: tissue values, lung/bone/organ texture, tumours, partial volume, noise."""
    hu = _lookup(tissue, CT_HU)
    fine, coarse = smooth_noise(rng, grid, 1.2), smooth_noise(rng, grid, 3.0)
    hu += np.where(tissue == TISSUES["lung"], 35.0 * fine, 0.0).astype(np.float32)
    hu += np.where(tissue == TISSUES["trabecular_bone"], 60.0 * fine, 0.0).astype(np.float32)
    soft = (tissue != TISSUES["air"]) & (tissue != TISSUES["lung"])
    hu += np.where(soft, 6.0 * coarse, 0.0).astype(np.float32)
    for (crop, mask), value in zip(lesions, values, strict=True):
        hu[crop][mask] = value + 8.0 * coarse[crop][mask]
    hu = _partial_volume(hu, grid.spacing)
    hu += np.float32(rng.uniform(10.0, 20.0)) * rng.standard_normal(hu.shape, dtype=np.float32)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def _bias_field(rng: np.random.Generator, grid: Grid) -> np.ndarray:
    """Smooth multiplicative field ``exp(quadratic polynomial)``, about +-25 % over the FOV."""
    x, y, z = (c / np.float32(grid.half_extent.max()) for c in grid.coords)
    basis = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    coeffs = rng.normal(0.0, 0.12, size=len(basis))
    log_field = sum(np.float32(c) * b for c, b in zip(coeffs, basis, strict=True))
    return np.exp(log_field - log_field.mean(dtype=np.float64)).astype(np.float32)


def _mr_image(rng, grid, tissue, lesions, values) -> np.ndarray:
    """float32 T1-like image: tissue values, texture, tumours, partial volume, bias, Rician."""
    img = _lookup(tissue, MR_INTENSITY)
    texture = smooth_noise(rng, grid, 2.0)
    img *= 1 + np.float32(0.03) * texture
    for (crop, mask), value in zip(lesions, values, strict=True):
        img[crop][mask] = value * (1 + 0.05 * texture[crop][mask])
    img = _partial_volume(img, grid.spacing) * _bias_field(rng, grid)
    sigma = np.float32(rng.uniform(0.02, 0.04) * MR_INTENSITY["white_matter"])
    real = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag).astype(np.float32)  # Rician magnitude


def generate_case(
    seed: int,
    modality: Literal["ct", "mr"] = "ct",
    shape: tuple[int, int, int] = (64, 64, 48),
    n_tumours: int | None = None,
) -> SyntheticCase:
    """Generate one phantom with its tumour label, boxes and centroids.

    Args:
        seed: seed of ``numpy.random.default_rng``; the same ``(seed, modality, shape,
            n_tumours)`` gives byte-identical arrays.
        modality: ``"ct"`` (int16 HU trunk) or ``"mr"`` (float32 T1-like head).
        shape: (X, Y, Z) voxels, each at least ``MIN_SHAPE`` (32). Spacing is drawn per case
            (0.8-1.2 mm in-plane, 1.5-3 mm slices), so the field of view follows the shape.
        n_tumours: number of tumours (0-``MAX_TUMOURS``); default: drawn uniformly in 0-3.

    Returns:
        A ``SyntheticCase``; boxes are ``cccwhd`` world LPS mm (bounding box of the tumour's
        voxel centres expanded by half a voxel's world extent), one row per tumour.

    Raises:
        ConfigError: unknown modality, negative seed, bad shape, bad ``n_tumours``, or
            tumours that do not fit the field of view.
    """
    modality = _check_modality(modality)
    shape = _check_shape(shape)
    if n_tumours is not None and not 0 <= int(n_tumours) <= MAX_TUMOURS:
        raise ConfigError(f"n_tumours must be in 0..{MAX_TUMOURS}, got {n_tumours!r}")
    rng = np.random.default_rng(_check_seed(seed))
    grid = draw_grid(rng, shape)
    tissue = ct_anatomy(rng, grid) if modality == "ct" else mr_anatomy(rng, grid)
    n = int(rng.integers(0, 4)) if n_tumours is None else int(n_tumours)
    lesions, hosts, diameters, values = _add_tumours(rng, grid, tissue, modality, n)
    make_image = _ct_image if modality == "ct" else _mr_image
    image = make_image(rng, grid, tissue, lesions, values)
    label = np.zeros(shape, dtype=np.uint8)
    for crop, mask in lesions:
        label[crop][mask] = 1
    boxes, centroids = _boxes(lesions, grid.affine)
    return SyntheticCase(
        image=image, label=label, affine=grid.affine, modality=modality.upper(), boxes=boxes,
        centroids=centroids, diameters_mm=diameters, hosts=hosts, lesion_values=values,
    )


def case_seeds(seed: int, n: int) -> list[int]:
    """Seeds of the ``n`` cases of a dataset: ``SeedSequence(seed).spawn(n)``, one uint32 each."""
    return [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(n)]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name in the same folder, then ``os.replace`` it into place."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{''.join(path.suffixes)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    _atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


def write_dataset(
    out_dir: str | Path,
    n: int = 8,
    seed: int = 0,
    modality: Literal["ct", "mr"] = "ct",
    shape: tuple[int, int, int] = (64, 64, 48),
    progress: bool = False,
) -> Path:
    """Write ``n`` phantoms as NIfTI and a decathlon-style ``dataset.json``.

    Layout: ``out_dir/imagesTr/case_000.nii.gz``, ``out_dir/labelsTr/case_000.nii.gz``,
    ``out_dir/dataset.json`` (paths relative to ``out_dir``; per case ``box`` in ``cccwhd``
    world LPS mm and ``box_label`` 0 = tumour, as MONAI detection expects). Case ``i`` is
    ``generate_case(case_seeds(seed, n)[i], modality, shape)``. Every file is written to a
    temporary name and renamed. NIfTI sform and qform are the case affine (codes 1).

    Returns:
        The path of ``dataset.json``.

    Raises:
        ConfigError: ``n < 1``, negative seed, bad shape or unknown modality.
    """
    from tqdm import tqdm

    modality, shape, seed = _check_modality(modality), _check_shape(shape), _check_seed(seed)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n must be an integer >= 1, got {n!r}")
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    seeds = case_seeds(seed, int(n))
    training = []
    for i in tqdm(range(int(n)), desc="phantoms", disable=not progress):
        case = generate_case(seeds[i], modality, shape)
        name = f"case_{i:03d}"
        _save_nifti(case.image, case.affine, out / "imagesTr" / f"{name}.nii.gz")
        _save_nifti(case.label, case.affine, out / "labelsTr" / f"{name}.nii.gz")
        training.append({
            "image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz",
            "box": case.boxes.tolist(), "box_label": [0] * len(case.boxes), "patient_id": name,
        })
    path = out / "dataset.json"
    text = json.dumps(_dataset_json(training, seed, modality, shape, seeds), indent=2)
    _atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))
    return path


def _dataset_json(training: list[dict], seed: int, modality: str, shape, seeds) -> dict:
    name = {"ct": "CT", "mr": "MRI"}[modality]
    return {
        "name": f"monai-mask synthetic {name} tumour phantoms",
        "description": (
            f"Synthetic {name} phantoms with 0-3 tumours generated by monai_mask.data.synthetic "
            f"version {GENERATOR_VERSION}: seed={seed}, modality={modality}, "
            f"shape={list(shape)}, n={len(training)}; case i uses seed "
            f"SeedSequence({seed}).spawn(n)[i].generate_state(1)[0]."
        ),
        "reference": "monai-mask (generated, no patient data)",
        "licence": "CC0-1.0",
        "tensorImageSize": "3D",
        "modality": {"0": name},
        "labels": {"0": "background", "1": "tumour"},
        "numTraining": len(training),
        "box_mode": "cccwhd",
        "box_space": "LPS",
        "box_units": "mm",
        "generator": {
            "module": "monai_mask.data.synthetic", "version": GENERATOR_VERSION, "seed": seed,
            "modality": modality, "shape": list(shape), "case_seeds": seeds,
        },
        "training": training,
    }
