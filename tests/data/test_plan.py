"""Fingerprint, plan, datalist and box helpers (no file discovery involved)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monai_mask.data.boxes import boxes_from_label, voxel_to_lps
from monai_mask.data.datalist import assign_folds, build_datalist, write_json_atomic
from monai_mask.data.fingerprint import case_fingerprint, dataset_fingerprint, guess_modality
from monai_mask.data.plan import make_plan
from monai_mask.errors import ConfigError


def _ct_case(seed: int, spacing=(0.8, 0.8, 2.5)):
    rng = np.random.default_rng(seed)
    arr = np.full((40, 40, 20), -1000.0)
    arr[8:32, 8:32, 2:18] = rng.normal(40, 10, size=(24, 24, 16))
    return arr, np.diag([*spacing, 1.0])


def test_guess_modality():
    ct, _ = _ct_case(0)
    assert guess_modality(ct) == "CT"
    assert guess_modality(np.abs(np.random.default_rng(0).normal(300, 50, (20, 20, 20)))) == "MR"


def test_case_fingerprint_geometry_and_foreground():
    arr, aff = _ct_case(1)
    fp = case_fingerprint("c0", arr, aff, "CT", "user")
    assert fp.shape == [40, 40, 20]
    assert fp.spacing == pytest.approx([0.8, 0.8, 2.5])
    assert fp.orientation == "RAS"
    # foreground = body (> -500 HU): the air never enters the sample
    assert fp.samples.min() > -500
    assert fp.intensity_min == -1000.0


def test_label_foreground_wins():
    arr, aff = _ct_case(2)
    label = np.zeros(arr.shape, np.uint8)
    label[10:12, 10:12, 5:7] = 1
    arr[label > 0] = 500.0
    fp = case_fingerprint("c0", arr, aff, "CT", "user", label=label)
    assert np.all(fp.samples == 500.0)
    assert fp.labels_present == [0, 1]


def test_dataset_fingerprint_and_ct_plan():
    cases = [case_fingerprint(f"c{i}", *_ct_case(i), "CT", "user") for i in range(4)]
    fp = dataset_fingerprint(cases)
    st = fp["foreground_intensity"]["CT"]
    assert st["mean"] == pytest.approx(40, abs=1.0)
    assert st["std"] == pytest.approx(10, abs=1.0)
    assert st["percentile_00_5"] < st["median"] < st["percentile_99_5"]
    plan = make_plan(json.loads(json.dumps(fp)))
    assert plan["normalisation"]["CT"]["scheme"] == "ct_clip_zscore"
    assert plan["normalisation"]["CT"]["clip"] == [st["percentile_00_5"], st["percentile_99_5"]]
    assert plan["target_spacing"] == pytest.approx([0.8, 0.8, 2.5])
    assert all(p % 16 == 0 and p >= 32 for p in plan["patch_size"])


def test_anisotropic_target_spacing_uses_low_percentile():
    cases = [case_fingerprint(f"c{i}", *_ct_case(i, (1.0, 1.0, s)), "CT", "user")
             for i, s in enumerate([5.0, 5.0, 5.0, 4.0, 3.0])]
    plan = make_plan(dataset_fingerprint(cases))
    assert plan["target_spacing"][2] < 5.0


def test_mr_plan_is_per_image_zscore():
    rng = np.random.default_rng(0)
    cases = [case_fingerprint("m", np.abs(rng.normal(300, 50, (32, 32, 32))), np.eye(4), "MR",
                              "user")]
    plan = make_plan(dataset_fingerprint(cases))
    assert plan["normalisation"]["MR"]["scheme"] == "mr_zscore_per_image"


def test_mixed_modalities_get_one_normalisation_each():
    rng = np.random.default_rng(0)
    ct = case_fingerprint("c", *_ct_case(0), "CT", "user")
    mr = case_fingerprint("m", np.abs(rng.normal(300, 50, (32, 32, 32))), np.eye(4), "MR", "user")
    plan = make_plan(dataset_fingerprint([mr, ct]))
    assert plan["modality"] == "CT" and plan["mixed_modalities"] == ["CT", "MR"]
    assert set(plan["normalisation"]) == {"CT", "MR"}


def test_folds_group_patients():
    patients = ["a", "a", "b", "c", "c", "c", "d", "e"]
    folds = assign_folds(patients, 3, seed=1)
    assert set(folds) == set(patients)
    assert set(folds.values()) == {0, 1, 2}
    with pytest.raises(ConfigError):
        assign_folds(patients, 0)


def test_build_datalist_relative_paths_and_folds(tmp_path):
    entries = [{"case_id": f"c{i}", "patient": f"p{i // 2}",
                "image": tmp_path / "img" / f"c{i}.nii.gz"} for i in range(6)]
    dl = build_datalist(entries, tmp_path / "out", folds=3)
    assert dl["training"][0]["image"] == "../img/c0.nii.gz"
    by_patient = {}
    for item in dl["training"]:
        by_patient.setdefault(item["patient"], set()).add(item["fold"])
    assert all(len(f) == 1 for f in by_patient.values())


def test_write_json_atomic_leaves_no_temp(tmp_path):
    path = write_json_atomic({"a": 1}, tmp_path / "x.json")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_boxes_from_label_oblique_affine():
    theta = np.deg2rad(15)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.9, 1.1, 2.0])
    aff[:3, 3] = [10.0, -20.0, 5.0]
    label = np.zeros((20, 20, 10), np.uint8)
    label[4:8, 5:9, 2:5] = 1
    label[14:16, 14:16, 7:8] = 1
    boxes, classes, centroids = boxes_from_label(label, aff)
    assert boxes.shape == (2, 6) and classes.tolist() == [0, 0]
    first = boxes[0]
    pts = voxel_to_lps(np.argwhere(label[:10] > 0), aff)
    assert np.all(pts >= first[:3] - first[3:] / 2) and np.all(pts <= first[:3] + first[3:] / 2)
    # LPS: x and y flip sign against RAS
    ras_centre = aff[:3, :3] @ np.argwhere(label[:10] > 0).mean(0) + aff[:3, 3]
    assert centroids[0] == pytest.approx([-ras_centre[0], -ras_centre[1], ras_centre[2]])
