"""Series-aware reading of NIfTI, NRRD, MHA/MHD and DICOM into one ``Volume`` structure.

Every image comes back in the nibabel/MONAI convention: a RAS affine mapping voxel index
(i, j, k) to world millimetres, and an array indexed (i, j, k) = (x, y, z) voxel axes.
ITK-family formats (SimpleITK, NRRD, MHA, DICOM) are LPS and are converted with
``affine_ras = diag(-1, -1, 1, 1) @ affine_lps``; SimpleITK arrays (z, y, x) are transposed.
DICOM pixels are decoded by SimpleITK/GDCM (compressed transfer syntaxes included) in the
slice order and with the geometry computed by ``monai_mask.io.dicom`` from the headers.
"""

from __future__ import annotations

import os
import warnings as warnings_module
import zlib
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError
from nibabel.imageglobals import LoggingOutputSuppressor

from monai_mask.errors import InputError
from monai_mask.io.dicom import (
    DICOM_SUFFIXES,
    LPS_TO_RAS,
    DicomSeries,
    group_dicom_files,
    is_dicom_file,
    scan_dicom,
)

__all__ = [
    "Volume",
    "ImageKind",
    "image_kind",
    "case_name",
    "read_image",
    "read_dicom_series",
    "save_nifti",
    "check_label",
    "check_geometry",
    "read_shape",
]

ImageKind = Literal["nifti", "nrrd", "mha", "dicom"]
#: file suffixes by kind, longest first so ".nii.gz" wins over ".gz".
IMAGE_SUFFIXES: dict[str, ImageKind] = {
    ".seg.nrrd": "nrrd",
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "mha",
    ".mhd": "mha",
    **{s: "dicom" for s in DICOM_SUFFIXES},
}
_NIBABEL_ERRORS = (ImageFileError, OSError, EOFError, ValueError, zlib.error, MemoryError)
#: voxel sizes (mm) outside this range are taken as a broken header, not as a scan.
SPACING_RANGE_MM = (1e-3, 100.0)


@dataclass
class Volume:
    """A 3D image in RAS world coordinates.

    Attributes:
        array: (X, Y, Z) numeric voxels indexed (i, j, k); DICOM rescale applied (CT in HU).
        affine: (4, 4) float64 RAS affine, voxel index -> world mm.
        source: the path given (file or folder); never built from patient data.
        modality: "CT", "MR", ... from DICOM; None when unknown.
        series_uid: DICOM SeriesInstanceUID (not a patient identifier); None otherwise.
        patient_key: pseudonym of the patient (``monai_mask.privacy``), never the raw ID.
        warnings: geometry notes (gantry tilt, non-uniform spacing, ...), no PHI.
    """

    array: np.ndarray
    affine: np.ndarray
    source: str
    modality: str | None = None
    series_uid: str | None = None
    patient_key: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm: column norms of ``affine[:3, :3]``."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (X, Y, Z)."""
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]


def image_kind(path: str | PathLike) -> ImageKind | None:
    """Kind of an image file from its name ("nifti", "nrrd", "mha", "dicom"), else None.

    Extension-less DICOM files are not recognised here; see ``is_dicom_file``.
    """
    name = Path(path).name.lower()
    for suffix, kind in IMAGE_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return kind
    return None


def case_name(path: str | PathLike) -> str:
    """File name without its image extension: ``"case_000.nii.gz"`` -> ``"case_000"``."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def read_image(
    path: str | PathLike,
    *,
    expect_3d: bool = True,
    check_finite: bool = True,
    allow_irregular: bool = False,
) -> Volume:
    """Read an image file or a folder holding one DICOM series.

    Args:
        path: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MHA/MHD or DICOM file, or a folder
            of DICOM files (with or without extension, searched recursively).
        expect_3d: reject 2D and 4D images (a trailing singleton 4th dimension is squeezed).
            When False, 2D images come back as (X, Y, 1) and 4D ones as (X, Y, Z, T).
        check_finite: reject images with NaN or infinite voxels.
        allow_irregular: read DICOM series with gantry tilt, missing slices, non-uniform
            spacing or duplicate positions (kept as ``Volume.warnings``) instead of failing.

    Returns:
        The Volume (RAS affine, (X, Y, Z) array).

    Raises:
        InputError: missing, unreadable or corrupt input, not an image, wrong
            dimensionality, non-finite voxels, a folder with zero or several DICOM series.
    """
    path = Path(path)
    if path.is_dir():
        series = scan_dicom(path)
        if len(series) > 1:
            raise InputError(
                path, f"{len(series)} DICOM series in this folder; choose one (discover_images)"
            )
        return read_dicom_series(
            series[0], expect_3d=expect_3d, check_finite=check_finite,
            allow_irregular=allow_irregular, source=path,
        )  # fmt: skip
    if not path.is_file():
        raise InputError(path, "no such file or folder")
    kind = image_kind(path) or ("dicom" if is_dicom_file(path) else None)
    if kind == "dicom":
        series = group_dicom_files([path])
        if not series:
            raise InputError(path, "DICOM file without an image (e.g. SR, SEG or RTSTRUCT)")
        return read_dicom_series(
            series[0], expect_3d=expect_3d, check_finite=check_finite,
            allow_irregular=allow_irregular, source=path,
        )  # fmt: skip
    if kind is None:
        raise InputError(path, "not an image: unknown file type")
    array, affine, warnings = _read_nifti(path) if kind == "nifti" else _read_itk(path)
    array = _check_array(array, path, expect_3d=expect_3d, check_finite=check_finite)
    return Volume(array=array, affine=check_geometry(affine, path), source=str(path),
                  warnings=warnings)


def read_shape(path: str | PathLike) -> tuple[int, ...]:
    """Array shape of an image file or DICOM series folder from its header only (no pixels).

    Used to refuse volumes too large for the configured memory before reading them.

    Raises:
        InputError: missing or unreadable input.
    """
    path = Path(path)
    if path.is_dir():
        series = scan_dicom(path)
        return (series[0].cols, series[0].rows, len(series[0].unique_files()))
    kind = image_kind(path) or ("dicom" if path.is_file() and is_dicom_file(path) else None)
    if not path.is_file() or kind in (None, "dicom"):
        return read_image(path, check_finite=False).shape
    if kind == "nifti":
        try:
            return tuple(int(s) for s in nib.load(path).shape)
        except _NIBABEL_ERRORS as e:
            raise InputError(path, f"unreadable or corrupt NIfTI ({type(e).__name__})") from e
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(path, f"unreadable or corrupt image ({_first_line(e)})") from e
    return tuple(int(s) for s in reader.GetSize())


def read_dicom_series(
    series: DicomSeries,
    *,
    expect_3d: bool = True,
    check_finite: bool = True,
    allow_irregular: bool = False,
    source: str | PathLike | None = None,
) -> Volume:
    """Read the pixels of one DICOM series (any transfer syntax SimpleITK/GDCM decodes).

    Slices are read in ``series.files`` order (sorted along the slice normal); the affine is
    ``series.affine()``, built from ImageOrientationPatient/ImagePositionPatient. Rescale
    slope and intercept are applied (CT in HU).

    Args:
        series: from ``scan_dicom`` or ``discover_images``.
        expect_3d, check_finite: as in ``read_image``; a single slice is 2D.
        allow_irregular: read despite ``series.irregular`` problems; duplicated positions
            keep their first slice. Mixed series never read.
        source: path recorded in ``Volume.source`` (default: the series folder).

    Raises:
        InputError: mixed or irregular series, undecodable pixels, 2D, non-finite voxels.
    """
    where = Path(source) if source is not None else series.folder
    if series.errors:
        raise InputError(where, "; ".join(series.errors))
    if series.irregular and not allow_irregular:
        reason = "; ".join(series.irregular)
        raise InputError(where, f"irregular DICOM series: {reason} (allow_irregular=True to read)")
    files = series.unique_files()
    if expect_3d and len(files) < 2:
        raise InputError(where, "single DICOM slice (2D image); a 3D volume is needed")
    varying = bool(np.ptp(series.rescale, axis=0).max() > 0)
    array = _read_dicom_pixels(files, where, (series.cols, series.rows), as_float=varying)
    array = _check_array(array, where, expect_3d=expect_3d, check_finite=check_finite)
    return Volume(
        array=array, affine=check_geometry(series.affine(), where), source=str(where),
        modality=series.modality, series_uid=series.uid, patient_key=series.patient_key,
        warnings=list(series.warnings),
    )  # fmt: skip


def _read_dicom_pixels(
    files: list[Path], where: Path, size: tuple[int, int], *, as_float: bool = False
) -> np.ndarray:
    """(X, Y, Z) voxels of ordered single-frame DICOM files, rescaled, via SimpleITK/GDCM.

    GDCM picks the pixel type from the first file's rescale: ``as_float`` (slopes or
    intercepts that vary between slices) reads float32 so every slice keeps its own rescale.
    """
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    if as_float:
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise InputError(
            _first_bad_file(files) or where, f"cannot decode DICOM pixel data ({_first_line(e)})"
        ) from e
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    if array.shape != (*size, len(files)):
        raise InputError(where, f"decoded shape {array.shape} != header {(*size, len(files))}")
    return array


def _first_bad_file(files: list[Path]) -> Path | None:
    """The first file SimpleITK cannot read on its own (to name it in the error)."""
    for path in files:
        try:
            sitk.ReadImage(str(path))
        except RuntimeError:
            return path
    return None


def _first_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    message = next((ln for ln in lines if "Description" in ln), lines[-1] if lines else "")
    return (message.split("Description:")[-1].strip() or type(error).__name__)[:200]


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Array (scaling applied), RAS affine and notes of a NIfTI file."""
    _check_nifti_voxel_sizes(path)
    # nibabel warns and logs about header oddities on stderr: keep them as notes instead, so a
    # corrupt file gives one error line and a readable one its notes in Volume.warnings
    with warnings_module.catch_warnings(record=True) as caught, LoggingOutputSuppressor():
        warnings_module.simplefilter("always")
        try:
            image = nib.load(path)
            array = np.asanyarray(image.dataobj)
        except _NIBABEL_ERRORS as e:
            raise InputError(path, f"unreadable or corrupt NIfTI ({type(e).__name__}: {e})") from e
    header = image.header
    warnings = [f"nibabel: {w.message}" for w in caught if issubclass(w.category, UserWarning)]
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        warnings.append("NIfTI without sform/qform: affine from voxel sizes only")
    return np.asarray(array), np.asarray(image.affine, dtype=np.float64), warnings


def _check_nifti_voxel_sizes(path: Path) -> None:
    """Refuse a NIfTI-1 header whose affine would come from zero or negative voxel sizes.

    Read unchecked, before ``nib.load``: nibabel would silently take absolute values (and log
    a line). Other header problems are left to ``nib.load``.
    """
    try:
        with nib.openers.ImageOpener(path) as f, warnings_module.catch_warnings():
            warnings_module.simplefilter("ignore")
            header = nib.Nifti1Header.from_fileobj(f, check=False)
        no_affine = int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0
        sizes = [float(v) for v in header["pixdim"][1:4]]
    except Exception:  # noqa: BLE001 - not a readable NIfTI-1 header: nib.load reports it
        return
    if no_affine and min(sizes) <= 0:
        raise InputError(path, f"voxel size {sizes} in the header is zero or negative "
                               "(no sform/qform to take the geometry from)")


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Array (x, y, z[, c]) and RAS affine of an NRRD/MHA/MHD file read by SimpleITK."""
    try:
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
    except RuntimeError as e:
        raise InputError(path, f"unreadable or corrupt image ({_first_line(e)})") from e
    ndim = image.GetDimension()
    axes = list(reversed(range(ndim))) + (
        [ndim] if image.GetNumberOfComponentsPerPixel() > 1 else []
    )
    return array.transpose(axes), _itk_affine_ras(image), []


def _itk_affine_ras(image: sitk.Image) -> np.ndarray:
    """(4, 4) RAS affine of a SimpleITK image (first three axes), from its LPS geometry."""
    ndim, dim = image.GetDimension(), min(image.GetDimension(), 3)
    direction = np.eye(3)
    direction[:dim, :dim] = np.reshape(image.GetDirection(), (ndim, ndim))[:dim, :dim]
    spacing, origin = np.ones(3), np.zeros(3)
    spacing[:dim], origin[:dim] = image.GetSpacing()[:dim], image.GetOrigin()[:dim]
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing  # scales column c by spacing[c]
    affine[:3, 3] = origin
    return LPS_TO_RAS @ affine


def _check_array(
    array: np.ndarray, path: Path, *, expect_3d: bool, check_finite: bool
) -> np.ndarray:
    """Numeric (X, Y, Z) array: squeeze trailing singleton dims, reject 2D/4D and NaN/inf."""
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype.kind not in "iuf":
        raise InputError(path, f"non-numeric voxels (dtype {array.dtype})")
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    shape = "x".join(str(s) for s in array.shape)
    if array.size == 0:
        raise InputError(path, f"empty image (shape {shape or '()'}, no voxels)")
    if array.ndim == 2 or (array.ndim == 3 and 1 in array.shape and expect_3d):
        if expect_3d:
            raise InputError(path, f"2D image (shape {shape}); a 3D volume is needed")
        array = array.reshape(*array.shape[:2], -1)
    if array.ndim != 3 and (expect_3d or array.ndim != 4):
        raise InputError(path, f"{array.ndim}D image (shape {shape}); a 3D volume is needed")
    if check_finite and array.dtype.kind == "f":
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if n_bad:
            raise InputError(path, f"{n_bad} non-finite voxel(s) (NaN or inf)")
    return array


def check_geometry(affine: np.ndarray, path: str | PathLike) -> np.ndarray:
    """``affine`` when it is finite with voxel sizes in ``SPACING_RANGE_MM``, else InputError.

    A zero, tiny or huge voxel size (say 0 or 1e4 mm) comes from a broken header; resampling
    to the plan's spacing would divide by zero or allocate an absurd grid.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise InputError(path, "affine (voxel-to-world matrix) has NaN or infinite values")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    low, high = SPACING_RANGE_MM
    if spacing.min() < low or spacing.max() > high:
        sizes = "x".join(f"{s:.4g}" for s in spacing)
        raise InputError(path, f"voxel size {sizes} mm outside [{low:g}, {high:g}] mm "
                               "(broken header?)")
    return affine


def save_nifti(volume: Volume, path: str | PathLike) -> Path:
    """Write ``volume`` as NIfTI-1 atomically, sform and qform set to its affine.

    The file is written under a hidden temporary name in the same folder, then renamed
    with ``os.replace``, so no half-written file is ever left at ``path``.

    Args:
        volume: the image; bool arrays are stored as uint8, int64 as int32 when in range.
        path: destination ending in ``.nii`` or ``.nii.gz``.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    ext = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    if not path.name.endswith(ext):
        raise InputError(path, "NIfTI file names end with .nii or .nii.gz")
    image = nib.Nifti1Image(_nifti_array(volume.array, path), volume.affine)
    image.set_sform(volume.affine, code=1)
    image.set_qform(volume.affine, code=1)
    tmp = path.with_name(f".{path.name[: -len(ext)]}.{os.getpid()}.tmp{ext}")
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _nifti_array(array: np.ndarray, path: Path) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype == np.int64:
        if array.size and (array.min() < -(2**31) or array.max() >= 2**31):
            raise InputError(path, "int64 values out of the int32 range cannot be saved")
        return array.astype(np.int32)
    return array


def check_label(image: Volume, label: Volume, *, atol: float = 1e-3) -> np.ndarray:
    """Check that ``label`` is a valid label map of ``image`` and return it as integers.

    Args:
        image: the image volume.
        label: its label map (same grid), e.g. from ``read_image(..., check_finite=True)``.
        atol: largest absolute difference allowed between the two affines (mm).

    Returns:
        (X, Y, Z) label array as uint8 (max <= 255), else int32, else int64.

    Raises:
        InputError: naming the label's path, when shapes or affines differ, or values are
            non-integer, non-finite or negative.
    """
    where = label.source
    if label.array.shape != image.array.shape:
        raise InputError(where, f"label shape {label.array.shape} != image shape {image.shape}")
    diff = float(np.abs(np.asarray(label.affine) - np.asarray(image.affine)).max())
    if diff > atol:
        raise InputError(where, f"label affine differs from the image's by {diff:.4g} (> {atol})")
    array = np.asarray(label.array)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise InputError(where, "label has NaN or infinite values")
        if np.any(array != np.round(array)):
            raise InputError(where, "label values are not integers")
    elif array.dtype.kind not in "biu":
        raise InputError(where, f"label values are not numeric (dtype {array.dtype})")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0:
        raise InputError(where, f"negative label values (min {low:g})")
    dtype = np.uint8 if high <= 255 else np.int32 if high < 2**31 else np.int64
    return array.astype(dtype)
