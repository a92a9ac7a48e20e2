"""Tests of monai_mask.data.synthetic: anatomy, tumours, geometry, boxes and the written dataset."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from monai_mask.data.boxes import boxes_from_label
from monai_mask.data.synthetic import (
    CT_HU,
    DIAMETER_MM,
    GENERATOR_VERSION,
    MR_INTENSITY,
    SyntheticCase,
    case_seeds,
    generate_case,
    write_dataset,
)
from monai_mask.errors import ConfigError

SHAPE = (32, 32, 32)
STRUCT26 = np.ones((3, 3, 3), dtype=bool)


@pytest.fixture(scope="module")
def ct_cases() -> list[SyntheticCase]:
    return [generate_case(seed, "ct", SHAPE) for seed in range(24)]


@pytest.fixture(scope="module")
def mr_cases() -> list[SyntheticCase]:
    return [generate_case(seed, "mr", SHAPE) for seed in range(12)]


@pytest.fixture(scope="module")
def ct_three() -> list[SyntheticCase]:
    return [generate_case(seed, "ct", SHAPE, n_tumours=3) for seed in range(100, 106)]


def _lps(ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World LPS of voxel indices (N, 3), written out independently of the library."""
    ras = np.c_[ijk, np.ones(len(ijk))] @ affine.T
    return ras[:, :3] * np.array([-1.0, -1.0, 1.0])


def _components(label: np.ndarray) -> list[np.ndarray]:
    comps, n = ndimage.label(label, structure=STRUCT26)
    return [np.argwhere(comps == i) for i in range(1, n + 1)]


def _host_of(case: SyntheticCase, ijk: np.ndarray) -> int:
    """Index of the tumour whose centroid is nearest to the component's centroid."""
    centre = _lps(ijk, case.affine).mean(axis=0)
    return int(np.argmin(np.linalg.norm(case.centroids - centre, axis=1)))


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_same_seed_gives_byte_identical_case(modality):
    a, b = generate_case(7, modality, SHAPE), generate_case(7, modality, SHAPE)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert a.affine.tobytes() == b.affine.tobytes()
    assert a.boxes.tobytes() == b.boxes.tobytes()
    c = generate_case(8, modality, SHAPE)
    assert a.image.shape == c.image.shape == SHAPE
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.affine, c.affine)


def test_ct_hounsfield_ranges(ct_cases):
    for case in ct_cases[:6]:
        img = case.image
        assert img.dtype == np.int16 and case.modality == "CT"
        corners = img[np.ix_([0, 1, -2, -1], [0, 1, -2, -1], [0, 1, -2, -1])]
        assert abs(corners.mean() - (-1000)) < 25  # air outside the body
        assert ((img > -950) & (img < -500)).sum() > 100  # aerated lung
        assert (img > 300).sum() > 10  # bone
        assert ((img > -150) & (img < -60)).sum() > 20  # subcutaneous fat
        assert ((img > 20) & (img < 80)).sum() > 2000  # soft tissue and organs
        assert img.max() <= 1500 and img.min() >= -1024


def test_ct_tumours_differ_from_host_and_lie_in_body(ct_cases, ct_three):
    checked = 0
    for case in ct_cases + ct_three:
        for host, value in zip(case.hosts, case.lesion_values, strict=True):
            assert abs(value - CT_HU[host]) >= 25
        for ijk in _components(case.label):
            values = case.image[tuple(ijk.T)]
            assert values.min() > -900  # not in the air outside the body
            if len(ijk) >= 20:
                host = case.hosts[_host_of(case, ijk)]
                assert abs(np.median(values) - CT_HU[host]) >= 10
                checked += 1
    assert checked >= 5


def test_tumour_contrast_goes_both_ways(ct_cases, ct_three, mr_cases):
    ct = [v - CT_HU[h] for c in ct_cases + ct_three
          for h, v in zip(c.hosts, c.lesion_values, strict=True)]
    mr = [v / MR_INTENSITY[h] for c in mr_cases
          for h, v in zip(c.hosts, c.lesion_values, strict=True)]
    assert min(ct) < 0 < max(ct)
    assert min(mr) < 1 < max(mr)
    assert all(r <= 0.7 or r >= 1.3 for r in mr)


def test_mr_values_finite_positive_with_tissue_classes(mr_cases):
    for case in mr_cases[:4]:
        img = case.image
        assert img.dtype == np.float32 and case.modality == "MR"
        assert np.isfinite(img).all() and img.min() >= 0
        corners = img[np.ix_([0, -1], [0, -1], [0, -1])]
        fg = img[img > 300]
        assert fg.size > 1000 and corners.max() < 0.2 * np.median(fg)
        # white matter (750) and grey matter (450) are both present, through bias and noise
        hist, edges = np.histogram(img[img > 300], bins=20, range=(300, 1000))
        centres = (edges[:-1] + edges[1:]) / 2
        assert hist[centres < 550].sum() > 200 and hist[centres > 650].sum() > 200


def test_tumour_count_and_every_count_occurs(ct_cases, mr_cases):
    counts = set()
    for case in ct_cases + mr_cases:
        n = len(case.boxes)
        assert 0 <= n <= 3
        assert case.boxes.shape == (n, 6) and case.centroids.shape == (n, 3)
        assert len(case.diameters_mm) == len(case.hosts) == n
        assert len(_components(case.label)) == n  # tumours never touch each other
        assert set(np.unique(case.label)) <= {0, 1} and case.label.dtype == np.uint8
        counts.add(n)
    assert counts == {0, 1, 2, 3}


@pytest.mark.parametrize("n", [0, 1, 3])
def test_forced_tumour_count(n):
    case = generate_case(3, "mr", SHAPE, n_tumours=n)
    assert len(case.boxes) == n and len(_components(case.label)) == n
    assert (case.label.sum() == 0) == (n == 0)


def _extent_mm(ijk: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    return (ijk.max(axis=0) - ijk.min(axis=0) + 1) * spacing


def test_lesion_physical_sizes(ct_cases, ct_three, mr_cases):
    cases = ct_cases + ct_three + mr_cases + [generate_case(2, "ct", (96, 96, 48), n_tumours=3)]
    largest = 0.0
    for case in cases:
        assert np.all((case.diameters_mm >= DIAMETER_MM[0]) & (case.diameters_mm <= 30))
        for ijk in _components(case.label):
            d = case.diameters_mm[_host_of(case, ijk)]
            extent = _extent_mm(ijk, case.spacing)
            # the voxel centres of a shape that fits a d-mm sphere span at most d + one voxel
            assert np.all(extent <= d + case.spacing + 1e-6)
            assert extent.max() >= min(0.35 * d, case.spacing.min())
            largest = max(largest, extent.max())
    assert largest >= 18.0


def test_affine_is_oblique_with_anisotropic_spacing(ct_cases, mr_cases):
    for case in ct_cases[:8] + mr_cases[:4]:
        a = case.affine
        assert a.dtype == np.float64 and a.shape == (4, 4)
        assert np.array_equal(a[3], [0, 0, 0, 1])
        sp = case.spacing
        assert 0.8 <= sp[0] <= 1.2 and abs(sp[0] - sp[1]) < 1e-4 and 1.5 <= sp[2] <= 3.0
        direction = a[:3, :3] / sp
        np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-5)
        off_diagonal = direction - np.diag(np.diag(direction))
        assert np.abs(off_diagonal).max() > 0.03
        rot = direction @ np.diag(np.sign(np.diag(direction)))  # undo an axis flip
        angle = np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1)))
        assert 5 - 1e-3 <= angle <= 20 + 1e-3
        assert np.linalg.norm(a[:3, 3]) > 1.0  # origin offset


def test_boxes_contain_lesion_voxels_and_centroids(ct_cases, ct_three, mr_cases):
    for case in ct_cases + ct_three + mr_cases:
        lo = case.boxes[:, :3] - case.boxes[:, 3:] / 2
        hi = case.boxes[:, :3] + case.boxes[:, 3:] / 2
        assert np.all(case.boxes[:, 3:] > 0)
        assert np.all((case.centroids >= lo) & (case.centroids <= hi))
        world = _lps(np.argwhere(case.label), case.affine)
        inside = (world[:, None] >= lo[None] - 1e-6) & (world[:, None] <= hi[None] + 1e-6)
        assert np.all(inside.all(axis=2).any(axis=1))  # every tumour voxel is in a box


def test_boxes_match_label_components(ct_three):
    for case in ct_three:
        ref_boxes, ref_classes, ref_centroids = boxes_from_label(case.label, case.affine)
        assert len(ref_boxes) == 3 and np.all(ref_classes == 0)
        order, ref_order = np.lexsort(case.boxes.T), np.lexsort(ref_boxes.T)
        np.testing.assert_allclose(case.boxes[order], ref_boxes[ref_order], atol=1e-9)
        np.testing.assert_allclose(case.centroids[order], ref_centroids[ref_order], atol=1e-9)
        # a box is the extent of its voxel centres plus half a voxel's world extent
        half = 0.5 * np.abs(case.affine[:3, :3]).sum(axis=1)
        for ijk in _components(case.label):
            world = _lps(ijk, case.affine)
            i = _host_of(case, ijk)
            np.testing.assert_allclose(case.boxes[i, 3:], np.ptp(world, axis=0) + 2 * half)


def test_write_dataset_round_trip(tmp_path):
    path = write_dataset(tmp_path / "ct", n=2, seed=5, modality="ct", shape=SHAPE)
    assert path == tmp_path / "ct" / "dataset.json"
    meta = json.loads(path.read_text())
    for key, value in {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "tumour"},
                       "numTraining": 2, "box_mode": "cccwhd", "box_space": "LPS",
                       "box_units": "mm"}.items():
        assert meta[key] == value
    assert meta["name"]
    for token in ("seed=5", "modality=ct", "[32, 32, 32]", GENERATOR_VERSION):
        assert token in meta["description"]
    seeds = case_seeds(5, 2)
    assert seeds == [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(5).spawn(2)]
    for i, entry in enumerate(meta["training"]):
        assert entry["image"] == f"imagesTr/case_{i:03d}.nii.gz"
        assert entry["label"] == f"labelsTr/case_{i:03d}.nii.gz"
        assert entry["patient_id"] == f"case_{i:03d}"
        case = generate_case(seeds[i], "ct", SHAPE)
        np.testing.assert_array_equal(np.asarray(entry["box"]).reshape(-1, 6), case.boxes)
        assert entry["box_label"] == [0] * len(case.boxes)
        for key, array, dtype in (("image", case.image, np.int16), ("label", case.label, np.uint8)):
            img = nib.load(tmp_path / "ct" / entry[key])
            assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
            np.testing.assert_array_equal(img.affine, case.affine)
            np.testing.assert_allclose(img.get_qform(), case.affine, atol=1e-4)
            data = np.asanyarray(img.dataobj)
            assert data.dtype == dtype and np.array_equal(data, array)
    assert seeds[0] != seeds[1]
    names = sorted(p.name for p in (tmp_path / "ct").rglob("*") if p.is_file())
    assert names == sorted(["dataset.json"] + [f"case_00{i}.nii.gz" for i in (0, 1)] * 2)


def test_boxes_agree_with_itk_physical_points(tmp_path):
    """ITK reads NIfTI into LPS: its physical points of the tumour voxels fall in the boxes."""
    sitk = pytest.importorskip("SimpleITK")
    path = write_dataset(tmp_path, n=1, seed=1, modality="ct", shape=SHAPE)  # 3 tumours
    entry = json.loads(path.read_text())["training"][0]
    boxes = np.asarray(entry["box"]).reshape(-1, 6)
    label = sitk.ReadImage(str(tmp_path / entry["label"]))
    arr = sitk.GetArrayFromImage(label)  # (Z, Y, X)
    points = np.array([label.TransformIndexToPhysicalPoint([int(i), int(j), int(k)])
                       for k, j, i in np.argwhere(arr)])
    assert len(points) > 0 and len(boxes) > 0
    lo, hi = boxes[:, :3] - boxes[:, 3:] / 2, boxes[:, :3] + boxes[:, 3:] / 2
    inside = (points[:, None] >= lo[None] - 1e-3) & (points[:, None] <= hi[None] + 1e-3)
    assert np.all(inside.all(axis=2).any(axis=1))


def test_write_dataset_mr_with_progress(tmp_path, capsys):
    path = write_dataset(tmp_path / "mr", n=1, seed=0, modality="mr", shape=SHAPE, progress=True)
    meta = json.loads(path.read_text())
    assert meta["modality"] == {"0": "MRI"} and meta["numTraining"] == 1
    img = nib.load(tmp_path / "mr" / meta["training"][0]["image"])
    assert img.get_data_dtype() == np.float32
    case = generate_case(case_seeds(0, 1)[0], "mr", SHAPE)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), case.image)
    assert "phantoms" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs",
    [{"n": 0}, {"n": -2}, {"n": 1.5}, {"shape": (16, 32, 32)}, {"shape": (32, 32)},
     {"modality": "pet"}, {"seed": -1}],
)
def test_write_dataset_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        write_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs",
    [{"n_tumours": -1}, {"n_tumours": 11}, {"modality": "xr"}, {"shape": (8, 8, 8)},
     {"seed": -3}, {"seed": 1.5}],
)
def test_generate_case_rejects_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        generate_case(**{"seed": 0, "shape": SHAPE, **kwargs})
