"""Generators of bad inputs for the reliability corpus (nothing binary is committed).

Each generator writes one bad case into a folder of images (and, for label cases, a folder of
labels) next to good cases, and returns the name of the file (or series folder) the error
must name. Volumes are tiny (24^3) so a whole corpus run costs seconds.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.io.conftest import series_positions, write_dicom_series

SHAPE = (24, 24, 20)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def ct_array(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """A small CT-like volume in HU: air around a soft-tissue ball with a bright spot."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape[:3]], indexing="ij"))
    body = (grid**2).sum(0) < 0.7
    image = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, shape[:3])
    image[shape[0] // 2 - 2:shape[0] // 2 + 2, shape[1] // 2 - 2:shape[1] // 2 + 2, 8:12] = 120
    return image.astype(np.float32)


def ct_label(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """The bright spot of :func:`ct_array` as label 1 (uint8)."""
    label = np.zeros(shape[:3], np.uint8)
    label[shape[0] // 2 - 2:shape[0] // 2 + 2, shape[1] // 2 - 2:shape[1] // 2 + 2, 8:12] = 1
    return label


def save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """Write a NIfTI (qform and sform set) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, 1)
    image.set_qform(affine, 1)
    nib.save(image, path)
    return path


def good_cases(images: Path, labels: Path | None = None, n: int = 2) -> list[str]:
    """``n`` valid CT cases ``good_00.nii.gz``... (with labels when ``labels`` is given)."""
    names = []
    for i in range(n):
        save(images / f"good_{i:02d}.nii.gz", ct_array(i))
        if labels is not None:
            save(labels / f"good_{i:02d}.nii.gz", ct_label())
        names.append(f"good_{i:02d}")
    return names


def _bad(images: Path, array: np.ndarray, affine: np.ndarray = AFFINE,
         name: str = "bad_case.nii.gz") -> str:
    save(images / name, array, affine)
    return name


# ------------------------------------------------------------------ image files


def truncated_nifti(images: Path, labels: Path) -> str:
    path = save(images / "bad_case.nii.gz", ct_array(7))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.name


def corrupt_nifti(images: Path, labels: Path) -> str:
    (images / "bad_case.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 40))
    return "bad_case.nii.gz"


def zero_byte_file(images: Path, labels: Path) -> str:
    (images / "bad_case.nii").write_bytes(b"")
    return "bad_case.nii"


def corrupt_nrrd(images: Path, labels: Path) -> str:
    (images / "bad_case.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\n"
                                           b"sizes: 24 24 20\nencoding: raw\n\n" + b"\0" * 100)
    return "bad_case.nrrd"


def image_2d(images: Path, labels: Path) -> str:
    return _bad(images, ct_array(7)[:, :, 5])


def image_4d(images: Path, labels: Path) -> str:
    return _bad(images, np.stack([ct_array(7), ct_array(8)], axis=-1))


def nan_voxels(images: Path, labels: Path) -> str:
    array = ct_array(7)
    array[3, 4, 5] = np.nan
    return _bad(images, array)


def inf_voxels(images: Path, labels: Path) -> str:
    array = ct_array(7)
    array[3, 4, 5] = np.inf
    return _bad(images, array)


def zero_size_volume(images: Path, labels: Path) -> str:
    return _bad(images, np.zeros((24, 24, 0), np.float32))


def good_volume(images: Path, labels: Path) -> str:
    """A valid CT volume (for limits such as ``--max-voxels``)."""
    return _bad(images, ct_array(7), name="big_case.nii.gz")


def constant_volume(images: Path, labels: Path) -> str:
    return _bad(images, np.full(SHAPE, -1000.0, np.float32))


def mr_volume(images: Path, labels: Path) -> str:
    """An MR-like volume (non-negative arbitrary units) among CT cases."""
    array = ct_array(7)
    return _bad(images, (array + 1000.0) * 0.8)


def _spacing(value: float) -> Callable[[Path, Path], str]:
    def make(images: Path, labels: Path) -> str:
        image = nib.Nifti1Image(ct_array(7), None)
        affine = np.diag([1.5, value, 2.0, 1.0])
        image.header.set_sform(affine, 1)  # sform only: a zero column has no qform
        image.header.set_qform(None, 0)
        image.header["pixdim"][1:4] = [1.5, value, 2.0]
        nib.save(image, images / "bad_case.nii.gz")
        return "bad_case.nii.gz"

    make.__name__ = f"spacing_{value:g}"
    return make


spacing_zero = _spacing(0.0)
spacing_huge = _spacing(1e4)


def spacing_negative(images: Path, labels: Path) -> str:
    """A NIfTI without sform/qform whose header voxel size (pixdim) is -1.5 mm."""
    path = images / "bad_case.nii"
    image = nib.Nifti1Image(ct_array(7), None)
    image.header.set_sform(None, 0)
    image.header.set_qform(None, 0)
    nib.save(image, path)
    data = bytearray(path.read_bytes())
    data[84:88] = struct.pack("<f", -1.5)  # pixdim[2]; nibabel would fix it on save
    path.write_bytes(bytes(data))
    return path.name


# ------------------------------------------------------------------ labels


def _label(labels: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> str:
    save(labels / "bad_case.nii.gz", array, affine)
    return "bad_case.nii.gz"


def label_shape_mismatch(images: Path, labels: Path) -> str:
    save(images / "bad_case.nii.gz", ct_array(7))
    return _label(labels, ct_label((24, 24, 18)))


def label_affine_mismatch(images: Path, labels: Path) -> str:
    save(images / "bad_case.nii.gz", ct_array(7))
    shifted = AFFINE.copy()
    shifted[:3, 3] = [5.0, 0.0, 0.0]
    return _label(labels, ct_label(), shifted)


def label_non_integer(images: Path, labels: Path) -> str:
    save(images / "bad_case.nii.gz", ct_array(7))
    return _label(labels, ct_label().astype(np.float32) * 0.5)


def label_negative(images: Path, labels: Path) -> str:
    save(images / "bad_case.nii.gz", ct_array(7))
    return _label(labels, ct_label().astype(np.int16) * -1)


# ------------------------------------------------------------------ DICOM series


def dicom_missing_slice(images: Path, labels: Path) -> str:
    write_dicom_series(images / "bad_series", shape=(16, 12, 8), keep=[0, 1, 2, 4, 5, 6, 7])
    return "bad_series"


def dicom_mixed_sizes(images: Path, labels: Path) -> str:
    write_dicom_series(images / "bad_series", shape=(16, 12, 8), rows_cols=(10, 10))
    return "bad_series"


def dicom_truncated_slice(images: Path, labels: Path) -> str:
    series = write_dicom_series(images / "bad_series", shape=(16, 12, 8))
    data = series.files[3].read_bytes()
    series.files[3].write_bytes(data[:-200])
    return "bad_series"


def dicom_duplicate_positions(images: Path, labels: Path) -> str:
    positions = series_positions(8)
    positions[5] = positions[4]
    write_dicom_series(images / "bad_series", shape=(16, 12, 8), positions=positions)
    return "bad_series"

