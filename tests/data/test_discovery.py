"""Discovery of images (files and DICOM series) and label pairing, headers only."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from monai_mask.data.discovery import discover_images, load_source, pair_labels
from monai_mask.errors import InputError
from monai_mask.privacy import pseudonymize, series_pseudonym
from tests.io.conftest import (
    PATIENT_ID,
    SECRETS,
    rotated_affine,
    write_dicom_series,
    write_itk,
    write_nifti,
)

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
ARRAY = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)


@pytest.fixture
def mixed_tree(tmp_path: Path) -> dict:
    """Files of every kind, two DICOM series (one split across folders) and junk."""
    root = tmp_path / "studies"
    (root / "nifti").mkdir(parents=True)
    write_nifti(root / "nifti" / "case_000.nii.gz", ARRAY, rotated_affine())
    write_nifti(root / "nifti" / "case_001.nii", ARRAY, rotated_affine())
    write_itk(root / "case_002.nrrd", ARRAY, rotated_affine())
    write_itk(root / "case_003.mha", ARRAY, rotated_affine())
    a = write_dicom_series(root / "dicom" / "a", ext="")
    b = write_dicom_series(root / "dicom" / "b" / "part1", shuffle_seed=2)
    (root / "dicom" / "b" / "part2").mkdir()
    for f in b.files[:4]:
        shutil.move(f, root / "dicom" / "b" / "part2" / f.name)
    for junk in ("dataset.json", "README.txt", "LICENSE", "._case_000.nii.gz", ".hidden.nii"):
        (root / "nifti" / junk).write_bytes(b"junk" * 50)
    return {"root": root, "a": a, "b": b}


def test_discovers_every_kind_and_ignores_junk(mixed_tree):
    sources = discover_images(mixed_tree["root"])
    by_id = {s.case_id: s for s in sources}
    a, b = mixed_tree["a"], mixed_tree["b"]
    assert set(by_id) == {
        "case_000", "case_001", "case_002", "case_003",
        series_pseudonym(a.uid), series_pseudonym(b.uid),
    }  # fmt: skip
    assert [by_id[f"case_00{i}"].kind for i in range(4)] == ["nifti", "nifti", "nrrd", "mha"]
    assert by_id["case_002"].patient_key == "case_002" and by_id["case_002"].series is None
    dicom_b = by_id[series_pseudonym(b.uid)]
    assert dicom_b.kind == "dicom" and dicom_b.series.n_slices == 8  # grouped across folders
    assert dicom_b.path == mixed_tree["root"] / "dicom" / "b"
    assert dicom_b.patient_key == pseudonymize(PATIENT_ID)
    assert [s.case_id for s in discover_images(mixed_tree["root"])] == [s.case_id for s in sources]
    text = repr(sources)
    assert all(secret not in text for secret in SECRETS)


def test_load_source_reads_files_and_series(mixed_tree):
    for source in discover_images(mixed_tree["root"]):
        volume = load_source(source)
        assert volume.shape == ((16, 12, 8) if source.kind == "dicom" else (4, 5, 6))


def test_non_recursive(mixed_tree):
    sources = discover_images(mixed_tree["root"], recursive=False)
    assert [s.case_id for s in sources] == ["case_002", "case_003"]


def test_empty_and_imageless_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty folder") as err:
        discover_images(tmp_path / "empty")
    assert str(err.value).startswith(str(tmp_path / "empty"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no image found among 1 file"):
        discover_images(tmp_path / "junk")
    with pytest.raises(InputError, match="not a folder"):
        discover_images(tmp_path / "missing")


def test_duplicate_case_ids_raise(tmp_path):
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
        write_nifti(tmp_path / sub / "case_1.nii.gz", ARRAY, np.eye(4))
    with pytest.raises(InputError, match="duplicate case id 'case_1'"):
        discover_images(tmp_path)


def test_pair_labels_msd_and_nnunet(tmp_path):
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    images.mkdir()
    labels.mkdir()
    for name in ("la_001.nii.gz", "la_002.nii.gz", "lb_003_0000.nii.gz", "unlabelled.nii.gz"):
        write_nifti(images / name, ARRAY, np.eye(4))
    for name in ("la_001.nii.gz", "la_002.nii.gz", "lb_003.nii.gz"):
        write_nifti(labels / name, ARRAY, np.eye(4))
    (labels / "._la_001.nii.gz").write_bytes(b"\0" * 64)  # MSD junk
    (labels / "dataset.json").write_text("{}")
    pairs = pair_labels(discover_images(images), labels)
    assert pairs == {
        "la_001": labels / "la_001.nii.gz",
        "la_002": labels / "la_002.nii.gz",
        "lb_003_0000": labels / "lb_003.nii.gz",
    }


def test_pair_labels_errors(tmp_path):
    write_nifti(tmp_path / "x.nii.gz", ARRAY, np.eye(4))
    images = discover_images(tmp_path)
    (tmp_path / "labels").mkdir()
    with pytest.raises(InputError, match="no label file"):
        pair_labels(images, tmp_path / "labels")
    write_nifti(tmp_path / "labels" / "y.nii.gz", ARRAY, np.eye(4))
    with pytest.raises(InputError, match="no label matches"):
        pair_labels(images, tmp_path / "labels")


def test_real_hippocampus_pairs_all_cases():
    images_dir = REAL / "mri_hippocampus_msd" / "imagesTr"
    if not images_dir.is_dir():
        pytest.skip("real data not available")
    images = discover_images(images_dir)
    pairs = pair_labels(images, REAL / "mri_hippocampus_msd" / "labelsTr")
    assert len(images) == 260 and len(pairs) == 260
    assert all(pairs[s.case_id].name == s.path.name for s in images)


def test_real_ct_series_discovered():
    folder = REAL / "ct_dicom_series"
    if not folder.is_dir():
        pytest.skip("real data not available")
    (source,) = discover_images(folder)  # the LICENSE file is ignored
    assert source.kind == "dicom" and source.series.n_slices == 20
    assert source.case_id.startswith("S") and len(source.case_id) == 13
    assert source.patient_key == source.case_id  # anonymised: no patient identifier
