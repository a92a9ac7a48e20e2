"""Tests of monai_mask.io.writers and monai_mask.io.dicom_seg: round trips through the
readers of each format (nibabel, slicerio, highdicom, JSON), geometry, bad inputs, privacy."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import jsonschema
import nibabel as nib
import numpy as np
import pydicom
import pytest
import slicerio

from monai_mask.data.boxes import RAS_TO_LPS, boxes_from_label
from monai_mask.errors import InputError
from monai_mask.io.dicom import scan_dicom
from monai_mask.io.readers import read_dicom_series, read_image
from monai_mask.io.writers import (
    MARKUPS_SCHEMA,
    TUMOUR_CATEGORY,
    TUMOUR_TYPE,
    SegmentInfo,
    image_to_world_boxes,
    read_boxes_json,
    read_markups_roi,
    world_to_image_boxes,
    write_boxes_json,
    write_dicom_seg,
    write_label_nifti,
    write_markups_roi,
    write_seg_nrrd,
)
from monai_mask.privacy import pseudonymize
from tests.io.conftest import PATIENT_ID, SECRETS, rotated_affine, write_dicom_series

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
REAL_CT = REAL / "ct_dicom_series"
SEGMENTS = [
    SegmentInfo(1, "tumour"),
    SegmentInfo(3, "cyst", (0.2, 0.4, 1.0)),
    SegmentInfo(5, "necrosis", (0.0, 1.0, 0.0)),  # no voxels: an empty segment
]
LABEL_NAMES = {0: "tumour", 1: "node"}

# The parts of Slicer's markups-schema-v1.0.3.json that an ROI file exercises (required
# keys, enums, vector lengths), transcribed from Slicer's Modules/Loadable/Markups schema.
_VEC3 = {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}
_VEC9 = {"type": "array", "items": {"type": "number"}, "minItems": 9, "maxItems": 9}
_RGB = {**_VEC3, "items": {"type": "number", "minimum": 0.0, "maximum": 1.0}}
MARKUPS_SCHEMA_SUBSET = {
    "type": "object",
    "required": ["@schema", "markups"],
    "properties": {
        "@schema": {"type": "string"},
        "markups": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {
                        "enum": [
                            "Fiducial",
                            "Line",
                            "Angle",
                            "Curve",
                            "ClosedCurve",
                            "Plane",
                            "ROI",
                        ]
                    },
                    "name": {"type": "string"},
                    "coordinateSystem": {"enum": ["LPS", "RAS"]},
                    "coordinateUnits": {"enum": ["mm", "um"]},
                    "locked": {"type": "boolean"},
                    "roiType": {"type": "string"},
                    "center": _VEC3,
                    "size": _VEC3,
                    "orientation": _VEC9,
                    "controlPoints": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "label": {"type": "string"},
                                "position": _VEC3,
                                "orientation": _VEC9,
                                "positionStatus": {"enum": ["undefined", "preview", "defined"]},
                            },
                        },
                    },
                    "display": {
                        "type": "object",
                        "properties": {
                            "visibility": {"type": "boolean"},
                            "opacity": {"type": "number", "minimum": 0.0, "maximum": 1.0},
                            "color": _RGB,
                            "selectedColor": _RGB,
                            "activeColor": _RGB,
                        },
                    },
                },
            },
        },
    },
}


def sample_label(shape=(10, 9, 7)) -> np.ndarray:
    """Two classes (values 1 and 3) in distinct, asymmetric blobs."""
    label = np.zeros(shape, dtype=np.int64)
    label[2:5, 3:6, 1:4] = 1
    label[6:8, 1:3, 4:6] = 3
    label[0, 0, 0] = 3
    return label


def assert_nothing_left(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == []


# ----------------------------------------------------------------------------- NIfTI


def test_label_nifti_round_trip_uint8_and_affine(tmp_path):
    label, affine = sample_label(), rotated_affine()
    path = write_label_nifti(label, affine, tmp_path / "out" / "case.nii.gz")
    image = nib.load(path)
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    volume = read_image(path)
    np.testing.assert_array_equal(volume.array, label)
    assert [p.name for p in path.parent.iterdir()] == ["case.nii.gz"]


def test_label_nifti_large_values_and_whole_floats(tmp_path):
    label = sample_label() * 300
    path = write_label_nifti(label.astype(np.float32), np.eye(4), tmp_path / "big.nii")
    assert nib.load(path).get_data_dtype() == np.uint16
    np.testing.assert_array_equal(read_image(path).array, label)


@pytest.mark.parametrize(
    ("label", "reason"),
    [
        (np.full((4, 4, 4), 0.5), "non-integer"),
        (np.full((4, 4, 4), -1), "negative"),
        (np.zeros((4, 4)), "3D"),
        (np.full((4, 4, 4), np.nan), "non-finite"),
    ],
)
def test_label_nifti_rejects_bad_labels(tmp_path, label, reason):
    with pytest.raises(InputError, match=reason):
        write_label_nifti(label, np.eye(4), tmp_path / "bad.nii.gz")
    assert_nothing_left(tmp_path)


def test_failed_replace_leaves_no_temp_file(tmp_path):
    (tmp_path / "taken.json").mkdir()  # os.replace onto a folder fails after the write
    with pytest.raises(InputError, match="taken.json"):
        write_boxes_json(
            np.zeros((0, 6)), [], [], tmp_path / "taken.json", image_path_name=None, label_names={}
        )
    assert [p.name for p in tmp_path.iterdir()] == ["taken.json"]
    assert not any((tmp_path / "taken.json").iterdir())


# ----------------------------------------------------------------------------- .seg.nrrd


def test_seg_nrrd_round_trip_with_slicerio(tmp_path):
    label, affine = sample_label(), rotated_affine()
    path = write_seg_nrrd(label, affine, tmp_path / "case.seg.nrrd", SEGMENTS)
    seg = slicerio.read_segmentation(str(path))
    np.testing.assert_array_equal(seg["voxels"], label)
    np.testing.assert_allclose(seg["ijkToLPS"], RAS_TO_LPS @ affine, atol=1e-9)
    got = {s["labelValue"]: s for s in seg["segments"]}
    assert sorted(got) == [1, 3, 5]
    for info in SEGMENTS:
        segment = got[info.label_value]
        assert segment["name"] == info.name
        np.testing.assert_allclose(segment["color"], info.color)
        assert segment["layer"] == 0
        assert segment["terminology"]["category"] == list(TUMOUR_CATEGORY)
        assert segment["terminology"]["type"] == list(TUMOUR_TYPE)
    # the same geometry through SimpleITK (what Slicer's NRRD reader sees)
    volume = read_image(path)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(volume.array, label)


def test_seg_nrrd_unknown_value_writes_nothing(tmp_path):
    with pytest.raises(InputError, match=r"values \[3\] have no SegmentInfo"):
        write_seg_nrrd(sample_label(), np.eye(4), tmp_path / "x.seg.nrrd", SEGMENTS[:1])
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    ("segments", "reason"),
    [
        ([SegmentInfo(1, "a"), SegmentInfo(1, "b"), SegmentInfo(3, "c")], "duplicate"),
        ([SegmentInfo(1, "a"), SegmentInfo(3, "a")], "duplicate segment names"),
        ([], "no SegmentInfo"),
    ],
)
def test_seg_nrrd_rejects_bad_segment_lists(tmp_path, segments, reason):
    with pytest.raises(InputError, match=reason):
        write_seg_nrrd(sample_label(), np.eye(4), tmp_path / "x.seg.nrrd", segments)
    assert_nothing_left(tmp_path)


def test_seg_nrrd_rejects_wrong_name_and_singular_affine(tmp_path):
    with pytest.raises(InputError, match=".seg.nrrd"):
        write_seg_nrrd(sample_label(), np.eye(4), tmp_path / "x.nrrd", SEGMENTS)
    with pytest.raises(InputError, match="invertible"):
        write_seg_nrrd(sample_label(), np.zeros((4, 4)), tmp_path / "x.seg.nrrd", SEGMENTS)
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"label_value": 0, "name": "x"},
        {"label_value": 1, "name": ""},
        {"label_value": 1, "name": "x", "color": (255, 0, 0)},
        {"label_value": 1.5, "name": "x"},
    ],
)
def test_segment_info_validation(kwargs):
    with pytest.raises(InputError):
        SegmentInfo(**kwargs)


# ----------------------------------------------------------------------------- DICOM-SEG


def read_seg_label(path: Path, source_files: list[Path], segments) -> np.ndarray:
    """(X, Y, Z) label map rebuilt from a SEG file, frames aligned with ``source_files``."""
    seg = hd.seg.segread(path)
    uids = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    uids = [ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID for ds in uids]
    numbers = seg.get_pixels_by_source_instance(
        uids,
        segment_numbers=list(range(1, len(segments) + 1)),
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    lut = np.array([0] + [s.label_value for s in segments])
    return lut[numbers].transpose(2, 1, 0)


def referenced_uids(path: Path) -> set[str]:
    ds = pydicom.dcmread(path)
    return {
        item.ReferencedSOPInstanceUID
        for series in ds.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }


def test_dicom_seg_round_trip_generated_oblique_series(tmp_path):
    on_disk = write_dicom_series(
        tmp_path / "ct",
        shape=(12, 10, 7),
        orientation=(0.96, 0.28, 0, -0.28, 0.96, 0),
        shuffle_seed=5,
    )
    series = scan_dicom(on_disk.folder)[0]
    files = series.unique_files()
    volume = read_dicom_series(series)
    label = sample_label(volume.shape)
    path = write_dicom_seg(
        label, files, tmp_path / "seg" / "case_seg.dcm", SEGMENTS, algorithm_version="9.9"
    )
    np.testing.assert_array_equal(read_seg_label(path, files, SEGMENTS), label)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert referenced_uids(path) == {ds.SOPInstanceUID for ds in sources}
    ds = pydicom.dcmread(path)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["tumour", "cyst", "necrosis"]
    first = ds.SegmentSequence[0]
    assert first.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert first.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert first.SegmentAlgorithmType == "AUTOMATIC"
    assert first.SegmentAlgorithmName == "monai-mask"
    assert ds.SoftwareVersions == "9.9"
    assert ds.SegmentationType == "BINARY"
    assert ds.SeriesDescription == "monai-mask segmentation"
    # the SEG references the patient's study; patient identity is pseudonymised by default
    assert ds.PatientID == ds.PatientName == pseudonymize(PATIENT_ID)
    assert ds.PatientBirthDate == "" and ds.AccessionNumber == ""
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert ds.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert [p.name for p in path.parent.iterdir()] == ["case_seg.dcm"]


def test_dicom_seg_source_without_slice_thickness(tmp_path, caplog):
    """SliceThickness is optional (Type 2) in CT; the SEG then takes the slice spacing."""
    on_disk = write_dicom_series(tmp_path / "ct", shape=(12, 10, 6))
    for f in on_disk.files:
        ds = pydicom.dcmread(f)
        del ds.SliceThickness
        ds.save_as(f, enforce_file_format=True)
    files = scan_dicom(on_disk.folder)[0].unique_files()
    label = sample_label((12, 10, 6))
    with caplog.at_level("WARNING"):
        path = write_dicom_seg(label, files, tmp_path / "seg.dcm", SEGMENTS)
    np.testing.assert_array_equal(read_seg_label(path, files, SEGMENTS), label)
    measures = pydicom.dcmread(path).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(2.0)  # the fixture's 2 mm spacing
    assert "no SliceThickness" in caplog.text
    assert not any(secret in caplog.text for secret in SECRETS)


def test_dicom_seg_copies_patient_identity_only_when_asked(tmp_path):
    on_disk = write_dicom_series(tmp_path / "ct", shape=(8, 6, 4))
    files = scan_dicom(on_disk.folder)[0].unique_files()
    label = np.zeros((8, 6, 4), dtype=np.uint8)
    path = write_dicom_seg(label, files, tmp_path / "s.dcm", SEGMENTS[:1],
                           patient_identity="source")
    assert pydicom.dcmread(path).PatientID == PATIENT_ID


def test_dicom_seg_all_empty_label(tmp_path):
    on_disk = write_dicom_series(tmp_path / "ct", shape=(8, 6, 4))
    files = scan_dicom(on_disk.folder)[0].unique_files()
    label = np.zeros((8, 6, 4), dtype=np.uint8)
    path = write_dicom_seg(label, files, tmp_path / "empty.dcm", SEGMENTS[:1])
    np.testing.assert_array_equal(read_seg_label(path, files, SEGMENTS[:1]), label)
    assert referenced_uids(path) == {pydicom.dcmread(f).SOPInstanceUID for f in files}


@pytest.mark.parametrize("problem", ["shape", "order", "unknown", "fraction"])
def test_dicom_seg_bad_inputs_write_nothing(tmp_path, problem):
    on_disk = write_dicom_series(tmp_path / "ct", shape=(8, 6, 4))
    files = scan_dicom(on_disk.folder)[0].unique_files()
    label, reason = np.zeros((8, 6, 4), dtype=np.int64), None
    if problem == "shape":
        label, reason = np.zeros((6, 8, 4), dtype=np.int64), r"\(8, 6, 4\)"
    elif problem == "order":
        files, reason = files[::-1], "slice order"
    elif problem == "unknown":
        label[1, 1, 1], reason = 7, r"\[7\] have no SegmentInfo"
    else:
        label, reason = np.full((8, 6, 4), 0.3), "non-integer"
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=reason) as info:
        write_dicom_seg(label, files, out / "seg.dcm", SEGMENTS)
    assert not any(secret in str(info.value) for secret in SECRETS)
    assert_nothing_left(out)


def test_dicom_seg_real_jpeg2000_series(tmp_path):
    if not REAL_CT.is_dir():
        pytest.skip("shared/data/real is absent")
    series = scan_dicom(REAL_CT)[0]
    files = series.unique_files()
    assert "1.2.840.10008.1.2.4.9" in (series.transfer_syntax or "")  # JPEG 2000
    label = np.zeros((series.cols, series.rows, len(files)), dtype=np.uint8)
    label[200:260, 180:230, 5:12] = 1
    label[300:310, 100:140, 2:4] = 2
    segments = [SegmentInfo(1, "tumour"), SegmentInfo(2, "lymph node", (1.0, 1.0, 0.0))]
    path = write_dicom_seg(label, files, tmp_path / "real_seg.dcm", segments)
    np.testing.assert_array_equal(read_seg_label(path, files, segments), label)
    expected = {
        pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
        for f in files
    }
    assert referenced_uids(path) == expected


# ----------------------------------------------------------------------------- boxes


def sample_boxes():
    boxes = np.array([[10.5, -20.0, 33.0, 4.0, 5.0, 6.0], [-1.0, 2.0, -3.0, 1.0, 1.5, 2.5]])
    return boxes, np.array([0.91, 0.25]), np.array([0, 1])


def test_boxes_json_round_trip_and_convention(tmp_path):
    boxes, scores, labels = sample_boxes()
    path = write_boxes_json(
        boxes,
        scores,
        labels,
        tmp_path / "case.json",
        image_path_name="case_000",
        label_names=LABEL_NAMES,
    )
    document = json.loads(path.read_text())
    assert (document["box_mode"], document["box_space"], document["box_units"]) == (
        "cccwhd",
        "LPS",
        "mm",
    )
    assert document["image"] == "case_000"
    assert [b["label_name"] for b in document["boxes"]] == ["tumour", "node"]
    got_boxes, got_scores, got_labels = read_boxes_json(path)
    np.testing.assert_array_equal(got_boxes, boxes)
    np.testing.assert_array_equal(got_scores, scores)
    np.testing.assert_array_equal(got_labels, labels)


def test_boxes_json_empty_and_errors(tmp_path):
    path = write_boxes_json(
        np.zeros((0, 6)),
        np.zeros(0),
        np.zeros(0, dtype=int),
        tmp_path / "none.json",
        image_path_name=None,
        label_names={},
    )
    assert read_boxes_json(path)[0].shape == (0, 6)
    boxes, scores, labels = sample_boxes()
    bad = [
        ((boxes[:, :4], scores, labels, LABEL_NAMES), r"\(N, 6\)"),
        ((boxes, scores[:1], labels, LABEL_NAMES), "scores"),
        ((boxes, scores, labels, {0: "tumour"}), "label 1 has no entry"),
        ((boxes * [1, 1, 1, -1, 1, 1], scores, labels, LABEL_NAMES), "negative sizes"),
        ((boxes, scores, np.array([0.5, 1.0]), LABEL_NAMES), "integers"),
    ]
    for (b, s, lab, names), reason in bad:
        with pytest.raises(InputError, match=reason):
            write_boxes_json(
                b, s, lab, tmp_path / "bad.json", image_path_name=None, label_names=names
            )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none.json"]


def test_markups_roi_file_follows_schema_and_round_trips(tmp_path):
    boxes, scores, labels = sample_boxes()
    path = write_markups_roi(boxes, scores, labels, tmp_path / "case.mrk.json", LABEL_NAMES)
    document = json.loads(path.read_text())
    jsonschema.validate(document, MARKUPS_SCHEMA_SUBSET)
    assert document["@schema"] == MARKUPS_SCHEMA
    assert len(document["markups"]) == 2
    roi = document["markups"][0]
    assert (roi["type"], roi["roiType"], roi["coordinateSystem"], roi["coordinateUnits"]) == (
        "ROI",
        "Box",
        "LPS",
        "mm",
    )
    assert roi["name"] == "tumour-1" and roi["description"] == "score=0.9100"
    assert roi["controlPoints"][0]["position"] == roi["center"] == list(boxes[0, :3])
    assert roi["size"] == list(boxes[0, 3:])
    np.testing.assert_allclose(read_markups_roi(path), boxes)


def test_read_markups_roi_ras_and_rotated(tmp_path):
    c, s = np.cos(0.5), np.sin(0.5)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    markup = {
        "type": "ROI",
        "coordinateSystem": "RAS",
        "center": [1.0, 2.0, 3.0],
        "size": [4.0, 2.0, 1.0],
        "orientation": rotation.ravel().tolist(),
    }
    path = tmp_path / "ras.mrk.json"
    path.write_text(json.dumps({"@schema": MARKUPS_SCHEMA, "markups": [markup]}))
    (box,) = read_markups_roi(path)
    np.testing.assert_allclose(box[:3], [-1.0, -2.0, 3.0])
    np.testing.assert_allclose(box[3:], np.abs(rotation) @ [4.0, 2.0, 1.0])


def test_markups_roi_bad_inputs(tmp_path):
    boxes, scores, labels = sample_boxes()
    with pytest.raises(InputError, match=".mrk.json"):
        write_markups_roi(boxes, scores, labels, tmp_path / "case.json", LABEL_NAMES)
    with pytest.raises(InputError, match="non-finite"):
        write_markups_roi(boxes * np.nan, scores, labels, tmp_path / "a.mrk.json", LABEL_NAMES)
    assert_nothing_left(tmp_path)
    (tmp_path / "x.mrk.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not an object"):
        read_markups_roi(tmp_path / "x.mrk.json")


# ----------------------------------------------------------------------------- box geometry


def flipped_permuted_affine() -> np.ndarray:
    """Axis-aligned RAS affine with a flip, an axis permutation and anisotropic spacing."""
    affine = np.zeros((4, 4))
    affine[0, 1], affine[1, 0], affine[2, 2], affine[3, 3] = -0.8, 1.2, 3.0, 1.0
    affine[:3, 3] = [40.0, -12.0, 7.0]
    return affine


def test_single_voxel_box_maps_to_unit_image_box():
    affine = flipped_permuted_affine()
    label = np.zeros((9, 8, 7), dtype=np.uint8)
    label[3, 4, 5] = 1
    world, _, _ = boxes_from_label(label, affine)
    np.testing.assert_allclose(world_to_image_boxes(world, affine), [[3, 4, 5, 1, 1, 1]], atol=1e-9)


def test_box_round_trip_exact_on_axis_aligned_affine():
    boxes = sample_boxes()[0]
    affine = flipped_permuted_affine()
    image = world_to_image_boxes(boxes, affine)
    np.testing.assert_allclose(image[0, 3:], [5.0 / 1.2, 4.0 / 0.8, 6.0 / 3.0])
    np.testing.assert_allclose(image_to_world_boxes(image, affine), boxes, atol=1e-9)


def test_box_round_trip_oblique_affine_centres_exact_sizes_grow():
    boxes = sample_boxes()[0]
    affine = rotated_affine(angle=0.4)
    back = image_to_world_boxes(world_to_image_boxes(boxes, affine), affine)
    np.testing.assert_allclose(back[:, :3], boxes[:, :3], atol=1e-6)
    assert (back[:, 3:] >= boxes[:, 3:] - 1e-9).all()
    assert (back[:, 3:5] > boxes[:, 3:5] + 1e-3).all()  # x, y extents grow under rotation
    np.testing.assert_allclose(back[:, 5], boxes[:, 5], atol=1e-9)  # rotation about z only
