"""bundles/mae_pretrain through `python -m monai.bundle run`, torchrun and `monai-mask pretrain`."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from monai_mask.anomaly import anomaly_auroc
from tests.bundles.helpers import BUNDLES, REPO, read_loss_csv, run_bundle, train_workflow

BUNDLE = BUNDLES / "mae_pretrain"
SAMPLE = REPO / "sample_data" / "ct"
pytestmark = pytest.mark.bundle


def _outputs(tmp, **extra):
    return {"output_dir": str(tmp), "ckpt_dir": str(tmp / "models"), **extra}


@pytest.mark.parametrize("bundle", ["mae_pretrain"])
def test_metadata_validates(bundle):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "tests" / "bundles" / "meta_schema.json").read_text())
    meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    jsonschema.validate(meta, schema)
    for name in ("LICENSE", "docs/README.md", "configs/logging.conf", "configs/train.json",
                 "configs/multi_gpu_train.json", "configs/inference.json"):
        assert (BUNDLES / bundle / name).is_file(), name


def test_train_config_has_every_train_property(tmp_path):
    wf = train_workflow("mae_pretrain", tmp_path)
    assert wf.check_properties() == []
    assert wf.max_epochs == 2 and wf.val_interval == 1


def test_resume_matches_uninterrupted_run(tmp_path):
    """A run resumed from its iteration-2 checkpoint replays iterations 3-4 exactly."""
    common = {"max_epochs": 2, "ckpt_interval": 2}
    run_bundle("mae_pretrain", ["train.json"], _outputs(tmp_path / "full", **common))
    ckpt = tmp_path / "full" / "models" / "checkpoint_checkpoint_iteration=2.pt"
    assert ckpt.is_file()
    run_bundle("mae_pretrain", ["train.json"],
               _outputs(tmp_path / "resumed", resume_from=str(ckpt), **common))
    full = read_loss_csv(tmp_path / "full" / "loss.csv")
    resumed = read_loss_csv(tmp_path / "resumed" / "loss.csv")
    assert [r[:2] for r in full] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    assert [r[:2] for r in resumed] == [(2, 3), (2, 4)]  # same iteration count reached
    np.testing.assert_allclose([r[2] for r in resumed], [r[2] for r in full[2:]], rtol=1e-5)
    assert any((tmp_path / "full" / "previews").glob("*.png"))
    assert any((tmp_path / "full" / "tensorboard").iterdir())


def test_torchrun_two_processes_gloo(tmp_path):
    proc = run_bundle("mae_pretrain", ["train.json", "multi_gpu_train.json"],
                      _outputs(tmp_path, max_epochs=1), nproc=2)
    assert (tmp_path / "models" / "model.pt").is_file()
    rows = read_loss_csv(tmp_path / "loss.csv")  # rank 0 only: one row per iteration
    assert [r[1] for r in rows] == list(range(1, len(rows) + 1))
    assert "Epoch[1] Complete" in proc.stdout + proc.stderr


@pytest.mark.parametrize("backbone,mode,prior", [("cnn", "block", "none"),
                                                 ("vit", "lesion_aware", "label"),
                                                 ("vit", "lesion_aware", "self"),
                                                 ("vit", "random", "none")])
def test_backbones_and_masking_modes(tmp_path, backbone, mode, prior):
    run_bundle("mae_pretrain", ["train.json"],
               _outputs(tmp_path, max_epochs=1, backbone=backbone, mask_mode=mode,
                        prior_source=prior))
    rows = read_loss_csv(tmp_path / "loss.csv")
    assert rows and all(np.isfinite(r[2]) for r in rows)


def test_mlflow_tracking(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_bundle("mae_pretrain", ["train.json"], _outputs(tmp_path, max_epochs=1),
               extra=["--tracking", "mlflow"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and {"train_loss", "val_recon_mse"} <= set(runs[0].data.metrics)


def test_cli_wrapper_runs_the_bundle(tmp_path):
    cmd = [sys.executable, "-m", "monai_mask", "pretrain", "--prepared",
           str(SAMPLE / "prepared"), "--out", str(tmp_path), "--epochs", "1",
           "--set", "batch_size=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    bad = subprocess.run([sys.executable, "-m", "monai_mask", "pretrain", "--prepared",
                          str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no datalist.json" in bad.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_anomaly_maps_align_and_score_tumours(tmp_path):
    run_bundle("mae_pretrain", ["train.json"],
               _outputs(tmp_path / "train", max_epochs=40, val_interval=20,
                        learning_rate=0.001, preview_interval=1000))
    run_bundle("mae_pretrain", ["inference.json"],
               {"ckpt_path": str(tmp_path / "train" / "models" / "model.pt"),
                "output_dir": str(tmp_path / "maps")})
    scores, tumour, normal = [], [], []
    for image_path in sorted((SAMPLE / "imagesTr").glob("*.nii.gz")):
        case = image_path.name[: -len(".nii.gz")]
        image = nib.load(image_path)
        anomaly = nib.load(tmp_path / "maps" / f"{case}_anomaly.nii.gz")
        recon = nib.load(tmp_path / "maps" / f"{case}_reconstruction.nii.gz")
        for out in (anomaly, recon):
            assert out.shape[:3] == image.shape
            np.testing.assert_allclose(out.affine, image.affine, atol=1e-4)
        hu = image.get_fdata()
        label = nib.load(SAMPLE / "labelsTr" / image_path.name).get_fdata() > 0
        scores.append(anomaly.get_fdata().reshape(hu.shape))
        tumour.append(label)
        normal.append((hu > -200) & (hu < 200) & ~label)  # soft tissue that is not tumour
    auroc = anomaly_auroc(np.concatenate([s.ravel() for s in scores]),
                          np.concatenate([t.ravel() for t in tumour]),
                          np.concatenate([n.ravel() for n in normal]))
    print(f"anomaly AUROC tumour vs normal soft tissue: {auroc:.3f}")
    assert auroc > 0.5


def test_seeded_runs_are_identical(tmp_path):
    """Same seed: same masks, data order and loss curve (self-guided prior included)."""
    settings = {"max_epochs": 2, "mask_mode": "lesion_aware", "prior_source": "self"}
    for name in ("a", "b"):
        run_bundle("mae_pretrain", ["train.json"], _outputs(tmp_path / name, **settings))
    a = read_loss_csv(tmp_path / "a" / "loss.csv")
    assert a == read_loss_csv(tmp_path / "b" / "loss.csv")
    run_bundle("mae_pretrain", ["train.json"], _outputs(tmp_path / "c", seed=1, **settings))
    assert [r[2] for r in read_loss_csv(tmp_path / "c" / "loss.csv")] != [r[2] for r in a]
