"""DICOM Segmentation (SEG) export of a label map computed on a DICOM series, via highdicom.

The label is (X, Y, Z) in the series' own voxel grid, as ``readers.read_dicom_series``
returns it: X = Columns, Y = Rows, Z = slices in ``DicomSeries.unique_files()`` order
(ascending along the slice normal). Frame ``k`` of the SEG is ``label[:, :, k].T``
(rows, columns) and references source file ``k``; highdicom takes each frame's position
and orientation from that source header, so the SEG overlays the series exactly in PACS
viewers and 3D Slicer (QuantitativeReporting / DICOM module).

Only headers are read (``stop_before_pixels``): compressed sources (JPEG 2000, JPEG-LS,
...) need no codec. Privacy: a SEG is a new series *in the source study* and the standard
requires the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1). By default
(``patient_identity="pseudonym"``, the project's privacy contract) the SEG keeps only what
the standard needs to reference the study: StudyInstanceUID (Type 1) and the source
FrameOfReference/SOP Instance UIDs; PatientName and PatientID become the patient's
pseudonym (the datalist's ``patient``), and the other Type 2 attributes (PatientBirthDate,
PatientSex, StudyDate, StudyTime, ReferringPhysicianName, StudyID, AccessionNumber) are
written empty. ``patient_identity="source"`` (an explicit choice) copies them from the
source, so PACS files the SEG under the real patient. Error messages never contain them.

Reference: DICOM PS3.3 A.51 (Segmentation IOD); Bridge et al., "Highdicom: a Python library
for standardized encoding of image annotations and machine learning model outputs in
pathology and radiology", J Digit Imaging 2022.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Literal

import highdicom as hd
import numpy as np
import pydicom
from monai.utils import look_up_option
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from monai_mask import __version__
from monai_mask.errors import InputError
from monai_mask.io.dicom import slice_geometry
from monai_mask.io.writers import SegmentInfo, atomic_write, validate_label
from monai_mask.privacy import PHI_TAGS, pseudonymize

__all__ = ["write_dicom_seg", "read_source_headers", "segment_descriptions",
           "pseudonymise_headers"]

logger = logging.getLogger(__name__)

#: Type 2 (required, may be empty) Patient / General Study attributes highdicom copies; a
#: source lacking one gets it empty, in memory only, rather than failing the export.
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def read_source_headers(files: Sequence[str | PathLike], where: Path) -> list[pydicom.Dataset]:
    """Headers (no pixel data) of the ordered single-frame source slices.

    Empty SOPClassUID / SOPInstanceUID (seen in de-identified files) are filled, in memory
    only, from the file meta information, missing ``TYPE2_COPIED`` attributes are added
    empty, and a missing ``SliceThickness`` takes the slice spacing. Checks one series, one
    size, no multi-frame file, and strictly increasing positions along the slice normal.

    Raises:
        InputError: unreadable header, missing geometry or UIDs, mixed or unordered files.
    """
    if not files:
        raise InputError(where, "no source DICOM files given")
    datasets = []
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError) as e:
            raise InputError(file, f"unreadable DICOM header ({type(e).__name__})") from e
        meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID") and meta is not None:
            ds.SOPClassUID = meta.get("MediaStorageSOPClassUID", "")
        if not ds.get("SOPInstanceUID") and meta is not None:
            ds.SOPInstanceUID = meta.get("MediaStorageSOPInstanceUID", "")
        if not ds.get("SOPClassUID") or not ds.get("SOPInstanceUID"):
            raise InputError(file, "source has no SOPClassUID/SOPInstanceUID")
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(file, "multi-frame source images are not supported")
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise InputError(file, "source has no ImagePositionPatient/ImageOrientationPatient")
        datasets.append(ds)
    _check_same_series(datasets, where)
    _fill_slice_thickness(datasets, where)
    return datasets


def pseudonymise_headers(datasets: Sequence[pydicom.Dataset]) -> None:
    """Replace, in memory, the patient/study identifiers highdicom would copy into a SEG.

    PatientName and PatientID become the pseudonym of the source's PatientID (as
    ``monai_mask.io.dicom`` computes it, so it equals the datalist's ``patient``); every
    other ``PHI_TAGS`` attribute is removed and the remaining Type 2 attributes of
    ``TYPE2_COPIED`` are emptied. StudyInstanceUID and the other UIDs are kept.
    """
    from monai_mask.io.dicom import _patient_key

    for ds in datasets:
        pseudonym = _patient_key(ds) or pseudonymize(str(ds.get("StudyInstanceUID", "")))
        for keyword in PHI_TAGS:
            if keyword in ds:
                delattr(ds, keyword)
        for keyword in TYPE2_COPIED:
            setattr(ds, keyword, "")
        ds.PatientName, ds.PatientID = pseudonym, pseudonym


def _check_same_series(datasets: list[pydicom.Dataset], where: Path) -> None:
    """One series, one image size, files ordered along the normal (as readers order them)."""
    if len({str(ds.get("SeriesInstanceUID", "")) for ds in datasets}) > 1:
        raise InputError(where, "source files belong to several series")
    if len({(int(ds.Rows), int(ds.Columns)) for ds in datasets}) > 1:
        raise InputError(where, "source files have several image sizes")
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    depth = np.array(
        [np.dot(np.asarray(ds.ImagePositionPatient, float), normal) for ds in datasets]
    )
    if len(datasets) > 1 and not (np.diff(depth) > 1e-3).all():
        raise InputError(
            where,
            "source files are not in slice order (strictly increasing along the normal); "
            "pass DicomSeries.unique_files(), the order read_dicom_series uses",
        )


def _fill_slice_thickness(datasets: list[pydicom.Dataset], where: Path) -> None:
    """Give sources without ``SliceThickness`` (optional, Type 2) the slice spacing, in memory.

    highdicom copies the thickness into the SEG's pixel measures and fails without it; the
    median distance between slice positions (:func:`slice_geometry`) is the nominal thickness
    of a contiguous stack.
    """
    missing = [ds for ds in datasets if not ds.get("SliceThickness")]
    if not missing:
        return
    if len(datasets) < 2:
        raise InputError(where, "single-slice source without SliceThickness")
    positions = np.asarray([ds.ImagePositionPatient for ds in datasets], dtype=np.float64)
    orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    thickness = slice_geometry(positions, orientation).spacing
    logger.warning("%s: %d source slice(s) have no SliceThickness; using the slice spacing "
                   "%.4g mm", where, len(missing), thickness)  # fmt: skip
    for ds in missing:
        ds.SliceThickness = f"{thickness:.6g}"


def _coded(code: tuple[str, str, str]) -> hd.sr.CodedConcept:
    scheme, value, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def segment_descriptions(
    segments: Sequence[SegmentInfo], algorithm: hd.AlgorithmIdentificationSequence
) -> list[hd.seg.SegmentDescription]:
    """highdicom segment descriptions; segment number ``n + 1`` describes ``segments[n]``."""
    return [
        hd.seg.SegmentDescription(
            segment_number=n + 1,
            segment_label=s.name,
            segmented_property_category=_coded(s.category),
            segmented_property_type=_coded(s.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in s.color)),
        )
        for n, s in enumerate(segments)
    ]


def _segment_number_map(label: np.ndarray, segments: Sequence[SegmentInfo]) -> np.ndarray:
    """(frames, rows, cols) array of segment numbers (1-based, 0 = background).

    highdicom's label-map input style: value ``n + 1`` marks ``segments[n]``'s voxels, so
    any label values (e.g. 1, 2, 5) map to the consecutive numbers DICOM requires.
    """
    dtype = np.uint8 if len(segments) < 256 else np.uint16
    lut = np.zeros(int(label.max()) + 1, dtype=dtype)
    for n, s in enumerate(segments):
        if s.label_value < lut.size:
            lut[s.label_value] = n + 1
    return np.ascontiguousarray(lut[label].transpose(2, 1, 0))


def _scrubbed(error: Exception, source: pydicom.Dataset) -> str:
    """First line of ``error`` with any patient identifier of ``source`` removed."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    for keyword in PHI_TAGS:
        value = str(source.get(keyword, "") or "").strip()
        if len(value) >= 2:
            text = text.replace(value, "<removed>")
    return text


def write_dicom_seg(
    label: np.ndarray,
    source_series_files: Sequence[str | PathLike],
    path: str | PathLike,
    segments: Sequence[SegmentInfo],
    *,
    algorithm_name: str = "monai-mask",
    algorithm_version: str = __version__,
    series_description: str = "monai-mask segmentation",
    manufacturer: str = "monai-mask",
    series_number: int = 901,
    patient_identity: Literal["pseudonym", "source"] = "pseudonym",
) -> Path:
    """Write a BINARY DICOM Segmentation of a series with highdicom, atomically.

    Args:
        label: (X, Y, Z) label map in the series' voxel grid (X = Columns, Y = Rows,
            Z = slices in ``source_series_files`` order); every non-zero value needs a
            SegmentInfo.
        source_series_files: the series' single-frame files ordered along the slice normal,
            one per label slice (``DicomSeries.unique_files()``); all are referenced.
        path: destination file (``.dcm`` recommended).
        segments: one per class; segment number ``n + 1`` is ``segments[n]``. A segment
            without voxels is kept in the segment list with no frame (the standard allows
            it; viewers show it empty). An all-zero label writes all frames, empty.
        algorithm_name, algorithm_version: AlgorithmIdentificationSequence (family
            "Artificial Intelligence") and ManufacturerModelName / SoftwareVersions.
        series_description: SeriesDescription of the new SEG series.
        manufacturer: Manufacturer of the SEG.
        series_number: SeriesNumber of the new series.
        patient_identity: ``"pseudonym"`` (default): Patient and Study attributes other than
            StudyInstanceUID are pseudonymised or empty (:func:`pseudonymise_headers`);
            ``"source"``: copied from the source images (PACS files the SEG under the real
            patient; the file is then as sensitive as the images).

    Returns:
        ``path``.

    Raises:
        InputError: bad label or segments, label shape not (Columns, Rows, number of files),
            unreadable or unordered sources, or highdicom refusing the inputs.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder")
    label = validate_label(label, path, segments)
    sources = read_source_headers(list(source_series_files), path)
    if look_up_option(patient_identity, ("pseudonym", "source")) == "pseudonym":
        pseudonymise_headers(sources)
    expected = (int(sources[0].Columns), int(sources[0].Rows), len(sources))
    if label.shape != expected:
        raise InputError(
            path, f"label shape {label.shape} != source series (Columns, Rows, slices) {expected}"
        )
    if not str(sources[0].get("StudyInstanceUID", "") or ""):
        logger.warning("%s: source series has no StudyInstanceUID; PACS cannot file it", path)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version
    )
    pixels = _segment_number_map(label, segments)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(segments, algorithm),
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=manufacturer,
            manufacturer_model_name=algorithm_name,
            software_versions=algorithm_version,
            device_serial_number="none",
            series_description=series_description,
            content_description=series_description[:64],
            omit_empty_frames=bool(pixels.any()),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        reason = _scrubbed(e, sources[0])
        raise InputError(path, f"highdicom cannot build the SEG ({reason})") from e
    return atomic_write(path, lambda tmp: seg.save_as(tmp, enforce_file_format=True))
