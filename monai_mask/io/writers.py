"""Result writers that 3D Slicer and PACS read: NIfTI, ``.seg.nrrd``, DICOM-SEG, boxes.

Every writer checks its input first, then writes under a hidden temporary name in the
destination folder and renames it with ``os.replace``: a failed call leaves neither the
destination nor a temporary file behind (an existing destination is only ever replaced
whole). Formats are written by the field's libraries, never by hand: nibabel (NIfTI),
slicerio + pynrrd (Slicer segmentation ``.seg.nrrd``), highdicom (DICOM-SEG, in
``monai_mask.io.dicom_seg``); box files are plain JSON and Slicer markups JSON (schema
v1.0.3). Geometry: label arrays are (X, Y, Z) with the nibabel RAS affine of
``monai_mask.io.readers``; boxes are ``cccwhd`` in **LPS** world millimetres
(``monai_mask.data.boxes``). See docs/outputs.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import slicerio

from monai_mask import __version__
from monai_mask.data.boxes import RAS_TO_LPS
from monai_mask.errors import InputError
from monai_mask.io.readers import Volume, save_nifti

__all__ = [
    "Code",
    "SegmentInfo",
    "TUMOUR_CATEGORY",
    "TUMOUR_TYPE",
    "MARKUPS_SCHEMA",
    "write_label_nifti",
    "write_seg_nrrd",
    "write_dicom_seg",
    "write_boxes_json",
    "read_boxes_json",
    "write_markups_roi",
    "read_markups_roi",
    "world_to_image_boxes",
    "image_to_world_boxes",
]

#: A coded concept ``(coding scheme designator, code value, code meaning)``, e.g. SNOMED CT.
Code = tuple[str, str, str]
TUMOUR_CATEGORY: Code = ("SCT", "49755003", "Morphologically Altered Structure")
TUMOUR_TYPE: Code = ("SCT", "108369006", "Neoplasm")
#: Slicer terminology context holding the DICOM (SNOMED CT) category/type codes.
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
    "Resources/Schema/markups-schema-v1.0.3.json#"
)
#: box colours by class (0-1 RGB), cycled: red, yellow, green, cyan, blue, magenta.
BOX_COLOURS = (
    (1.0, 0.2, 0.2),
    (1.0, 0.85, 0.1),
    (0.3, 0.9, 0.3),
    (0.2, 0.9, 0.9),
    (0.3, 0.5, 1.0),
    (0.9, 0.3, 0.9),
)
IDENTITY_3X3 = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]


@dataclass(frozen=True)
class SegmentInfo:
    """One class of a label map, as Slicer and DICOM-SEG describe it.

    Attributes:
        label_value: voxel value of the class in the label map (1..65535; 0 is background).
        name: displayed name (Slicer segment name, DICOM SegmentLabel).
        color: display colour, RGB floats in [0, 1].
        category: coded property category (scheme, value, meaning); default SNOMED CT
            49755003 "Morphologically Altered Structure" (a tumour).
        type: coded property type; default SNOMED CT 108369006 "Neoplasm".
    """

    label_value: int
    name: str
    color: tuple[float, float, float] = (0.86, 0.24, 0.24)
    category: Code = TUMOUR_CATEGORY
    type: Code = TUMOUR_TYPE

    def __post_init__(self) -> None:
        where = "SegmentInfo"
        value = self.label_value
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InputError(where, f"label_value must be an int, got {type(value).__name__}")
        if not 1 <= int(value) <= 65535:
            raise InputError(where, f"label_value {value} outside 1..65535 (0 is background)")
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError(where, "name must be a non-empty string")
        rgb = tuple(self.color)
        if len(rgb) != 3 or not all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in rgb):
            raise InputError(where, f"color must be 3 floats in [0, 1], got {rgb}")
        for code in (self.category, self.type):
            if len(code) != 3 or not all(isinstance(c, str) and c for c in code):
                raise InputError(where, f"codes are (scheme, value, meaning) strings, got {code}")

    def terminology(self) -> dict:
        """Slicer terminology entry (slicerio dict) of the category and type codes."""
        return {
            "contextName": TERMINOLOGY_CONTEXT,
            "category": list(self.category),
            "type": list(self.type),
        }


# ----------------------------------------------------------------------------- helpers


def atomic_write(path: Path, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a hidden temporary file next to ``path``, then rename it.

    Args:
        path: destination; its folder is created when missing.
        write: writes the whole file at the path it is given.
        suffix: ending of the temporary name (libraries choose formats by extension).

    Raises:
        InputError: the file cannot be written; the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(path, f"cannot write ({type(e).__name__}: {e.strerror or e})") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_affine(affine: np.ndarray, where: str | PathLike) -> np.ndarray:
    """(4, 4) float64 affine, finite, invertible, last row (0, 0, 0, 1)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InputError(where, f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if not np.allclose(affine[3], [0, 0, 0, 1]) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(where, "affine is not an invertible voxel-to-world matrix")
    return affine


def validate_label(
    label: np.ndarray, where: str | PathLike, segments: Sequence[SegmentInfo] | None = None
) -> np.ndarray:
    """Validate an (X, Y, Z) label map and return it as the smallest unsigned integer type.

    Args:
        label: bool, integer, or float array holding whole numbers, >= 0.
        where: path named in errors.
        segments: when given, every non-zero value must have one SegmentInfo, and label
            values and names must be unique (values without voxels are allowed).

    Returns:
        The label as uint8 (max <= 255), uint16 (<= 65535), else uint32.

    Raises:
        InputError: not 3D, empty, non-numeric, non-integer, non-finite or negative values,
            values without a SegmentInfo, duplicate segment values or names.
    """
    label = np.asarray(label)
    if label.ndim != 3 or label.size == 0:
        raise InputError(where, f"label must be a non-empty 3D (X, Y, Z) array, got {label.shape}")
    if label.dtype.kind not in "biuf":
        raise InputError(where, f"label must be numeric, got dtype {label.dtype}")
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            raise InputError(where, "label has non-finite values (NaN or inf)")
        if not np.array_equal(label, np.round(label)):
            raise InputError(where, "label has non-integer values (probabilities? threshold first)")
    low, high = (float(label.min()), float(label.max())) if label.dtype.kind != "b" else (0, 1)
    if low < 0:
        raise InputError(where, f"label has negative values (min {low:g})")
    if segments is not None:
        _check_segments(label, where, segments)
    dtype = np.uint8 if high <= 255 else np.uint16 if high <= 65535 else np.uint32
    return label.astype(dtype, copy=False)


def _check_segments(label: np.ndarray, where, segments: Sequence[SegmentInfo]) -> None:
    if not segments:
        raise InputError(where, "no SegmentInfo given")
    values = [int(s.label_value) for s in segments]
    if len(set(values)) != len(values):
        raise InputError(where, f"duplicate segment label values {sorted(values)}")
    names = [s.name for s in segments]
    if len(set(names)) != len(names):
        raise InputError(where, "duplicate segment names")
    present = {int(v) for v in np.unique(label)} - {0}
    unknown = sorted(present - set(values))
    if unknown:
        raise InputError(where, f"label values {unknown} have no SegmentInfo")


def _check_path(path: str | PathLike, endings: tuple[str, ...]) -> Path:
    path = Path(path)
    if not path.name.lower().endswith(endings) or path.name.lower() in endings:
        raise InputError(path, f"file name must end with {' or '.join(endings)}")
    if path.is_dir():
        raise InputError(path, "is a folder")
    return path


# ----------------------------------------------------------------------------- label maps


def write_label_nifti(label: np.ndarray, affine_ras: np.ndarray, path: str | PathLike) -> Path:
    """Write an (X, Y, Z) label map as NIfTI-1 with sform = qform = ``affine_ras``, atomically.

    Args:
        label: integer (or whole-number float / bool) label map, 0 = background.
        affine_ras: (4, 4) nibabel RAS affine of the image the label belongs to.
        path: destination ending in ``.nii`` or ``.nii.gz``.

    Returns:
        ``path``. Voxels are uint8 when the values fit, else uint16 / uint32.

    Raises:
        InputError: bad label or affine, wrong extension, unwritable destination.
    """
    path = _check_path(path, (".nii.gz", ".nii"))
    label = validate_label(label, path)
    affine = check_affine(affine_ras, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return save_nifti(Volume(array=label, affine=affine, source=str(path)), path)
    except OSError as e:
        raise InputError(path, f"cannot write ({type(e).__name__}: {e.strerror or e})") from e


def write_seg_nrrd(
    label: np.ndarray,
    affine_ras: np.ndarray,
    path: str | PathLike,
    segments: Sequence[SegmentInfo],
) -> Path:
    """Write a 3D Slicer segmentation (``.seg.nrrd``, binary labelmap, one layer) via slicerio.

    Each SegmentInfo becomes a segment (``Segment<value>`` id, name, colour, label value,
    layer 0, terminology from its codes); values without voxels still get their segment.
    Geometry: ``ijkToLPS = RAS_TO_LPS @ affine_ras``, so Slicer shows the label exactly over
    the image it was computed on (NRRD ``space: left-posterior-superior``).

    Args:
        label: (X, Y, Z) label map; every non-zero value needs a SegmentInfo.
        affine_ras: (4, 4) nibabel RAS affine.
        path: destination ending in ``.seg.nrrd``.
        segments: one per class, unique label values and names.

    Returns:
        ``path``.

    Raises:
        InputError: bad label, affine or segments; unwritable destination.
    """
    path = _check_path(path, (".seg.nrrd",))
    label = validate_label(label, path, segments)
    affine = check_affine(affine_ras, path)
    segmentation = {
        "voxels": label,
        "ijkToLPS": RAS_TO_LPS @ affine,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": [
            {
                "id": f"Segment_{s.label_value}",
                "name": s.name,
                "color": [float(c) for c in s.color],
                "labelValue": int(s.label_value),
                "layer": 0,
                "terminology": s.terminology(),
            }
            for s in segments
        ],
    }
    return atomic_write(
        path, lambda tmp: slicerio.write_segmentation(str(tmp), segmentation), ".seg.nrrd"
    )


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
    patient_identity: str = "pseudonym",
) -> Path:
    """Write a DICOM Segmentation (BINARY) of a DICOM series via highdicom, atomically.

    See ``monai_mask.io.dicom_seg.write_dicom_seg`` for the arguments, the privacy note
    (the study is referenced by its UID; patient identity is pseudonymised unless
    ``patient_identity="source"``) and the handling of empty segments.
    """
    from monai_mask.io.dicom_seg import write_dicom_seg as _write

    return _write(
        label,
        source_series_files,
        path,
        segments,
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        series_description=series_description,
        manufacturer=manufacturer,
        series_number=series_number,
        patient_identity=patient_identity,
    )


# ----------------------------------------------------------------------------- boxes


def _check_boxes(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, where
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 6) float boxes with sizes >= 0, (N,) finite scores, (N,) integer labels."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6) if np.size(boxes) == 0 else boxes
    boxes, scores, labels = np.asarray(boxes), np.asarray(scores), np.asarray(labels)
    if boxes.ndim != 2 or boxes.shape[1] != 6:
        raise InputError(where, f"boxes must be (N, 6) cccwhd, got {boxes.shape}")
    n = boxes.shape[0]
    if scores.shape != (n,) or labels.shape != (n,):
        raise InputError(where, f"{n} boxes but scores {scores.shape} and labels {labels.shape}")
    boxes, scores = boxes.astype(np.float64), scores.astype(np.float64)
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise InputError(where, "boxes or scores have non-finite values")
    if (boxes[:, 3:] < 0).any():
        raise InputError(where, "boxes have negative sizes")
    if labels.dtype.kind not in "iu" and not (
        labels.dtype.kind == "f" and np.array_equal(labels, np.round(labels))
    ):
        raise InputError(where, f"box labels must be integers, got dtype {labels.dtype}")
    return boxes, scores, labels.astype(np.int64)


def _label_name(label: int, label_names: dict[int, str], where) -> str:
    if label not in label_names:
        raise InputError(where, f"box label {label} has no entry in label_names")
    return str(label_names[label])


def write_boxes_json(
    boxes_lps_cccwhd: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    path: str | PathLike,
    *,
    image_path_name: str | None,
    label_names: dict[int, str],
) -> Path:
    """Write detections as JSON in the project's box convention, atomically.

    Output: ``{"box_mode": "cccwhd", "box_space": "LPS", "box_units": "mm", "image": name,
    "boxes": [{"box": [cx, cy, cz, w, h, d], "score": s, "label": l, "label_name": n}]}``,
    boxes in input order.

    Args:
        boxes_lps_cccwhd: (N, 6) centre and size in LPS world mm (N may be 0).
        scores: (N,) confidence scores. labels: (N,) integer class labels.
        path: destination (``.json``).
        image_path_name: name of the image the boxes belong to (a case name or pseudonym,
            never a patient identifier), or None.
        label_names: name of every class label that occurs.

    Raises:
        InputError: shapes, non-finite values, negative sizes, labels without a name.
    """
    path = _check_path(path, (".json",))
    boxes, scores, labels = _check_boxes(boxes_lps_cccwhd, scores, labels, path)
    entries = [
        {
            "box": [float(v) for v in box],
            "score": float(score),
            "label": int(lab),
            "label_name": _label_name(int(lab), label_names, path),
        }
        for box, score, lab in zip(boxes, scores, labels, strict=True)
    ]
    document = {
        "box_mode": "cccwhd",
        "box_space": "LPS",
        "box_units": "mm",
        "image": image_path_name,
        "boxes": entries,
    }
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))


def _load_json(path: Path) -> dict:
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"unreadable JSON ({type(e).__name__})") from e
    if not isinstance(document, dict):
        raise InputError(path, "JSON root is not an object")
    return document


def read_boxes_json(path: str | PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (N, 6) LPS mm cccwhd, scores (N,) and labels (N,) of a ``write_boxes_json`` file.

    Raises:
        InputError: unreadable file or another box convention.
    """
    path = Path(path)
    document = _load_json(path)
    convention = tuple(document.get(k) for k in ("box_mode", "box_space", "box_units"))
    if convention != ("cccwhd", "LPS", "mm"):
        raise InputError(path, f"box convention {convention} is not ('cccwhd', 'LPS', 'mm')")
    try:
        entries = document["boxes"]
        boxes = np.array([e["box"] for e in entries], dtype=np.float64).reshape(-1, 6)
        scores = np.array([e["score"] for e in entries], dtype=np.float64)
        labels = np.array([e["label"] for e in entries], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(path, f"malformed box entries ({type(e).__name__})") from e
    return boxes, scores, labels


def _roi_markup(box: np.ndarray, score: float, label: int, name: str, index: int) -> dict:
    """One Slicer ROI markup (axis-aligned LPS box, one control point at its centre)."""
    center = [float(v) for v in box[:3]]
    color = list(BOX_COLOURS[label % len(BOX_COLOURS)])
    point = {
        "id": "1",
        "label": f"{name}-{index}",
        "description": f"score={score:.4f}",
        "position": center,
        "orientation": IDENTITY_3X3,
        "selected": True,
        "locked": False,
        "visibility": True,
        "positionStatus": "defined",
    }
    display = {
        "visibility": True,
        "opacity": 1.0,
        "color": color,
        "selectedColor": color,
        "activeColor": [0.4, 1.0, 0.0],
        "propertiesLabelVisibility": True,
        "pointLabelsVisibility": False,
        "textScale": 3.0,
        "handlesInteractive": False,
    }
    return {
        "type": "ROI",
        "name": f"{name}-{index}",
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "roiType": "Box",
        "center": center,
        "orientation": IDENTITY_3X3,
        "size": [float(v) for v in box[3:]],
        "insideOut": False,
        "description": f"score={score:.4f}",
        "controlPoints": [point],
        "display": display,
    }


def write_markups_roi(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    path: str | PathLike,
    label_names: dict[int, str],
) -> Path:
    """Write boxes as a 3D Slicer markups file (``.mrk.json``), one ROI markup per box.

    Schema v1.0.3 (``MARKUPS_SCHEMA``), ``coordinateSystem: "LPS"``, mm. Each ROI is a
    ``"Box"`` with ``center``/``size`` from the cccwhd box and orientation identity in LPS
    (ROI axes along L, P, S), one control point at the centre (as Slicer saves box ROIs),
    named ``"<label name>-<n>"`` and described ``"score=<s>"``; colour by class. Slicer
    loads every markup of the file as its own ROI node (drag and drop, or
    ``slicer.util.loadMarkups``).

    Args:
        boxes: (N, 6) cccwhd in LPS world mm. scores: (N,). labels: (N,) integers.
        path: destination ending in ``.mrk.json``.
        label_names: name of every class label that occurs.

    Raises:
        InputError: bad shapes or values, labels without a name, wrong extension.
    """
    path = _check_path(path, (".mrk.json",))
    boxes, scores, labels = _check_boxes(boxes, scores, labels, path)
    markups = [
        _roi_markup(box, float(score), int(lab), _label_name(int(lab), label_names, path), n + 1)
        for n, (box, score, lab) in enumerate(zip(boxes, scores, labels, strict=True))
    ]
    document = {"@schema": MARKUPS_SCHEMA, "markups": markups}
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))


def read_markups_roi(path: str | PathLike) -> np.ndarray:
    """(N, 6) LPS mm cccwhd boxes of the ROI markups of a Slicer ``.mrk.json`` file.

    Reads ``center``, ``size`` and ``orientation`` of every ``"ROI"`` markup, in LPS or RAS
    coordinates; a rotated ROI becomes the axis-aligned box of its corners.

    Raises:
        InputError: unreadable file, no ``markups`` list, ROI without center or size.
    """
    path = Path(path)
    markups = _load_json(path).get("markups")
    if not isinstance(markups, list):
        raise InputError(path, "no 'markups' list (not a Slicer markups file)")
    boxes = []
    for markup in (m for m in markups if isinstance(m, dict) and m.get("type") == "ROI"):
        try:
            center = np.array(markup["center"], dtype=np.float64).reshape(3)
            size = np.array(markup["size"], dtype=np.float64).reshape(3)
            axes = np.array(markup.get("orientation", IDENTITY_3X3), dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(path, f"ROI markup without a 3-vector center/size ({e})") from e
        axes = axes.reshape(3, 3)  # row-major; columns are the ROI axes
        if markup.get("coordinateSystem", "LPS") == "RAS":
            center, axes = RAS_TO_LPS[:3, :3] @ center, RAS_TO_LPS[:3, :3] @ axes
        boxes.append(np.concatenate([center, np.abs(axes) @ size]))
    return np.stack(boxes) if boxes else np.zeros((0, 6))


# ----------------------------------------------------------------------------- box geometry


def _lps_affine(affine_ras: np.ndarray) -> np.ndarray:
    return RAS_TO_LPS @ check_affine(affine_ras, "affine_ras")


def world_to_image_boxes(boxes_lps: np.ndarray, affine_ras: np.ndarray) -> np.ndarray:
    """World LPS mm ``cccwhd`` boxes -> voxel-index-space ``cccwhd`` boxes.

    Centres map exactly through the inverse affine (voxel centres at integer indices).
    Sizes map through ``|A^-1|`` (``A`` the 3x3 voxel-to-LPS matrix): the result is the
    tight axis-aligned index-space box of the world box's corners. For axis-aligned
    affines (any flips, permutations and spacings) this is exact and invertible; for
    oblique affines the image box is larger than the world box and ``image_to_world_boxes``
    does not give the original size back (centres still round-trip exactly).

    Args:
        boxes_lps: (N, 6) centre x, y, z and size along x, y, z, LPS mm.
        affine_ras: (4, 4) nibabel RAS affine of the image.

    Returns:
        (N, 6) float64 centre i, j, k and size along i, j, k in voxels.
    """
    lps = _lps_affine(affine_ras)
    boxes = np.asarray(boxes_lps, dtype=np.float64).reshape(-1, 6)
    inverse = np.linalg.inv(lps)
    centres = (boxes[:, :3] - lps[:3, 3]) @ inverse[:3, :3].T
    sizes = boxes[:, 3:] @ np.abs(inverse[:3, :3]).T
    return np.concatenate([centres, sizes], axis=1)


def image_to_world_boxes(boxes_img: np.ndarray, affine_ras: np.ndarray) -> np.ndarray:
    """Voxel-index-space ``cccwhd`` boxes -> world LPS mm ``cccwhd`` boxes.

    Centres map exactly through the affine; sizes through ``|A|``, the tight world box of
    the index box's corners (exact inverse of ``world_to_image_boxes`` for axis-aligned
    affines only).

    Args:
        boxes_img: (N, 6) centre i, j, k and size along i, j, k in voxels.
        affine_ras: (4, 4) nibabel RAS affine of the image.

    Returns:
        (N, 6) float64 boxes in LPS world mm.
    """
    lps = _lps_affine(affine_ras)
    boxes = np.asarray(boxes_img, dtype=np.float64).reshape(-1, 6)
    centres = boxes[:, :3] @ lps[:3, :3].T + lps[:3, 3]
    sizes = boxes[:, 3:] @ np.abs(lps[:3, :3]).T
    return np.concatenate([centres, sizes], axis=1)
