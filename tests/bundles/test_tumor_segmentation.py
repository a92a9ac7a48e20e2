"""bundles/tumor_segmentation: train -> evaluate -> infer (NIfTI, NRRD, DICOM), exports, CLI."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import slicerio
import torch

from monai_mask.data.boxes import RAS_TO_LPS
from monai_mask.io.dicom import scan_dicom
from monai_mask.io.readers import read_image
from tests.bundles.helpers import BUNDLES, REPO, read_loss_csv, run_bundle, train_workflow
from tests.io.conftest import write_dicom_series

BUNDLE = BUNDLES / "tumor_segmentation"
CONFIGS = BUNDLE / "configs"
SAMPLE = REPO / "sample_data" / "ct"
PREPARED = SAMPLE / "prepared"
FAST = {"sw_overlap": 0.25}
pytestmark = pytest.mark.bundle


def _bundle_cmd(command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", command, *args,
            "--meta_file", str(CONFIGS / "metadata.json"), "--bundle_root", str(BUNDLE)]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, **kw)


def _seg_label(path, files) -> np.ndarray:
    """(X, Y, Z) label map of a single-segment DICOM-SEG, frames aligned with ``files``."""
    seg = hd.seg.segread(path)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    pixels = seg.get_pixels_by_source_instance(
        uids, segment_numbers=[1], combine_segments=True, assert_missing_frames_are_empty=True)
    return pixels.transpose(2, 1, 0)


def _check_seg_nrrd(path, label: np.ndarray, affine: np.ndarray) -> None:
    seg = slicerio.read_segmentation(str(path))
    np.testing.assert_array_equal(seg["voxels"], label)
    np.testing.assert_allclose(seg["ijkToLPS"], RAS_TO_LPS @ affine, atol=1e-5)
    (segment,) = seg["segments"]
    assert (segment["name"], segment["labelValue"]) == ("tumour", 1)
    np.testing.assert_allclose(segment["color"], [0.86, 0.24, 0.24])


# ----------------------------------------------------------------------------- fast


def test_metadata_validates():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "tests" / "bundles" / "meta_schema.json").read_text())
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    jsonschema.validate(meta, schema)
    assert meta["label_classes"] == "0: background, 1: tumour"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "tumour"}
    for name in ("LICENSE", "docs/README.md", "configs/logging.conf", "configs/train.json",
                 "configs/evaluate.json", "configs/multi_gpu_train.json",
                 "configs/inference.json"):
        assert (BUNDLE / name).is_file(), name


def test_train_config_has_every_train_property(tmp_path):
    wf = train_workflow("tumor_segmentation", tmp_path, label_fraction=0.5, label_seed=1)
    assert wf.check_properties() == []
    assert wf.max_epochs == 2 and wf.val_interval == 1
    train_cases = wf.train_dataset_data
    assert len(train_cases) == 2  # half of the 4 labelled cases outside the validation fold
    assert all(d["fold"] != 0 for d in train_cases)
    assert type(wf.network_def).__name__ == "ViTUNETR"


def test_mismatched_pretrained_checkpoint_fails_the_run(tmp_path):
    from monai_mask.networks import create_model

    ckpt = tmp_path / "cnn_mae.pt"
    torch.save(create_model("cnn_mae_resenc_tiny_s16_i32").state_dict(), ckpt)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           str(CONFIGS / "train.json"), "--bundle_root", str(BUNDLE),
           "--output_dir", str(tmp_path / "run"), "--ckpt_dir", str(tmp_path / "run" / "m"),
           "--pretrained_ckpt", str(ckpt), "--backbone", "vit"]
    proc = _run(cmd)
    assert proc.returncode != 0
    assert "CheckpointError" in proc.stderr and "cnn_mae.pt: does not match ViTUNETR" in proc.stderr
    assert not (tmp_path / "run" / "m" / "model.pt").exists()


def test_verify_net_in_out():
    proc = _run(_bundle_cmd("verify_net_in_out", "network_def", "--config_file",
                            str(CONFIGS / "inference.json")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified with no error" in proc.stdout + proc.stderr


def test_writer_outputs_match_a_known_label_on_a_dicom_series(tmp_path):
    """NIfTI, .seg.nrrd and DICOM-SEG of a known label on the DICOM grid, read back."""
    from monai_mask.engines.segment_io import SegmentationWriterd, find_inputs, tumour_segments

    on_disk = write_dicom_series(tmp_path / "in" / "ct", shape=(12, 10, 7),
                                 orientation=(0.96, 0.28, 0, -0.28, 0.96, 0), shuffle_seed=3)
    assert find_inputs(tmp_path / "in") == [{"image": str(on_disk.folder)}]
    volume = read_image(on_disk.folder)
    label = np.zeros(volume.shape, np.uint8)
    label[2:7, 3:6, 1:5] = 1
    writer = SegmentationWriterd("pred", tmp_path / "out", tumour_segments())
    written = writer.write(label, volume.affine, on_disk.folder)
    assert [p.name for p in written] == ["ct_seg.nii.gz", "ct.seg.nrrd", "ct_seg.dcm"]
    nifti = read_image(written[0])
    np.testing.assert_array_equal(nifti.array, label)
    np.testing.assert_allclose(nifti.affine, volume.affine, atol=1e-5)
    _check_seg_nrrd(written[1], label, volume.affine)
    files = scan_dicom(on_disk.folder)[0].unique_files()
    np.testing.assert_array_equal(_seg_label(written[2], files), label)


def test_cli_errors_are_one_line(tmp_path):
    bad = _run([sys.executable, "-m", "monai_mask", "finetune", "--prepared",
                str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert bad.returncode == 2 and "no datalist.json" in bad.stderr.strip().splitlines()[-1]
    bad = _run([sys.executable, "-m", "monai_mask", "segment", "--input", str(tmp_path / "no"),
                "--model", str(tmp_path / "m.pt"), "--prepared", str(PREPARED),
                "--out", str(tmp_path / "o"), "--formats", "nifti,png"])
    assert bad.returncode == 2 and "no such file" in bad.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- slow pipeline


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """MAE pretraining (1 epoch) -> fine-tuning from it (2 epochs) on the sample CT phantoms."""
    tmp = tmp_path_factory.mktemp("tumor_seg")
    run_bundle("mae_pretrain", ["train.json"], {"output_dir": str(tmp / "pre"),
                                                "ckpt_dir": str(tmp / "pre" / "models"),
                                                "max_epochs": 1})
    mae = tmp / "pre" / "models" / "model.pt"
    proc = run_bundle("tumor_segmentation", ["train.json"],
                      {"output_dir": str(tmp / "ft"), "ckpt_dir": str(tmp / "ft" / "models"),
                       "pretrained_ckpt": str(mae), "max_epochs": 2, **FAST})
    return tmp, proc


@pytest.mark.slow
def test_finetune_from_pretrained_writes_models_and_logs(trained):
    tmp, proc = trained
    out = proc.stdout + proc.stderr
    assert "loaded pretrained vit encoder" in out and "val_mean_dice" in out
    for name in ("model.pt", "checkpoint_final.pt"):
        assert (tmp / "ft" / "models" / name).is_file()
    rows = read_loss_csv(tmp / "ft" / "loss.csv")
    assert [r[0] for r in rows] == [1, 1, 2, 2] and all(np.isfinite(r[2]) for r in rows)
    assert any((tmp / "ft" / "tensorboard").iterdir())


@pytest.mark.slow
def test_evaluate_writes_per_case_dice_hd95_and_summary(trained):
    tmp, _ = trained
    run_bundle("tumor_segmentation", ["train.json", "evaluate.json"],
               {"output_dir": str(tmp / "ev"), "ckpt_path": str(tmp / "ft/models/model.pt"),
                **FAST})
    with open(tmp / "ev" / "eval" / "metrics_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["case_001", "case_002", "case_003", "case_005"]
    assert {r["class"] for r in rows} == {"tumour"}
    tumour = {r["case"]: r for r in rows}
    assert float(tumour["case_001"]["dice"]) >= 0.0 and tumour["case_003"]["dice"] == ""
    assert int(tumour["case_002"]["label_voxels"]) > 0
    summary = json.loads((tmp / "ev" / "eval" / "metrics_summary.json").read_text())
    assert summary["tumour"]["dice"]["n"] == 2  # the two validation cases with a tumour
    assert (tmp / "ev" / "eval" / "metrics_summary.csv").is_file()


@pytest.mark.slow
def test_inference_nifti_nrrd_dicom_keeps_input_geometry(trained, tmp_path):
    tmp, _ = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(SAMPLE / "imagesTr" / "case_001.nii.gz", inputs / "nii_case.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(SAMPLE / "imagesTr" / "case_002.nii.gz")),
                    str(inputs / "nrrd_case.nrrd"))
    series = write_dicom_series(inputs / "dicom_case", shape=(40, 36, 20), pixel_spacing=(1.1, 0.9),
                                orientation=(0.96, 0.28, 0, -0.28, 0.96, 0))
    run_bundle("tumor_segmentation", ["inference.json"],
               {"input_path": str(inputs), "output_dir": str(tmp_path / "out"),
                "ckpt_path": str(tmp / "ft" / "models" / "model.pt"), **FAST})
    out = tmp_path / "out"
    for case, source in (("nii_case", inputs / "nii_case.nii.gz"),
                         ("nrrd_case", inputs / "nrrd_case.nrrd"),
                         ("dicom_case", series.folder)):
        image = read_image(source)
        label = read_image(out / f"{case}_seg.nii.gz")
        assert label.shape == image.shape
        np.testing.assert_allclose(label.affine, image.affine, atol=1e-5)
        assert set(np.unique(label.array)) <= {0, 1}
        _check_seg_nrrd(out / f"{case}.seg.nrrd", label.array, image.affine)
    np.testing.assert_allclose(read_image(series.folder).affine, series.affine, atol=1e-5)
    files = scan_dicom(series.folder)[0].unique_files()
    dicom_label = read_image(out / "dicom_case_seg.nii.gz").array
    np.testing.assert_array_equal(_seg_label(out / "dicom_case_seg.dcm", files), dicom_label)
    refs = {i.ReferencedSOPInstanceUID for s in pydicom.dcmread(out / "dicom_case_seg.dcm")
            .ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert refs == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert not list(out.glob("nii_case*.dcm")) and not list(out.glob("nrrd_case*.dcm"))


@pytest.mark.slow
def test_torchscript_and_onnx_exports_match_pytorch(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    tmp, _ = trained
    model, cfg = tmp / "ft" / "models" / "model.pt", str(CONFIGS / "inference.json")
    proc = _run(_bundle_cmd("ckpt_export", "network_def", "--filepath", str(tmp_path / "m.ts"),
                            "--ckpt_file", str(model), "--config_file", cfg, "--key_in_ckpt", "",
                            "--use_trace", "True"))  # ViTUNETR is traced, not scripted
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run(_bundle_cmd("onnx_export", "network_def", "--filepath", str(tmp_path / "m.onnx"),
                            "--ckpt_file", str(model), "--config_file", cfg, "--key_in_ckpt", "",
                            "--input_shape", "[1, 1, 32, 32, 32]"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from monai_mask.engines.finetune import segmentation_network_from_mae

    net = segmentation_network_from_mae("vit_mae_tiny_p8_i32", (32, 32, 32), out_channels=2)
    net.load_state_dict(torch.load(model, weights_only=True))
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net.eval()(x).numpy()
        ts = torch.jit.load(str(tmp_path / "m.ts"))(x).numpy()
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(ts, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(onnx_out, ref, rtol=1e-4, atol=1e-4)  # documented tolerance


@pytest.mark.slow
def test_cli_segment_writes_outputs_and_overlay(trained, tmp_path):
    tmp, _ = trained
    case = SAMPLE / "imagesTr" / "case_002.nii.gz"
    proc = _run([sys.executable, "-m", "monai_mask", "segment", "--input", str(case),
                 "--model", str(tmp / "ft" / "models" / "model.pt"), "--prepared", str(PREPARED),
                 "--out", str(tmp_path), "--formats", "nifti", "--overlay",
                 str(tmp_path / "overlay.png"), "--set", "sw_overlap=0.25"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "case_002_seg.nii.gz").is_file()
    assert not (tmp_path / "case_002.seg.nrrd").exists()
    assert (tmp_path / "overlay.png").read_bytes()[:4] == b"\x89PNG"
