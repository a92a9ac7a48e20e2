"""bundles/tumor_detection through `python -m monai.bundle run` and `monai-mask detect`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from monai_mask.io.writers import read_boxes_json, read_markups_roi
from tests.bundles.helpers import BUNDLES, REPO, read_loss_csv, run_bundle, train_workflow

BUNDLE = BUNDLES / "tumor_detection"
PREPARED = REPO / "sample_data" / "ct" / "prepared"
pytestmark = pytest.mark.bundle
# A short run on ONE training case (case_001, two lesions; 1 iteration of 2 crops per epoch,
# no flips), enough for the detector to learn that case's lesions: the fixture's model must
# find them again on the whole volume. Generalisation to unseen cases is measured by
# benchmarks/detection_study.py, not here (a CPU test cannot afford it).
CASE = "case_001"
EPOCHS = 120
SHORT = {"max_epochs": EPOCHS, "val_interval": EPOCHS, "flip_prob": 0.0,
         "train#data": f"$[d for d in @all_data if d['case_id'] == '{CASE}']",
         "validate#data": f"$[d for d in @all_data if d['case_id'] == '{CASE}']"}


def _label_centroids_lps(case: str) -> np.ndarray:
    """World LPS mm centroid of each connected lesion of ``case``'s label map."""
    import nibabel as nib
    from scipy import ndimage

    img = nib.load(REPO / "sample_data" / "ct" / "labelsTr" / f"{case}.nii.gz")
    lab = np.asarray(img.dataobj) > 0
    comps, n = ndimage.label(lab)
    ijk = np.array(ndimage.center_of_mass(lab, comps, range(1, n + 1)))
    ras = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    return ras * np.array([-1.0, -1.0, 1.0])


def test_metadata_validates_and_files_exist():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "tests" / "bundles" / "meta_schema.json").read_text())
    jsonschema.validate(json.loads((BUNDLE / "configs" / "metadata.json").read_text()), schema)
    for name in ("LICENSE", "docs/README.md", "configs/logging.conf", "configs/train.json",
                 "configs/evaluate.json", "configs/multi_gpu_train.json",
                 "configs/inference.json"):
        assert (BUNDLE / name).is_file(), name


def test_train_config_has_every_train_property(tmp_path):
    wf = train_workflow("tumor_detection", tmp_path)
    assert wf.check_properties() == []
    assert wf.val_interval == 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    run_bundle("tumor_detection", ["train.json"],
               {"output_dir": str(tmp), "ckpt_dir": str(tmp / "models"), **SHORT},
               timeout=1800)
    return tmp


@pytest.mark.slow
def test_train_evaluate_infer(trained):
    """Train -> evaluate -> infer: files, reports and box formats."""
    rows = read_loss_csv(trained / "loss.csv")
    assert [r[0] for r in rows][-1] == EPOCHS and all(np.isfinite(r[2]) for r in rows)
    assert json.loads((trained / "val_metrics.json").read_text())["overall"]["num_scans"] == 1
    run_bundle("tumor_detection", ["train.json", "evaluate.json"],
               {"output_dir": str(trained), "ckpt_dir": str(trained / "models"),
                "eval_data": "$@all_data"})
    report = json.loads((trained / "eval" / "metrics.json").read_text())
    assert report["overall"]["num_gt"] == 11 and len(report["per_case"]) == 8
    assert {"sens@0.125", "sens@1", "sens@8", "cpm"} <= set(report["overall"])
    assert any(k.startswith("mAP_IoU_0.10_0.50") for k in report["overall"])
    out = trained / "infer"
    run_bundle("tumor_detection", ["inference.json"],
               {"output_dir": str(out), "ckpt_path": str(trained / "models" / "model.pt"),
                "input_path": str(REPO / "sample_data" / "ct" / "imagesTr")})
    for case in (f"case_{i:03d}" for i in range(8)):
        boxes, scores, labels = read_boxes_json(out / f"{case}_boxes.json")
        assert (labels == 0).all() and (scores >= 0.05).all()
        np.testing.assert_allclose(read_markups_roi(out / f"{case}.mrk.json"), boxes, atol=1e-9)


@pytest.mark.slow
def test_trained_detector_boxes_contain_the_lesion_centroids(trained):
    """The model trained in the fixture finds its case's lesions on the whole volume."""
    out = trained / "infer_centroids"
    run_bundle("tumor_detection", ["inference.json"],
               {"output_dir": str(out), "ckpt_path": str(trained / "models" / "model.pt"),
                "input_path": str(REPO / "sample_data" / "ct" / "imagesTr" / f"{CASE}.nii.gz")})
    boxes, scores, _ = read_boxes_json(out / f"{CASE}_boxes.json")
    centroids = _label_centroids_lps(CASE)
    assert len(centroids) == 2
    top = boxes[np.argsort(-scores)][: len(centroids) + 1]  # the best-scoring boxes only
    for c in centroids:
        inside = np.all(np.abs(top[:, :3] - c) <= top[:, 3:] / 2, axis=1)
        assert inside.any(), f"no top box contains lesion centroid {c}: {top}"


@pytest.mark.slow
def test_markups_have_the_fields_slicer_requires(trained):
    out = trained / "infer_one"
    case = REPO / "sample_data" / "ct" / "imagesTr" / "case_004.nii.gz"
    run_bundle("tumor_detection", ["inference.json"],
               {"output_dir": str(out), "ckpt_path": str(trained / "models" / "model.pt"),
                "input_path": str(case)})
    doc = json.loads((out / "case_004.mrk.json").read_text())
    assert doc["@schema"].startswith("https://") and doc["markups"]
    for m in doc["markups"]:
        assert m["type"] == "ROI" and m["coordinateSystem"] == "LPS"
        assert len(m["center"]) == 3 and len(m["size"]) == 3 and len(m["orientation"]) == 9
        assert m["controlPoints"] and len(m["controlPoints"][0]["position"]) == 3
    boxes = json.loads((out / "case_004_boxes.json").read_text())
    assert (boxes["box_mode"], boxes["box_space"], boxes["box_units"]) == ("cccwhd", "LPS", "mm")


@pytest.mark.slow
def test_cli_detect_on_a_held_out_style_case(trained, tmp_path):
    case = REPO / "sample_data" / "ct" / "imagesTr" / "case_006.nii.gz"
    proc = subprocess.run(
        [sys.executable, "-m", "monai_mask", "detect", "--input", str(case),
         "--model", str(trained / "models" / "model.pt"), "--prepared", str(PREPARED),
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "case_006_boxes.json").is_file()
    assert (tmp_path / "case_006.mrk.json").is_file()


def test_cli_detect_missing_model_is_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "monai_mask", "detect", "--input", str(PREPARED),
         "--model", str(tmp_path / "none.pt"), "--prepared", str(PREPARED),
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert "none.pt: no such file or folder" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_two_step_recipe_segmentation_encoder_and_stride2_pyramid(tmp_path):
    """tumor_segmentation's model initialises a Retina U-Net tumor_detection with fpn_stages 1;
    inference rebuilds that detector from the checkpoint alone (as MONAI Label must), and a
    contradicting explicit setting fails loudly on the checkpoint."""
    run_bundle("tumor_segmentation", ["train.json"],
               {"output_dir": str(tmp_path / "seg"), "ckpt_dir": str(tmp_path / "seg" / "models"),
                "max_epochs": 1, "val_interval": 10, "backbone": "cnn"})
    seg = tmp_path / "seg" / "models" / "model.pt"
    proc = run_bundle("tumor_detection", ["train.json"],
                      {"output_dir": str(tmp_path / "det"), "ckpt_dir": str(tmp_path / "m"),
                       "max_epochs": 1, "val_interval": 10, "pretrained_ckpt": str(seg),
                       "detector_archs#cnn#fpn_stages": 1, "seg_loss_weight": 1.0})
    model = tmp_path / "m" / "model.pt"
    assert model.is_file(), proc.stdout[-2000:]
    import torch

    sd = torch.load(model, map_location="cpu", weights_only=True)
    assert any(k.startswith("network.feature_extractor.fpn.inner_blocks.3") for k in sd)
    assert any(k.startswith("network.seg_head.") for k in sd)
    case = str(REPO / "sample_data" / "ct" / "imagesTr" / "case_000.nii.gz")
    infer = {"ckpt_path": str(model), "input_path": case, "output_dir": str(tmp_path / "out")}
    run_bundle("tumor_detection", ["inference.json"], infer)
    assert (tmp_path / "out" / "case_000_boxes.json").is_file()
    with pytest.raises(AssertionError, match="CheckpointError|size mismatch|Missing|Unexpected"):
        run_bundle("tumor_detection", ["inference.json"],
                   {**infer, "output_dir": str(tmp_path / "out2"),
                    "detector_archs#cnn#fpn_stages": 2})


@pytest.mark.slow
def test_pretrained_cnn_mae_checkpoint_loads_into_the_bundle(tmp_path):
    run_bundle("mae_pretrain", ["train.json"],
               {"output_dir": str(tmp_path / "mae"), "ckpt_dir": str(tmp_path / "mae" / "models"),
                "max_epochs": 1, "backbone": "cnn"})
    ckpt = tmp_path / "mae" / "models" / "model.pt"
    proc = run_bundle("tumor_detection", ["train.json"],
                      {"output_dir": str(tmp_path / "det"), "ckpt_dir": str(tmp_path / "m"),
                       "max_epochs": 1, "val_interval": 1, "pretrained_ckpt": str(ckpt)})
    assert (tmp_path / "m" / "model.pt").is_file(), proc.stdout[-2000:]
    bad = tmp_path / "bad.pt"
    import torch

    from monai_mask.networks.registry import create_model

    torch.save(create_model("cnn_mae_resenc_tiny_s16_i32", filters=(8, 16, 32, 64, 128))
               .state_dict(), bad)
    with pytest.raises(AssertionError, match="CheckpointError"):
        run_bundle("tumor_detection", ["train.json"],
                   {"output_dir": str(tmp_path / "bad"), "max_epochs": 1,
                    "pretrained_ckpt": str(bad)})
