"""The thin CLI: sample-data, overview, argument errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from monai_mask.cli.main import main


def test_sample_data_is_deterministic(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["sample-data", str(tmp_path / name), "--n", "2", "--seed", "5",
                     "--modality", "mr", "--shape", "32", "32", "32"]) == 0
    assert "wrote 2 MR phantoms" in capsys.readouterr().out
    ds = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert ds["numTraining"] == 2 and ds["box_space"] == "LPS"
    for item in ds["training"]:
        a = nib.load(tmp_path / "a" / item["image"])
        b = nib.load(tmp_path / "b" / item["image"])
        assert np.array_equal(a.get_fdata(), b.get_fdata())
        assert np.array_equal(a.affine, b.affine) and a.shape == (32, 32, 32)


def test_sample_data_bad_arguments_one_line(tmp_path, capsys):
    assert main(["sample-data", str(tmp_path / "x"), "--n", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("monai-mask sample-data: error:")
    assert not (tmp_path / "x" / "dataset.json").exists()


def test_overview_png(sample_data, tmp_path, capsys):
    out = tmp_path / "o.png"
    assert main(["overview", str(sample_data / "ct" / "prepared"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_subcommand_exits_nonzero():
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code != 0


def test_finetune_detection_rejects_label_fraction_and_missing_checkpoint(sample_data, tmp_path,
                                                                          capsys):
    prepared = str(sample_data / "ct" / "prepared")
    base = ["finetune", "--task", "detection", "--prepared", prepared, "--out", str(tmp_path / "o")]
    assert main([*base, "--label-fraction", "0.5"]) == 2
    assert main([*base, "--pretrained", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["monai-mask finetune: error: --label-fraction is supported for --task "
                   "segmentation only",
                   f"monai-mask finetune: error: {tmp_path / 'none.pt'}: no such checkpoint"]
    assert not (tmp_path / "o").exists()
