"""Find the images under a folder and pair them with label files, without reading pixels.

NIfTI/NRRD/MHA files are recognised by name; DICOM files (any name, 'DICM' preamble) are
grouped into series across folders by SeriesInstanceUID from their headers only. Every
source gets a stable, privacy-safe ``case_id``: the file name without extension for files,
``"S"`` + 12 hex digits of a keyed hash of the SeriesInstanceUID for DICOM series.
Hidden files and "._" resource forks (shipped with MSD archives) are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from monai_mask.errors import InputError
from monai_mask.io.dicom import DicomSeries, group_dicom_files, is_dicom_file, iter_files
from monai_mask.io.readers import ImageKind, Volume, case_name, image_kind, read_dicom_series
from monai_mask.io.readers import read_image as _read_image

__all__ = ["ImageSource", "discover_images", "pair_labels", "load_source"]

#: nnU-Net channel suffix on image names: ``case_0000.nii.gz`` is channel 0 of ``case``.
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


@dataclass(frozen=True)
class ImageSource:
    """One image found by ``discover_images``.

    Attributes:
        kind: "nifti", "nrrd", "mha" or "dicom".
        path: the image file, or for DICOM the deepest folder holding the series.
        case_id: stable, privacy-safe id ("case_000"; "S3f2a9c01b7de" for DICOM).
        patient_key: pseudonym of the patient for DICOM (the case_id when the files carry
            no patient identifier); the case_id for files.
        series: the DICOM series (ordered files and geometry); None for files.
    """

    kind: ImageKind
    path: Path
    case_id: str
    patient_key: str
    series: DicomSeries | None = None


def discover_images(root: str | PathLike, recursive: bool = True) -> list[ImageSource]:
    """List the images under ``root`` (headers only, no pixel data).

    Args:
        root: folder to search.
        recursive: search sub-folders too; DICOM series spanning folders are grouped.

    Returns:
        Sources sorted by path then case_id. Files of unknown type (.json, .txt, LICENSE)
        and non-image DICOM objects (SR, SEG, RTSTRUCT) are ignored.

    Raises:
        InputError: ``root`` is not a folder, is empty, holds no image, two sources share a
            case_id, or a DICOM header is unreadable.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a folder")
    files = list(iter_files(root, recursive))
    if not files:
        raise InputError(root, "empty folder")
    sources, dicom_files = [], []
    for path in files:
        kind = image_kind(path)
        if kind == "dicom" or (kind is None and is_dicom_file(path)):
            dicom_files.append(path)
        elif kind is not None:
            sources.append(ImageSource(kind, path, case_name(path), case_name(path)))
    for series in group_dicom_files(dicom_files):
        key = series.patient_key or series.case_id
        sources.append(ImageSource("dicom", series.folder, series.case_id, key, series))
    if not sources:
        raise InputError(root, f"no image found among {len(files)} file(s)")
    _check_unique(sources, root)
    return sorted(sources, key=lambda s: (str(s.path), s.case_id))


def _check_unique(sources: list[ImageSource], root: Path) -> None:
    seen: dict[str, Path] = {}
    for source in sources:
        if source.case_id in seen:
            first, second = (p.relative_to(root) for p in (seen[source.case_id], source.path))
            raise InputError(
                root,
                f"duplicate case id '{source.case_id}' ({first} and {second}); "
                "point at one images folder (e.g. imagesTr) or rename the files",
            )
        seen[source.case_id] = source.path


def pair_labels(images: list[ImageSource], labels_root: str | PathLike) -> dict[str, Path]:
    """Match label files to images by case_id (file name without extension).

    ``imagesTr/hippocampus_001.nii.gz`` pairs with ``labelsTr/hippocampus_001.nii.gz``; an
    image named with an nnU-Net channel suffix (``case_0000.nii.gz``) pairs with
    ``case.nii.gz``. Images without a label are left out (unlabelled cases).

    Args:
        images: from ``discover_images``.
        labels_root: folder of label files (NIfTI, NRRD incl. .seg.nrrd, MHA), recursive.

    Returns:
        ``{image case_id: label path}`` in the order of ``images``.

    Raises:
        InputError: ``labels_root`` is not a folder or has no label file, two label files
            share a name, or no label matches any image.
    """
    labels_root = Path(labels_root)
    if not labels_root.is_dir():
        raise InputError(labels_root, "labels folder not found")
    labels: dict[str, Path] = {}
    for path in iter_files(labels_root):
        if image_kind(path) in ("nifti", "nrrd", "mha"):
            name = case_name(path)
            if name in labels:
                raise InputError(labels_root, f"two label files for '{name}': {labels[name]}")
            labels[name] = path
    if not labels:
        raise InputError(labels_root, "no label file (NIfTI, NRRD or MHA) found")
    pairs = {}
    for source in images:
        for name in (source.case_id, _CHANNEL_SUFFIX.sub("", source.case_id)):
            if name in labels:
                pairs[source.case_id] = labels[name]
                break
    if images and not pairs:
        raise InputError(
            labels_root, f"no label matches an image case id (e.g. image '{images[0].case_id}')"
        )
    return pairs


def load_source(source: ImageSource, **kwargs: bool) -> Volume:
    """Read a discovered source: its DICOM series, or its file.

    Args:
        source: from ``discover_images``.
        **kwargs: ``expect_3d``, ``check_finite``, ``allow_irregular`` as in ``read_image``.
    """
    if source.series is not None:
        return read_dicom_series(source.series, **kwargs)
    return _read_image(source.path, **kwargs)
