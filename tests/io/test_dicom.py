"""DICOM series scanning: grouping, ordering by position, irregular geometry, privacy."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from monai_mask.errors import InputError
from monai_mask.io.dicom import is_dicom_file, scan_dicom, slice_geometry
from monai_mask.privacy import PHI_TAGS, pseudonymize, series_pseudonym
from tests.io.conftest import PATIENT_ID, SECRETS, series_positions, write_dicom_series

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"


def _assert_no_phi(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def test_shuffled_files_are_ordered_by_position(shuffled_series):
    (series,) = scan_dicom(shuffled_series.folder)
    z = series.positions[:, 2]
    assert np.all(np.diff(z) > 0)
    names = [f.name for f in series.files]
    assert names != sorted(names)  # the order does not come from file names
    assert series.n_slices == 8 and (series.rows, series.cols) == (12, 16)
    assert series.pixel_spacing == (0.8, 0.7)
    assert series.slice_spacing == pytest.approx(2.0)  # from positions, not SliceThickness=5
    assert series.uid == shuffled_series.uid and series.modality == "CT"
    assert series.warnings == [] and series.errors == []


def test_affine_from_orientation_and_positions(ct_series):
    (series,) = scan_dicom(ct_series.folder)
    np.testing.assert_allclose(series.affine(), ct_series.affine, atol=1e-9)
    lps = series.affine_lps()
    np.testing.assert_allclose(lps[:3, 3], series.positions[0])


def test_two_series_in_one_folder(tmp_path):
    a = write_dicom_series(tmp_path / "mixed", prefix="A")
    b = write_dicom_series(tmp_path / "mixed", prefix="B", shape=(16, 12, 5))
    series = scan_dicom(tmp_path / "mixed")
    assert sorted(s.uid for s in series) == sorted([a.uid, b.uid])
    assert sorted(s.n_slices for s in series) == [5, 8]
    assert [s.case_id for s in series] == [s.case_id for s in scan_dicom(tmp_path / "mixed")]


def test_series_split_across_folders_is_grouped(tmp_path):
    written = write_dicom_series(tmp_path / "study" / "part1", shuffle_seed=3)
    (tmp_path / "study" / "part2").mkdir()
    for f in written.files[::2]:
        shutil.move(f, tmp_path / "study" / "part2" / f.name)
    (series,) = scan_dicom(tmp_path / "study")
    assert series.n_slices == 8 and series.folder == tmp_path / "study"
    (tmp_path / "study" / "notes.txt").write_text("not dicom")
    with pytest.raises(InputError, match="no DICOM image found among 1 file"):
        scan_dicom(tmp_path / "study", recursive=False)


def test_files_without_extension_and_junk(tmp_path):
    written = write_dicom_series(tmp_path / "noext", ext="")
    (tmp_path / "noext" / "LICENSE").write_text("text " * 100)
    (tmp_path / "noext" / "meta.json").write_text("{}")
    (tmp_path / "noext" / "._IM0000").write_bytes(b"\0" * 200)
    assert all(is_dicom_file(f) for f in written.files)
    assert not is_dicom_file(tmp_path / "noext" / "LICENSE")
    (series,) = scan_dicom(tmp_path / "noext")
    assert sorted(series.files) == sorted(written.files)


def test_missing_slice_is_reported(tmp_path):
    written = write_dicom_series(tmp_path / "gap", keep=[0, 1, 2, 4, 5, 6, 7])
    (series,) = scan_dicom(written.folder)
    assert series.slice_spacing == pytest.approx(2.0)
    assert any("missing slices" in w for w in series.irregular)
    assert series.irregular == [w for w in series.warnings if w in series.irregular]


def test_gantry_tilt_is_reported(tmp_path):
    positions = series_positions(8)
    positions[:, 1] += np.arange(8) * 2.0 * np.tan(np.radians(15))  # step drifts along y
    (series,) = scan_dicom(write_dicom_series(tmp_path / "tilt", positions=positions).folder)
    (message,) = series.irregular
    assert "gantry tilt" in message and "15.00 degrees" in message
    assert series.slice_spacing == pytest.approx(2.0)  # distance along the normal
    np.testing.assert_allclose(series.step, positions[1] - positions[0])  # sheared column


def test_non_uniform_spacing_is_reported(tmp_path):
    positions = series_positions(8)
    positions[5:, 2] += 0.3  # one step of 2.3 mm among 2.0 mm steps
    (series,) = scan_dicom(write_dicom_series(tmp_path / "nonuni", positions=positions).folder)
    (message,) = series.irregular
    assert "non-uniform slice spacing" in message


def test_duplicate_positions_are_reported(tmp_path):
    positions = series_positions(8)
    positions[4] = positions[3]
    (series,) = scan_dicom(write_dicom_series(tmp_path / "dup", positions=positions).folder)
    assert any("duplicate slice positions" in w for w in series.irregular)
    assert len(series.duplicates) == 1 and len(series.unique_files()) == 7


def test_mixed_image_sizes_are_an_error(tmp_path):
    written = write_dicom_series(tmp_path / "sizes", rows_cols=(10, 10))
    (series,) = scan_dicom(written.folder)
    assert any("mixed series" in e for e in series.errors)


def test_missing_series_uid_groups_by_folder(tmp_path):
    import pydicom

    written = write_dicom_series(tmp_path / "anon")
    for f in written.files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = ""
        ds.save_as(f)
    (series,) = scan_dicom(written.folder)
    assert series.uid is None and series.n_slices == 8
    assert any("no SeriesInstanceUID" in w for w in series.warnings)


def test_pseudonyms_and_no_phi(ct_series):
    (series,) = scan_dicom(ct_series.folder)
    assert series.patient_key == pseudonymize(PATIENT_ID)
    assert series.patient_key.startswith("P") and len(series.patient_key) == 13
    assert series.case_id == series_pseudonym(ct_series.uid)
    assert series.case_id.startswith("S") and len(series.case_id) == 13
    _assert_no_phi(repr(series) + " ".join(series.warnings) + series.key)
    assert {"PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"} <= set(PHI_TAGS)


def test_pseudonymize_is_keyed_and_stable():
    assert pseudonymize("x") == pseudonymize("x") != pseudonymize("y")
    assert pseudonymize("x", salt="other") != pseudonymize("x")


@pytest.mark.parametrize("content", [None, b"", b"\0" * 128 + b"DICM" + b"\x02\x00garbage"])
def test_bad_folders_and_corrupt_files(tmp_path, content):
    folder = tmp_path / "bad"
    folder.mkdir()
    if content is not None:
        (folder / "x.dcm").write_bytes(content)
    with pytest.raises(InputError) as err:
        scan_dicom(folder)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_slice_geometry_oblique_reverse_order():
    iop = np.array([0.0, 1, 0, 0, 0, -1])  # sagittal: normal along -x
    positions = series_positions(6, orientation=iop, dz=1.5)[::-1]  # written backwards
    geo = slice_geometry(positions, iop)
    np.testing.assert_allclose(geo.normal, [-1, 0, 0])
    np.testing.assert_array_equal(geo.order, np.arange(6)[::-1])
    assert geo.spacing == pytest.approx(1.5) and geo.irregular == []


def test_real_ct_series_headers():
    folder = REAL / "ct_dicom_series"
    if not folder.is_dir():
        pytest.skip("real data not available")
    (series,) = scan_dicom(folder)
    assert series.n_slices == 20 and (series.rows, series.cols) == (512, 512)
    assert series.slice_spacing == pytest.approx(2.0)
    assert np.all(np.diff(series.positions[:, 2]) > 0)
    assert series.irregular == [] and series.errors == []
