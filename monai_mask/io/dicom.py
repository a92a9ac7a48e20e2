"""DICOM series scanning, grouping and slice geometry (headers only, no pixel data).

Files are grouped by SeriesInstanceUID and ordered by the projection of
ImagePositionPatient onto the slice normal (row cosine x column cosine), never by file name
or InstanceNumber; the spacing between slices comes from those positions, not from
SliceThickness. Irregular geometry (gantry tilt, missing slices, non-uniform spacing,
duplicate positions) is reported in ``DicomSeries.warnings`` and blocks reading unless the
caller allows it; a series mixing image sizes, orientations or patients never reads.
Geometry is DICOM's LPS patient frame; ``DicomSeries.affine()`` gives the RAS affine.
See the DICOM standard PS3.3 C.7.6.2.1.1 (Image Position and Orientation).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from monai_mask.errors import InputError
from monai_mask.privacy import pseudonymize, series_pseudonym

__all__ = [
    "DicomSeries",
    "SliceGeometry",
    "LPS_TO_RAS",
    "is_dicom_file",
    "iter_files",
    "group_dicom_files",
    "scan_dicom",
    "slice_geometry",
]

logger = logging.getLogger(__name__)

#: diag(-1, -1, 1, 1): flips the first two world axes, LPS <-> RAS (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: modalities that carry no image volume (segmentations, structure sets, reports, ...).
NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "SR", "PR", "KO", "DOC", "REG", "FID"}
)
_HEADER_TAGS = [
    "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "SeriesNumber", "Modality",
    "Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
    "NumberOfFrames", "SliceThickness", "RescaleSlope", "RescaleIntercept",
    "PatientID", "PatientName", "PatientBirthDate",
]  # fmt: skip


@dataclass(frozen=True)
class _SliceHeader:
    path: Path
    key: str
    uid: str | None
    modality: str | None
    size: tuple[int, int]  # (Rows, Columns)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    iop: np.ndarray  # (6,)
    ipp: np.ndarray  # (3,)
    patient_key: str | None
    transfer_syntax: str | None
    thickness: float | None
    rescale: tuple[float, float]  # (slope, intercept)
    problem: str | None  # a reason this file cannot be part of a readable volume


@dataclass(frozen=True)
class SliceGeometry:
    """Order and spacing of slices along their normal (LPS millimetres).

    Attributes:
        order: (N,) indices that sort the input positions along ``normal``.
        normal: (3,) unit slice normal, row cosine x column cosine.
        step: (3,) median step vector between distinct consecutive slices.
        spacing: median distance between distinct consecutive slices along ``normal``.
        duplicates: indices, in sorted order, of slices at the position of the previous one.
        irregular: one message per problem (tilt, missing slices, non-uniform, duplicates).
    """

    order: np.ndarray
    normal: np.ndarray
    step: np.ndarray
    spacing: float
    duplicates: tuple[int, ...]
    irregular: list[str]


@dataclass(eq=False)
class DicomSeries:
    """One DICOM series: ordered files and header geometry, no pixel data and no PHI.

    Attributes:
        uid: SeriesInstanceUID, or None when the files carry none.
        key: grouping key, ``uid`` or (when missing) folder/study/frame of reference/number.
        folder: deepest folder holding all the files.
        files: files ordered along the slice normal (duplicates included).
        modality: "CT", "MR", ... or None.
        rows, cols: image size in pixels (DICOM Rows, Columns).
        pixel_spacing: (row spacing, column spacing) in mm, DICOM PixelSpacing order.
        orientation: (6,) ImageOrientationPatient, row then column direction cosines (LPS).
        positions: (N, 3) ImagePositionPatient of ``files`` in LPS mm.
        normal: (3,) unit slice normal. step: (3,) median slice step vector (LPS mm).
        slice_spacing: median distance between slices along ``normal`` (from positions).
        patient_key: pseudonym of the patient (never the raw identifier), None if unknown.
        transfer_syntax: TransferSyntaxUID of the first file.
        warnings: geometry and grouping notes (no PHI); includes every ``irregular`` entry.
        irregular: problems that block reading unless ``allow_irregular=True``.
        errors: problems that always block reading (mixed series, multi-frame, no geometry).
        duplicates: indices into ``files`` of slices repeating the previous position.
        rescale: (N, 2) RescaleSlope and RescaleIntercept of ``files``.
    """

    uid: str | None
    key: str
    folder: Path
    files: list[Path] = field(repr=False)
    modality: str | None
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    orientation: np.ndarray = field(repr=False)
    positions: np.ndarray = field(repr=False)
    normal: np.ndarray = field(repr=False)
    step: np.ndarray = field(repr=False)
    slice_spacing: float
    patient_key: str | None
    transfer_syntax: str | None = None
    warnings: list[str] = field(default_factory=list)
    irregular: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    duplicates: tuple[int, ...] = ()
    rescale: np.ndarray = field(default_factory=lambda: np.array([[1.0, 0.0]]), repr=False)

    @property
    def n_slices(self) -> int:
        """Number of files (slices) in the series."""
        return len(self.files)

    @property
    def case_id(self) -> str:
        """Privacy-safe id: ``"S"`` + 12 hex digits of the keyed hash of ``key``."""
        return series_pseudonym(self.key)

    def unique_files(self) -> list[Path]:
        """Ordered files without the duplicated positions (first file of each position kept)."""
        drop = set(self.duplicates)
        return [f for i, f in enumerate(self.files) if i not in drop]

    def affine_lps(self) -> np.ndarray:
        """(4, 4) affine from voxel (i, j, k) = (column, row, slice) to LPS mm.

        Columns: row cosine x column spacing, column cosine x row spacing, the median slice
        step (sheared when the gantry is tilted), and the first distinct slice position.
        """
        keep = np.setdiff1d(np.arange(self.n_slices), self.duplicates)
        affine = np.eye(4)
        affine[:3, 0] = self.orientation[:3] * self.pixel_spacing[1]
        affine[:3, 1] = self.orientation[3:] * self.pixel_spacing[0]
        affine[:3, 2] = self.step
        affine[:3, 3] = self.positions[keep[0]]
        return affine

    def affine(self) -> np.ndarray:
        """(4, 4) RAS affine (nibabel/MONAI convention): ``LPS_TO_RAS @ affine_lps()``."""
        return LPS_TO_RAS @ self.affine_lps()


def iter_files(root: str | PathLike, recursive: bool = True) -> Iterator[Path]:
    """Files under ``root`` in sorted order, skipping hidden names and "._" resource forks."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in sorted(filenames):
            if not name.startswith("."):  # covers "._" AppleDouble junk
                yield Path(dirpath) / name


def is_dicom_file(path: str | PathLike) -> bool:
    """True for a DICOM Part 10 file ('DICM' at byte 128); files with a DICOM suffix and no
    preamble are accepted when pydicom parses an image header from them."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    if path.suffix.lower() not in DICOM_SUFFIXES:
        return False
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["Rows"])
    except Exception:  # noqa: BLE001 - any parse failure means "not DICOM"
        return False
    return "Rows" in ds


def _floats(value: object, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) else None


def _patient_key(ds: pydicom.Dataset) -> str | None:
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return pseudonymize(pid)
    name = str(ds.get("PatientName", "") or "").strip()
    if name:
        return pseudonymize(f"{name}|{ds.get('PatientBirthDate', '') or ''}")
    return None


def _series_key(ds: pydicom.Dataset, path: Path) -> tuple[str, str | None]:
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip() or None
    if uid:
        return uid, uid
    parts = [str(path.parent)] + [
        str(ds.get(k, "") or "")
        for k in ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesNumber", "Modality")
    ]
    return "|".join(parts), None


def read_slice_header(path: Path) -> _SliceHeader | None:
    """Header of one DICOM file, or None when the file holds no image (SR, SEG, RTSTRUCT)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError) as e:
        raise InputError(path, f"unreadable DICOM header ({type(e).__name__})") from e
    modality = str(ds.get("Modality", "") or "").strip() or None
    if "Rows" not in ds or modality in NON_IMAGE_MODALITIES:
        return None
    key, uid = _series_key(ds, path)
    iop, ipp = (
        _floats(ds.get("ImageOrientationPatient"), 6),
        _floats(ds.get("ImagePositionPatient"), 3),
    )
    spacing = _floats(ds.get("PixelSpacing"), 2)
    problem = None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        problem = "multi-frame (enhanced) DICOM is not supported; export single-frame files"
    elif iop is None or ipp is None:
        problem = "no ImagePositionPatient/ImageOrientationPatient (not a volume slice)"
    thickness = _floats([ds.get("SliceThickness")], 1) if ds.get("SliceThickness") else None
    meta = getattr(ds, "file_meta", None)
    return _SliceHeader(
        path=path, key=key, uid=uid, modality=modality,
        size=(int(ds.Rows), int(ds.get("Columns", 0) or 0)),
        pixel_spacing=(1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1])),
        iop=np.array([1.0, 0, 0, 0, 1, 0]) if iop is None else iop,
        ipp=np.zeros(3) if ipp is None else ipp,
        patient_key=_patient_key(ds),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")) or None if meta else None,
        thickness=None if thickness is None else float(thickness[0]),
        rescale=(float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)),
        problem=problem,
    )  # fmt: skip


def slice_geometry(
    positions: np.ndarray, orientation: np.ndarray, *, rtol: float = 0.01, tilt_tol: float = 1e-3
) -> SliceGeometry:
    """Order slices along their normal and detect irregular spacing.

    Args:
        positions: (N, 3) ImagePositionPatient per slice, LPS mm, any order.
        orientation: (6,) ImageOrientationPatient (row cosine, column cosine).
        rtol: relative deviation of a step from the median step that counts as non-uniform.
        tilt_tol: tangent of the angle between the slice stack and the normal that counts
            as gantry tilt (1e-3 ~ 0.06 degrees).

    Returns:
        SliceGeometry with the sorting order, median step and irregularity messages.
    """
    normal = np.cross(orientation[:3], orientation[3:])
    normal = normal / np.linalg.norm(normal)
    order = np.argsort(positions @ normal, kind="stable")
    pos = positions[order]
    dist = np.diff(pos @ normal)
    dup = dist < 1e-3
    duplicates = tuple(int(i) + 1 for i in np.flatnonzero(dup))
    steps, dist = np.diff(pos, axis=0)[~dup], dist[~dup]
    if len(dist) == 0:
        return SliceGeometry(order, normal, normal.copy(), 1.0, duplicates, [])
    spacing = float(np.median(dist))
    step = np.median(steps, axis=0)
    irregular = _irregularities(steps, dist, normal, spacing, rtol, tilt_tol)
    if duplicates:
        irregular.append(f"duplicate slice positions: {len(duplicates)} slice(s) repeat a position")
    return SliceGeometry(order, normal, step, spacing, duplicates, irregular)


def _irregularities(
    steps: np.ndarray,
    dist: np.ndarray,
    normal: np.ndarray,
    spacing: float,
    rtol: float,
    tilt_tol: float,
) -> list[str]:
    """Messages for tilt, missing slices and non-uniform spacing of distinct slices."""
    out = []
    lateral = np.linalg.norm(steps - np.outer(dist, normal), axis=1) / dist
    if np.max(lateral) > tilt_tol:
        angle = np.degrees(np.arctan(np.median(lateral)))
        out.append(f"gantry tilt: slice positions step {angle:.2f} degrees off the slice normal")
    ratio = dist / spacing
    k = np.rint(ratio)
    gaps = (k >= 2) & (np.abs(ratio - k) < 0.1)
    if gaps.any():
        n_missing = int(np.sum(k[gaps] - 1))
        out.append(
            f"missing slices: about {n_missing} slice(s) missing in {int(gaps.sum())} gap(s)"
        )
    deviation = np.abs(ratio[~gaps] - 1.0)
    if deviation.size and deviation.max() > rtol:
        out.append(
            f"non-uniform slice spacing: steps {dist.min():.3f}..{dist.max():.3f} mm, "
            f"median {spacing:.3f} mm (max deviation {100 * deviation.max():.1f}%)"
        )
    return out


def _mixed_errors(headers: list[_SliceHeader]) -> list[str]:
    """Reasons a group of slices is not one volume: mixed sizes, orientations, patients."""
    errors = sorted({h.problem for h in headers if h.problem})
    sizes = {h.size for h in headers}
    if len(sizes) > 1:
        errors.append(f"mixed series: {len(sizes)} image sizes")
    iops = np.stack([h.iop for h in headers])
    if np.abs(iops - iops[0]).max() > 1e-4:
        n = len({tuple(np.round(r, 4)) for r in iops})
        errors.append(f"mixed series: {n} image orientations")
    spacings = np.array([h.pixel_spacing for h in headers])
    if np.abs(spacings - spacings[0]).max() > 1e-4 * max(1.0, float(spacings.max())):
        errors.append("mixed series: several pixel spacings")
    if len({h.patient_key for h in headers}) > 1:
        errors.append("mixed series: several patients")
    return errors


def _build_series(key: str, headers: list[_SliceHeader]) -> DicomSeries:
    ref = headers[0]
    geo = slice_geometry(np.stack([h.ipp for h in headers]), ref.iop)
    ordered = [headers[i] for i in geo.order]
    errors = _mixed_errors(headers)
    notes = [] if ref.uid else ["no SeriesInstanceUID: grouped by folder, study and series number"]
    single = len(headers) - len(geo.duplicates) < 2
    step = geo.normal * (ref.thickness or 1.0) if single else geo.step
    series = DicomSeries(
        uid=ref.uid, key=key,
        folder=Path(os.path.commonpath([str(h.path.parent) for h in headers])),
        files=[h.path for h in ordered], modality=ref.modality,
        rows=ref.size[0], cols=ref.size[1], pixel_spacing=ref.pixel_spacing,
        orientation=ref.iop, positions=np.stack([h.ipp for h in ordered]),
        normal=geo.normal, step=step,
        slice_spacing=float(np.linalg.norm(step)) if single else geo.spacing,
        patient_key=ref.patient_key, transfer_syntax=ref.transfer_syntax,
        warnings=errors + geo.irregular + notes, irregular=list(geo.irregular),
        errors=errors, duplicates=geo.duplicates,
        rescale=np.array([h.rescale for h in ordered]),
    )  # fmt: skip
    for message in series.warnings:
        logger.debug("DICOM series %s: %s", series.case_id, message)
    return series


def group_dicom_files(files: Iterable[str | PathLike]) -> list[DicomSeries]:
    """Group DICOM files into series by SeriesInstanceUID (headers only).

    Args:
        files: DICOM files, from any folders; non-image objects (SR, SEG, ...) are skipped.

    Returns:
        One DicomSeries per series, sorted by folder then privacy-safe case id.

    Raises:
        InputError: a file's header cannot be read.
    """
    groups: dict[str, list[_SliceHeader]] = defaultdict(list)
    for path in files:
        header = read_slice_header(Path(path))
        if header is not None:
            groups[header.key].append(header)
    series = [_build_series(key, headers) for key, headers in groups.items()]
    return sorted(series, key=lambda s: (str(s.folder), s.case_id))


def scan_dicom(folder: str | PathLike, recursive: bool = True) -> list[DicomSeries]:
    """Find the DICOM series under ``folder``: one entry per SeriesInstanceUID.

    Args:
        folder: folder of DICOM files (with or without file extension).
        recursive: also look in sub-folders (series spanning folders are grouped).

    Returns:
        The series, sorted deterministically (see ``group_dicom_files``).

    Raises:
        InputError: ``folder`` is not a folder, is empty, or holds no DICOM image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    files = list(iter_files(folder, recursive))
    if not files:
        raise InputError(folder, "empty folder" if recursive else "no file (recursive=False)")
    series = group_dicom_files(f for f in files if is_dicom_file(f))
    if not series:
        raise InputError(folder, f"no DICOM image found among {len(files)} file(s)")
    return series
