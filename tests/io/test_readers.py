"""Reading NIfTI/NRRD/MHA/DICOM into RAS ``Volume``s, bad input, save_nifti, check_label."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from monai_mask.errors import InputError
from monai_mask.io.dicom import scan_dicom
from monai_mask.io.readers import Volume, check_label, read_dicom_series, read_image, save_nifti
from monai_mask.privacy import pseudonymize
from tests.io.conftest import (
    LPS_TO_RAS,
    PATIENT_ID,
    SECRETS,
    series_positions,
    write_dicom_series,
    write_itk,
    write_nifti,
)

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"


def _real(relative: str) -> Path:
    path = REAL / relative
    if not path.exists():
        pytest.skip("real data not available")
    return path


def _sitk_affine_lps(image: sitk.Image) -> np.ndarray:
    affine = np.eye(4)
    direction = np.reshape(image.GetDirection(), (3, 3))
    affine[:3, :3] = direction * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return affine


# ----------------------------------------------------------------------------- DICOM


def test_dicom_series_reads_hu_and_affine(ct_series):
    volume = read_image(ct_series.folder)
    np.testing.assert_array_equal(volume.array, ct_series.hu)
    np.testing.assert_allclose(volume.affine, ct_series.affine, atol=1e-9)
    assert volume.shape == (16, 12, 8) and volume.spacing == pytest.approx((0.7, 0.8, 2.0))
    assert volume.modality == "CT" and volume.series_uid == ct_series.uid
    assert volume.patient_key == pseudonymize(PATIENT_ID)
    assert volume.source == str(ct_series.folder) and volume.warnings == []


def test_shuffled_and_extensionless_series_read_identically(ct_series, shuffled_series, tmp_path):
    noext = write_dicom_series(tmp_path / "noext", ext="", shuffle_seed=11)
    reference = read_image(ct_series.folder)
    for written in (shuffled_series, noext):
        volume = read_image(written.folder)
        np.testing.assert_array_equal(volume.array, reference.array)
        np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-9)


def test_oblique_series_matches_simpleitk_world_coordinates(tmp_path):
    a, b = np.radians(20), np.radians(-35)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    written = write_dicom_series(tmp_path / "oblique", orientation=(*row, *col), shuffle_seed=5)
    volume = read_image(written.folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(written.folder)))
    image = reader.Execute()
    ref = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in volume.shape], indexing="ij"), -1)
    ijk = ijk.reshape(-1, 3)
    world_lps = (LPS_TO_RAS @ volume.affine @ np.c_[ijk, np.ones(len(ijk))].T).T
    sitk_ijk = np.rint((np.linalg.inv(_sitk_affine_lps(image)) @ world_lps.T).T[:, :3])
    np.testing.assert_array_equal(volume.array[tuple(ijk.T)], ref[tuple(sitk_ijk.astype(int).T)])


def test_rescale_slope_intercept_per_slice(tmp_path):
    written = write_dicom_series(tmp_path / "rescale", slope=2.5, intercept=-1000.0)
    np.testing.assert_allclose(read_image(written.folder).array, written.hu)
    ds = pydicom.dcmread(written.files[3])
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024.25
    ds.save_as(written.files[3])
    array = read_image(written.folder).array
    expected = written.hu.copy()
    expected[:, :, 3] = (written.hu[:, :, 3] + 1000.0) / 2.5 * 0.5 - 1024.25
    np.testing.assert_allclose(array, expected, atol=1e-3)


def test_missing_slice_raises_unless_allowed(tmp_path):
    written = write_dicom_series(tmp_path / "gap", keep=[0, 1, 2, 4, 5, 6, 7])
    with pytest.raises(InputError, match="missing slices") as err:
        read_image(written.folder)
    assert str(written.folder) in str(err.value) and "allow_irregular" in str(err.value)
    volume = read_image(written.folder, allow_irregular=True)
    assert volume.shape == (16, 12, 7) and any("missing" in w for w in volume.warnings)
    assert volume.spacing[2] == pytest.approx(2.0)


def test_tilted_series_raises_unless_allowed(tmp_path):
    positions = series_positions(8)
    positions[:, 1] += np.arange(8) * 2.0 * np.tan(np.radians(10))
    written = write_dicom_series(tmp_path / "tilt", positions=positions)
    with pytest.raises(InputError, match="gantry tilt"):
        read_image(written.folder)
    volume = read_image(written.folder, allow_irregular=True)
    lps = LPS_TO_RAS @ volume.affine
    np.testing.assert_allclose(lps[:3, 2], positions[1] - positions[0], atol=1e-9)  # sheared
    np.testing.assert_array_equal(volume.array, written.hu)


def test_duplicate_positions_keep_one_slice_when_allowed(tmp_path):
    positions = series_positions(8)
    positions[4] = positions[3]
    written = write_dicom_series(tmp_path / "dup", positions=positions)
    with pytest.raises(InputError, match="duplicate slice positions"):
        read_image(written.folder)
    assert read_image(written.folder, allow_irregular=True).shape == (16, 12, 7)


def test_mixed_series_never_reads(tmp_path):
    written = write_dicom_series(tmp_path / "mixed", rows_cols=(10, 10))
    with pytest.raises(InputError, match="mixed series"):
        read_image(written.folder, allow_irregular=True)


def test_folder_with_two_series_raises(tmp_path):
    write_dicom_series(tmp_path / "two", prefix="A")
    write_dicom_series(tmp_path / "two", prefix="B")
    with pytest.raises(InputError, match="2 DICOM series") as err:
        read_image(tmp_path / "two")
    assert str(tmp_path / "two") in str(err.value)
    for series in scan_dicom(tmp_path / "two"):
        assert read_dicom_series(series).shape == (16, 12, 8)


def test_single_slice_is_2d(tmp_path):
    written = write_dicom_series(tmp_path / "one", keep=[0])
    with pytest.raises(InputError, match="2D"):
        read_image(written.folder)
    with pytest.raises(InputError, match="2D"):
        read_image(written.files[0])
    assert read_image(written.folder, expect_3d=False).shape == (16, 12, 1)


def test_truncated_dicom_pixels_name_the_file(ct_series):
    bad = ct_series.files[2]
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(InputError, match="cannot decode DICOM pixel data") as err:
        read_image(ct_series.folder)
    assert str(err.value).startswith(f"{bad}: ")


def test_no_phi_in_volume_or_errors(tmp_path, ct_series):
    texts = [repr(read_image(ct_series.folder))]
    gap = write_dicom_series(tmp_path / "gap", keep=[0, 2, 3])
    mixed = write_dicom_series(tmp_path / "mixed", rows_cols=(4, 4))
    for folder in (gap.folder, mixed.folder):
        with pytest.raises(InputError) as err:
            read_image(folder)
        texts.append(str(err.value))
    for secret in SECRETS:
        assert all(secret not in text for text in texts)


# ------------------------------------------------------------------ NIfTI / NRRD / MHA


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_itk_formats_read_like_nifti(tmp_path, volume_data, suffix):
    array, affine = volume_data
    nifti = read_image(write_nifti(tmp_path / "img.nii.gz", array, affine))
    other = read_image(write_itk(tmp_path / f"img{suffix}", array, affine))
    np.testing.assert_allclose(nifti.affine, affine, atol=1e-5)
    np.testing.assert_allclose(other.affine, nifti.affine, atol=1e-5)
    np.testing.assert_allclose(other.array, nifti.array, atol=1e-5)
    assert other.shape == (10, 9, 7) and other.modality is None and other.patient_key is None


def test_nifti_dimensions(tmp_path, volume_data):
    array, affine = volume_data
    squeezed = read_image(write_nifti(tmp_path / "a.nii", array[..., None], affine))
    assert squeezed.shape == (10, 9, 7) and squeezed.array.ndim == 3
    four_d = write_nifti(tmp_path / "b.nii.gz", np.stack([array, array], -1), affine)
    with pytest.raises(InputError, match="4D image"):
        read_image(four_d)
    assert read_image(four_d, expect_3d=False).array.shape == (10, 9, 7, 2)
    flat = write_nifti(tmp_path / "c.nii.gz", array[:, :, 0], affine)
    with pytest.raises(InputError, match="2D image"):
        read_image(flat)
    assert read_image(flat, expect_3d=False).shape == (10, 9, 1)


def test_non_finite_voxels(tmp_path, volume_data):
    array, affine = volume_data
    array = array.copy()
    array[1, 2, 3], array[0, 0, 0] = np.nan, np.inf
    path = write_nifti(tmp_path / "nan.nii.gz", array, affine)
    with pytest.raises(InputError, match="2 non-finite voxel"):
        read_image(path)
    assert np.isnan(read_image(path, check_finite=False).array[1, 2, 3])


def test_truncated_and_corrupt_files(tmp_path, volume_data):
    array, affine = volume_data
    good = write_nifti(tmp_path / "good.nii.gz", array, affine).read_bytes()
    cases = {
        "trunc.nii.gz": good[: len(good) // 2],
        "garbage.nii": b"not a nifti" * 40,
        "bad.nrrd": b"NRRD0004\ntype: float\ndimension: 3\nsizes: 10 9 7\n\n\0\0",
        "bad.mha": b"ObjectType = Image\nNDims = 3\n",
        "empty.nii.gz": gzip.compress(b""),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError) as err:
            read_image(tmp_path / name)
        message = str(err.value)
        assert message.startswith(str(tmp_path / name) + ": ") and "\n" not in message


def test_not_an_image_and_missing(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not an image"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty folder"):
        read_image(tmp_path / "empty")


# -------------------------------------------------------------------- save_nifti


def test_save_nifti_round_trip_atomic(tmp_path, volume_data):
    array, affine = volume_data
    volume = Volume(array=array, affine=affine, source="x")
    path = save_nifti(volume, tmp_path / "out.nii.gz")
    image = nib.load(path)
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    np.testing.assert_allclose(image.get_sform(), affine, atol=1e-6)
    np.testing.assert_allclose(image.get_qform(), affine, atol=1e-5)
    back = read_image(path)
    np.testing.assert_array_equal(back.array, array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]  # no temp left


def test_save_nifti_failure_leaves_nothing(tmp_path, volume_data):
    _, affine = volume_data
    with pytest.raises(InputError, match=r"\.nii"):
        save_nifti(Volume(np.zeros((2, 2, 2)), affine, "x"), tmp_path / "out.nrrd")
    bad = Volume(np.zeros((2, 2, 2), dtype=np.int64) + 2**40, affine, "x")
    with pytest.raises(InputError, match="int32"):
        save_nifti(bad, tmp_path / "big.nii")
    mask = Volume(np.ones((2, 2, 2), dtype=bool), affine, "x")
    assert read_image(save_nifti(mask, tmp_path / "m.nii")).array.dtype == np.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nii"]


# -------------------------------------------------------------------- check_label


def test_check_label(volume_data):
    array, affine = volume_data
    image = Volume(array, affine, "img.nii.gz")
    label = Volume((array > 0).astype(np.float32) * 2, affine + 1e-4, "lab.nii.gz")
    out = check_label(image, label)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 2}
    bad = {
        "shape": Volume(np.zeros((10, 9, 6)), affine, "lab.nii.gz"),
        "affine": Volume(np.zeros_like(array), affine + np.diag([0.1, 0, 0, 0]), "lab.nii.gz"),
        "not integers": Volume(np.full_like(array, 0.5), affine, "lab.nii.gz"),
        "negative": Volume(np.full(array.shape, -1, dtype=np.int16), affine, "lab.nii.gz"),
    }
    for reason, label in bad.items():
        with pytest.raises(InputError, match=reason) as err:
            check_label(image, label)
        assert str(err.value).startswith("lab.nii.gz: ")


# -------------------------------------------------------------------- real data


def test_real_ct_series_matches_simpleitk():
    folder = _real("ct_dicom_series")
    volume = read_image(folder)
    assert volume.shape == (512, 512, 20) and volume.modality == "CT"
    assert volume.spacing == pytest.approx((0.977, 0.977, 2.0), abs=0.01)
    assert (int(volume.array.min()), int(volume.array.max())) == (-1024, 1839)
    (series,) = scan_dicom(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in series.files])
    image = reader.Execute()
    np.testing.assert_allclose(image.GetOrigin(), (LPS_TO_RAS @ volume.affine)[:3, 3], atol=1e-4)
    np.testing.assert_allclose(_sitk_affine_lps(image), LPS_TO_RAS @ volume.affine, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), volume.array)


def test_real_nrrd_lesion_pair():
    image = read_image(_real("lesions_nrrd/lung1_image.nrrd"))
    label = read_image(_real("lesions_nrrd/lung1_label.nrrd"))
    assert image.shape == (512, 512, 48)
    assert image.spacing == pytest.approx((0.5703, 0.5703, 5.0), abs=1e-3)
    assert int(check_label(image, label).sum()) == 837


@pytest.mark.parametrize(
    ("name", "shape"),
    [("ct_abdomen.nii.gz", (122, 101, 112)), ("mr_abdomen.nii.gz", (117, 91, 20))],
)
def test_real_unlabeled_nifti(name, shape):
    volume = read_image(_real(f"unlabeled_nifti/{name}"))
    assert volume.shape == shape and volume.spacing == pytest.approx((3.0, 3.0, 3.0), abs=0.01)
