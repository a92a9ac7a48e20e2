"""`monai-mask prepare`: real data, bad inputs, --skip-bad, privacy."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_mask.cli.main import main
from tests.io.conftest import SECRETS, series_positions, write_dicom_series

OUTPUTS = ("datalist.json", "fingerprint.json", "plan.json")


def _nifti(path: Path, array, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), path)
    return path


def _case(root: Path, name: str, shape=(20, 20, 12), label=True, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(40, 10, shape).astype(np.float32)
    img[:3] = -1000
    _nifti(root / "images" / f"{name}.nii.gz", img)
    if label:
        lab = np.zeros(shape, np.uint8)
        lab[8:12, 8:12, 4:8] = 1
        _nifti(root / "labels" / f"{name}.nii.gz", lab)


def _run(capsys, *args) -> tuple[int, str]:
    code = main(["prepare", *map(str, args)])
    return code, capsys.readouterr().err.strip()


def _assert_clean_failure(code: int, err: str, out: Path, needle: str, reason: str):
    assert code == 2
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0] == err.splitlines()[-1], err  # one line, the last
    assert lines[0].startswith("monai-mask prepare: error: ")
    assert needle in lines[0] and reason in lines[0].lower(), err
    assert not any((out / name).exists() for name in OUTPUTS)


def test_prepare_good_dataset(tmp_path, capsys):
    for i in range(4):
        _case(tmp_path, f"case_{i:03d}", seed=i)
    code, _ = _run(capsys, "--images", tmp_path / "images", "--labels", tmp_path / "labels",
                   "--out", tmp_path / "out", "--folds", "2")
    assert code == 0
    dl = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert dl["numTraining"] == 4 and dl["numLabelled"] == 4
    assert {d["fold"] for d in dl["training"]} == {0, 1}
    assert all(len(d["box"]) == 1 and d["box_label"] == [0] for d in dl["training"])
    assert dl["box_space"] == "LPS" and dl["box_mode"] == "cccwhd"
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["modality"] == "CT" and plan["normalisation"]["CT"]["scheme"] == "ct_clip_zscore"
    # the datalist's relative paths resolve from the datalist's folder
    assert (tmp_path / "out" / dl["training"][0]["image"]).resolve().is_file()


BAD_CASES = {
    "corrupt": ("corrupt.nii.gz", "read"),
    "truncated": ("truncated.nii.gz", ""),
    "two_d": ("two_d.nii.gz", "3d"),
    "four_d": ("four_d.nii.gz", "3d"),
    "nan": ("nan.nii.gz", "nan"),
    "label_shape": ("label_shape.nii.gz", "shape"),
    "label_affine": ("label_affine.nii.gz", "affine"),
    "label_float": ("label_float.nii.gz", "integer"),
}


def _make_bad(root: Path, kind: str) -> None:
    images, labels = root / "images", root / "labels"
    good = np.random.default_rng(0).normal(0, 1, (16, 16, 8)).astype(np.float32)
    if kind == "corrupt":
        images.mkdir(parents=True)
        (images / "corrupt.nii.gz").write_bytes(b"this is not an image" * 20)
    elif kind == "truncated":
        path = _nifti(images / "truncated.nii.gz", good)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif kind == "two_d":
        _nifti(images / "two_d.nii.gz", good[:, :, 0])
    elif kind == "four_d":
        _nifti(images / "four_d.nii.gz", np.stack([good, good], axis=-1))
    elif kind == "nan":
        good[3, 3, 3] = np.nan
        _nifti(images / "nan.nii.gz", good)
    else:
        name = f"{kind}.nii.gz"
        _nifti(images / name, good)
        lab = np.zeros(good.shape, np.float32)
        affine = np.eye(4)
        if kind == "label_shape":
            lab = lab[:, :, :6]
        elif kind == "label_affine":
            affine = np.diag([2.0, 1.0, 1.0, 1.0])
        else:
            lab[2, 2, 2] = 0.5
        _nifti(labels / name, lab, affine)


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_input_fails_cleanly(tmp_path, capsys, kind):
    _make_bad(tmp_path, kind)
    args = ["--images", tmp_path / "images", "--out", tmp_path / "out"]
    if (tmp_path / "labels").exists():
        args += ["--labels", tmp_path / "labels"]
    code, err = _run(capsys, *args)
    name, reason = BAD_CASES[kind]
    _assert_clean_failure(code, err, tmp_path / "out", name, reason)


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    code, err = _run(capsys, "--images", tmp_path / "images", "--out", tmp_path / "out")
    _assert_clean_failure(code, err, tmp_path / "out", "images", "")


def test_mixed_series_and_missing_slices(tmp_path, capsys):
    write_dicom_series(tmp_path / "images" / "mixed", rows_cols=(10, 10))
    code, err = _run(capsys, "--images", tmp_path / "images", "--out", tmp_path / "out")
    _assert_clean_failure(code, err, tmp_path / "out", "mixed", "mixed")
    write_dicom_series(tmp_path / "gap" / "s", keep=[0, 1, 2, 4, 5, 6, 7])
    code, err = _run(capsys, "--images", tmp_path / "gap", "--out", tmp_path / "out")
    _assert_clean_failure(code, err, tmp_path / "out", "gap", "missing")


def test_skip_bad_goes_on_and_reports(tmp_path, capsys):
    for i in range(3):
        _case(tmp_path, f"case_{i:03d}", label=False, seed=i)
    _make_bad(tmp_path, "nan")
    code = main(["prepare", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "o"),
                 "--skip-bad"])
    out = capsys.readouterr().out
    assert code == 0
    dl = json.loads((tmp_path / "o" / "datalist.json").read_text())
    assert dl["numTraining"] == 3 and len(dl["skipped"]) == 1 and "nan.nii.gz" in dl["skipped"][0]
    assert "skipped: " in out and "nan.nii.gz" in out


def test_dicom_privacy_and_pseudonym_map(tmp_path, capsys):
    images = tmp_path / "images"
    write_dicom_series(images / "a")
    write_dicom_series(images / "b", positions=series_positions(8, origin=(0.0, 0.0, 0.0)))
    code = main(["prepare", "--images", str(images), "--out", str(tmp_path / "o"),
                 "--convert-dicom"])
    log = capsys.readouterr()
    assert code == 0
    texts = [log.out, log.err] + [p.read_text() for p in (tmp_path / "o").glob("*.json")]
    names = [p.name for p in (tmp_path / "o").rglob("*")]
    for secret in SECRETS:
        assert not any(secret in t for t in texts + names), secret
    assert len(list((tmp_path / "o" / "images").glob("*.nii.gz"))) == 2
    assert not (tmp_path / "o" / "pseudonym_map.csv").exists()
    code = main(["prepare", "--images", str(images), "--out", str(tmp_path / "p"),
                 "--convert-dicom", "--pseudonym-map"])
    assert code == 0
    assert "PID-9999-SECRET" in (tmp_path / "p" / "pseudonym_map.csv").read_text()
    for p in (tmp_path / "p").glob("*.json"):
        assert "SECRET" not in p.read_text()


def test_console_script_exit_code(tmp_path):
    """The installed entry point itself: one line on stderr, exit status 2."""
    (tmp_path / "images").mkdir()
    proc = subprocess.run([sys.executable, "-m", "monai_mask", "prepare", "--images",
                           str(tmp_path / "images"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("monai-mask prepare: error:")


# ------------------------------------------------------------------ real data (../shared)
def test_real_unlabeled_nifti(real_data, tmp_path, capsys):
    code, _ = _run(capsys, "--images", real_data / "unlabeled_nifti", "--out", tmp_path)
    assert code == 0
    fp = json.loads((tmp_path / "fingerprint.json").read_text())
    by_id = {c["case_id"]: c for c in fp["cases"]}
    for name in ("ct_abdomen", "mr_abdomen"):
        img = nib.load(real_data / "unlabeled_nifti" / f"{name}.nii.gz")
        assert by_id[name]["shape"] == list(img.shape)
        assert by_id[name]["spacing"] == pytest.approx(img.header.get_zooms()[:3], abs=1e-4)
    assert by_id["ct_abdomen"]["modality"] == "CT" and by_id["mr_abdomen"]["modality"] == "MR"
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert set(plan["normalisation"]) == {"CT", "MR"}


def test_real_dicom_series(real_data, tmp_path, capsys):
    code, _ = _run(capsys, "--images", real_data / "ct_dicom_series", "--out", tmp_path,
                   "--convert-dicom")
    assert code == 0
    case = json.loads((tmp_path / "fingerprint.json").read_text())["cases"][0]
    assert case["shape"] == [512, 512, 20]
    assert case["spacing"] == pytest.approx([0.977, 0.977, 2.0], abs=0.001)
    assert (case["intensity_min"], case["intensity_max"]) == (-1024.0, 1839.0)
    assert case["modality"] == "CT"
    nifti = next((tmp_path / "images").glob("*.nii.gz"))
    assert nib.load(nifti).shape == (512, 512, 20)


def test_real_hippocampus_pairs_all(real_data, tmp_path, capsys):
    msd = real_data / "mri_hippocampus_msd"
    code, _ = _run(capsys, "--images", msd / "imagesTr", "--labels", msd / "labelsTr",
                   "--out", tmp_path)
    assert code == 0
    dl = json.loads((tmp_path / "datalist.json").read_text())
    assert dl["numTraining"] == 260 and dl["numLabelled"] == 260
    fp = json.loads((tmp_path / "fingerprint.json").read_text())
    for case in fp["cases"][:20]:
        img = nib.load(msd / "imagesTr" / f"{case['case_id']}.nii.gz")
        assert case["shape"] == list(img.shape)
        assert case["labels_present"] == [0, 1, 2]
    assert fp["median_spacing"] == pytest.approx([1.0, 1.0, 1.0])


def test_truncated_gzip_really_is_truncated(tmp_path):
    """Guard for the fixture above: the truncated file must not decompress."""
    _make_bad(tmp_path, "truncated")
    with pytest.raises((EOFError, OSError)):
        gzip.decompress((tmp_path / "images" / "truncated.nii.gz").read_bytes())


def test_holdout_and_several_image_folders(tmp_path, capsys):
    for i in range(4):
        _case(tmp_path / "a", f"case_{i:03d}", seed=i)
    _case(tmp_path / "b", "extra_000", label=False, seed=9)
    (tmp_path / "holdout.txt").write_text("# test split\ncase_001\ncase_003\n")
    code, _ = _run(capsys, "--images", tmp_path / "a" / "images", tmp_path / "b" / "images",
                   "--labels", tmp_path / "a" / "labels", "--out", tmp_path / "out",
                   "--holdout", tmp_path / "holdout.txt", "--folds", "2")
    assert code == 0
    dl = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert sorted(d["case_id"] for d in dl["training"]) == ["case_000", "case_002", "extra_000"]
    assert sorted(d["case_id"] for d in dl["test"]) == ["case_001", "case_003"]
    assert all("label" in d and "fold" not in d for d in dl["test"])
    fp = json.loads((tmp_path / "out" / "fingerprint.json").read_text())
    assert fp["n_cases"] == 3  # held-out cases stay out of the fingerprint and plan


def test_holdout_unknown_case_and_duplicate_ids(tmp_path, capsys):
    _case(tmp_path / "a", "case_000")
    _case(tmp_path / "b", "case_000")
    (tmp_path / "h.txt").write_text("nope_123\n")
    code, err = _run(capsys, "--images", tmp_path / "a" / "images", "--out", tmp_path / "o",
                     "--holdout", tmp_path / "h.txt")
    _assert_clean_failure(code, err, tmp_path / "o", "h.txt", "not found")
    code, err = _run(capsys, "--images", tmp_path / "a" / "images", tmp_path / "b" / "images",
                     "--out", tmp_path / "o")
    _assert_clean_failure(code, err, tmp_path / "o", "case_000", "also found")
