"""Privacy audit: DICOM identifiers never reach logs, datalists, file names or outputs.

Three CT phantoms are written as DICOM series carrying distinctive fake identifiers, then go
through the whole pipeline as ``monai-mask`` subprocesses: prepare -> pretrain (1 epoch) ->
finetune (1 epoch) -> segment (NIfTI, .seg.nrrd and DICOM-SEG). Every file under the output
folders (decompressed when gzip), every file name and every captured stdout/stderr is searched
for the identifiers (case-insensitive, with and without carets); only ``pseudonym_map.csv``,
written when ``--pseudonym-map`` is asked for, may hold the PatientID.

DICOM-SEG contract checked here (see docs/outputs.md): the SEG references the study, so
StudyInstanceUID (Type 1), FrameOfReferenceUID and the source SOP Instance UIDs are kept;
PatientName and PatientID are the patient's pseudonym (the datalist's ``patient``); the other
Type 2 Patient / General Study attributes (PatientBirthDate, PatientSex, StudyDate, StudyTime,
ReferringPhysicianName, StudyID, AccessionNumber) are present and empty; no other PHI tag.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from monai_mask.data.synthetic import generate_case
from monai_mask.io.dicom import scan_dicom
from monai_mask.io.readers import read_image
from monai_mask.privacy import PHI_TAGS, pseudonymize

pytestmark = [pytest.mark.slow, pytest.mark.bundle]
REPO = Path(__file__).resolve().parents[2]

IDENTIFIERS = {
    "PatientName": "ZZTOPSECRET^PATIENT",
    "PatientID": "PID-8731-UNIQUE",
    "AccessionNumber": "ACC-5521-UNIQUE",
    "PatientBirthDate": "19450317",
    "InstitutionName": "ZZSECRET GENERAL HOSPITAL",
    "StudyID": "STU-6642",
    "ReferringPhysicianName": "ZZREFDOC^HOUSE",
    "OperatorsName": "ZZOPERATOR^ONE",
    "PatientAddress": "12 ZZSECRETSTREET",
}
#: lower-case needles: each identifier, its caret-free forms and distinctive fragments
NEEDLES = sorted({
    form.lower()
    for value in IDENTIFIERS.values()
    for form in (value, value.replace("^", " "), value.replace("^", ""), *value.split("^"))
    if len(form) >= 6 and form.upper() not in ("PATIENT", "HOUSE")
} | {"1945-03-17", "zztopsecret", "pid-8731", "8731-unique", "acc-5521", "zzsecret"})
SHAPE = (40, 40, 32)
TYPE2_EMPTY = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _write_series(folder: Path, hu: np.ndarray, spacing, patient: int) -> None:
    """Axial CT series of ``hu`` (X, Y, Z) with the fake identifiers (PatientID per patient)."""
    folder.mkdir(parents=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"IM{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        for keyword, value in IDENTIFIERS.items():
            setattr(ds, keyword, value)
        ds.PatientID = f"{IDENTIFIERS['PatientID']}-{patient}"
        ds.PatientSex, ds.StudyDate, ds.StudyTime = "F", "20240102", "101500"
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series, study
        ds.FrameOfReferenceUID, ds.SeriesNumber, ds.InstanceNumber = frame, 1, k + 1
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[2])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray((hu[:, :, k].T + 1024).astype(np.int16)).tobytes()
        pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _write_inputs(root: Path) -> None:
    """Three patients' DICOM series and their labels (named by the series' pseudonymous id)."""
    for n in range(3):
        case = generate_case(100 + n, "ct", SHAPE, n_tumours=1)
        spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
        folder = root / "dicom" / f"series_{n}"
        _write_series(folder, case.image.astype(np.float64), spacing, n)
        volume = read_image(folder)
        np.testing.assert_array_equal(volume.array, case.image)
        case_id = scan_dicom(folder)[0].case_id
        (root / "labels").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(case.label, volume.affine), root / "labels" / f"{case_id}.nii.gz")


def _cli(log: list[str], *argv: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "monai_mask", *argv], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    log += [proc.stdout, proc.stderr]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _leaks(text: str) -> list[str]:
    low = text.lower()
    return [n for n in NEEDLES if n in low]


def _file_text(path: Path) -> str:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("latin-1")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """prepare -> pretrain -> finetune -> segment; returns (root, captured streams)."""
    root = tmp_path_factory.mktemp("privacy")
    _write_inputs(root)
    log: list[str] = []
    prep, pre, ft, seg = (root / "out" / d for d in ("prepared", "pretrain", "finetune", "seg"))
    _cli(log, "prepare", "--images", str(root / "dicom"), "--labels", str(root / "labels"),
         "--out", str(prep), "--convert-dicom", "--folds", "2")
    _cli(log, "pretrain", "--prepared", str(prep), "--out", str(pre), "--epochs", "1",
         "--set", "preview_interval=1")
    _cli(log, "finetune", "--prepared", str(prep), "--out", str(ft), "--epochs", "1",
         "--pretrained", str(pre / "models" / "model.pt"), "--set", "sw_overlap=0.25")
    _cli(log, "segment", "--input", str(root / "dicom" / "series_0"), "--model",
         str(ft / "models" / "model.pt"), "--prepared", str(prep), "--out", str(seg),
         "--set", "sw_overlap=0.25")
    _cli(log, "prepare", "--images", str(root / "dicom"), "--out", str(root / "out" / "mapped"),
         "--folds", "2", "--pseudonym-map")
    return root, log


def test_inputs_carry_the_identifiers(pipeline):
    root, _ = pipeline
    ds = pydicom.dcmread(next((root / "dicom" / "series_0").iterdir()))
    assert _leaks(str(ds)) and str(ds.PatientName) == IDENTIFIERS["PatientName"]


def test_no_identifier_in_any_output_file_name_or_stream(pipeline):
    root, log = pipeline
    files = [p for p in (root / "out").rglob("*") if p.is_file()]
    kinds = {p.name.split(".", 1)[-1] for p in files}
    assert {"json", "csv", "nii.gz", "seg.nrrd", "dcm", "pt", "png"} <= kinds, kinds
    assert any("tfevents" in p.name for p in files)
    found = {}
    for path in files:
        leaks = _leaks(str(path.relative_to(root)))
        if path.name != "pseudonym_map.csv":
            leaks += _leaks(_file_text(path))
        if leaks:
            found[str(path.relative_to(root))] = leaks
    for n, text in enumerate(log):
        if _leaks(text):
            found[f"stream {n}"] = _leaks(text)
    assert found == {}


def test_pseudonym_map_only_when_asked(pipeline):
    root, _ = pipeline
    maps = sorted(p.relative_to(root) for p in (root / "out").rglob("pseudonym_map.csv"))
    assert maps == [Path("out/mapped/pseudonym_map.csv")]
    text = (root / "out" / "mapped" / "pseudonym_map.csv").read_text()
    for n in range(3):
        pid = f"{IDENTIFIERS['PatientID']}-{n}"
        assert f"{pseudonymize(pid)}," in text and pid in text
    assert "zztopsecret" not in text.lower()  # the map links pseudonym to PatientID only


def test_dicom_seg_carries_only_the_required_patient_and_study_attributes(pipeline):
    root, _ = pipeline
    (seg_file,) = (root / "out" / "seg").glob("*.dcm")
    seg = pydicom.dcmread(seg_file)
    source = pydicom.dcmread(root / "dicom" / "series_0" / "IM0000.dcm")
    pseudonym = pseudonymize(str(source.PatientID))
    assert str(seg.PatientName) == seg.PatientID == pseudonym
    datalist = json.loads((root / "out" / "prepared" / "datalist.json").read_text())
    assert pseudonym in {e["patient"] for e in datalist["training"]}
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    for keyword in TYPE2_EMPTY:
        assert keyword in seg and str(seg.get(keyword)) == "", keyword
    for keyword in set(PHI_TAGS) - {"PatientName", "PatientID", *TYPE2_EMPTY}:
        assert keyword not in seg, keyword
    assert not _leaks(str(seg))
