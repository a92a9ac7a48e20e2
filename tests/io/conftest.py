"""Fixtures that generate small DICOM series (pydicom), NIfTI, NRRD and MHA files in tmp_path.

Nothing binary is committed: every test image is written here. The DICOM series carry
fake identifiers (``PATIENT_NAME``, ``PATIENT_ID``) so privacy tests can search for them.
Voxel values encode their index, ``stored = i + X * j + X * Y * k``, so any transposition or
slice-order error changes the array.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

PATIENT_NAME = "Doe^Jane^SECRET"
PATIENT_ID = "PID-9999-SECRET"
ACCESSION = "ACC-SECRET-42"
BIRTH_DATE = "19700101"
SECRETS = ("SECRET", "Doe", "Jane", "PID-9999", "19700101")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class SeriesOnDisk:
    """A written series: folder, files in written order, expected HU (X, Y, Z), RAS affine."""

    folder: Path
    files: list[Path]
    uid: str
    hu: np.ndarray
    affine: np.ndarray


def stored_values(shape: tuple[int, int, int]) -> np.ndarray:
    """(X, Y, Z) int16 values encoding their index."""
    x, y, z = shape
    i, j, k = np.meshgrid(np.arange(x), np.arange(y), np.arange(z), indexing="ij")
    return (i + x * j + x * y * k).astype(np.int16)


def series_positions(
    n: int, origin=(-10.0, -20.0, 30.0), orientation=(1, 0, 0, 0, 1, 0), dz: float = 2.0
) -> np.ndarray:
    """(n, 3) LPS positions of a regular stack along the slice normal."""
    iop = np.asarray(orientation, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return np.asarray(origin, dtype=float) + np.arange(n)[:, None] * dz * normal


def write_dicom_series(
    folder: Path,
    *,
    shape: tuple[int, int, int] = (16, 12, 8),
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    orientation=(1, 0, 0, 0, 1, 0),
    positions: np.ndarray | None = None,
    keep: list[int] | None = None,
    series_uid: str | None = None,
    shuffle_seed: int | None = None,
    ext: str = ".dcm",
    slope: float = 1.0,
    intercept: float = -1024.0,
    prefix: str = "IM",
    rows_cols: tuple[int, int] | None = None,
) -> SeriesOnDisk:
    """Write an uncompressed CT series with pydicom.

    Args:
        shape: (X, Y, Z) = (Columns, Rows, slices).
        pixel_spacing: DICOM PixelSpacing (row spacing, column spacing).
        positions: (Z, 3) LPS ImagePositionPatient per slice (default: regular, 2 mm).
        keep: slice indices to write (e.g. drop one for a missing slice).
        shuffle_seed: permute file names and InstanceNumbers (order must come from positions).
        rows_cols: override Rows/Columns of the last slice (a mixed series).

    Returns:
        SeriesOnDisk with the HU array and RAS affine of the regular, complete series.
    """
    folder.mkdir(parents=True, exist_ok=True)
    x, y, z = shape
    positions = series_positions(z, orientation=orientation) if positions is None else positions
    stored = stored_values(shape)
    keep = list(range(z)) if keep is None else keep
    order = np.random.default_rng(shuffle_seed).permutation(len(keep)) if shuffle_seed else None
    uid, study = series_uid or generate_uid(), generate_uid()
    frame = generate_uid()
    files = []
    for n, k in enumerate(keep):
        number = int(order[n]) if order is not None else n
        path = folder / f"{prefix}{number:04d}{ext}"
        pixels = stored[:, :, k].T  # (rows, cols) = (y, x)
        if rows_cols is not None and n == len(keep) - 1:
            pixels = np.zeros(rows_cols, dtype=np.int16)
        ds = _slice_dataset(path, uid, study, frame, pixels, number + 1)
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in positions[k]]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        files.append(path)
    hu = stored.astype(np.float64) * slope + intercept
    return SeriesOnDisk(
        folder, files, uid, hu, _expected_affine(positions, orientation, pixel_spacing)
    )


def _slice_dataset(path, uid, study, frame, pixels: np.ndarray, number: int) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.PatientBirthDate, ds.AccessionNumber = BIRTH_DATE, ACCESSION
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", uid, study
    ds.FrameOfReferenceUID, ds.SeriesNumber, ds.InstanceNumber = frame, 1, number
    ds.SliceThickness = 5.0  # deliberately not the spacing between slices
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.int16).tobytes()
    return ds


def _expected_affine(positions, orientation, pixel_spacing) -> np.ndarray:
    iop = np.asarray(orientation, dtype=float)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * pixel_spacing[1]
    lps[:3, 1] = iop[3:] * pixel_spacing[0]
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    lps[:3, 3] = positions[0]
    return LPS_TO_RAS @ lps


def rotated_affine(spacing=(0.9, 1.1, 2.5), angle: float = 0.3, origin=(12.0, -7.5, 40.0)):
    """(4, 4) RAS affine with a rotation about z and anisotropic spacing."""
    c, s = np.cos(angle), np.sin(angle)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def write_itk(path: Path, array: np.ndarray, affine_ras: np.ndarray) -> Path:
    """Write (X, Y, Z) ``array`` with a RAS affine through SimpleITK (NRRD, MHA, ...)."""
    lps = LPS_TO_RAS @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def ct_series(tmp_path: Path) -> SeriesOnDisk:
    """A regular 16x12x8 CT series, files in spatial order."""
    return write_dicom_series(tmp_path / "ct")


@pytest.fixture
def shuffled_series(tmp_path: Path) -> SeriesOnDisk:
    """The same geometry, file names and InstanceNumbers shuffled."""
    return write_dicom_series(tmp_path / "shuffled", shuffle_seed=7)


@pytest.fixture
def volume_data() -> tuple[np.ndarray, np.ndarray]:
    """A (10, 9, 7) float32 array and a rotated RAS affine."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(10, 9, 7)).astype(np.float32), rotated_affine()
