"""StepMasker (masks inside the training step), anomaly scoring, plan presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_mask.anomaly import AnomalyInferer, anomaly_auroc, partition_masks, score_window
from monai_mask.data.presets import PlanNormalized, pretrain_transforms
from monai_mask.engines.masker import StepMasker
from monai_mask.networks import create_model


@pytest.mark.parametrize("mode,prior", [("random", "none"), ("block", "none"),
                                        ("lesion_aware", "label"), ("lesion_aware", "intensity"),
                                        ("lesion_aware", "self")])
def test_step_masker_exact_and_reproducible(mode, prior):
    masker = StepMasker(8, ratio=0.75, mode=mode, prior_source=prior, block_size=(1, 2),
                        grid=(4, 4, 4), seed=3)
    images = torch.randn(2, 1, 32, 32, 32) * 100
    batch = {"label": (torch.rand(2, 1, 32, 32, 32) > 0.9).float(), "raw": images}
    m1 = masker(images, batch, iteration=5)
    m2 = masker(images, batch, iteration=5)
    m3 = masker(images, batch, iteration=6)
    assert m1.shape == (2, 4, 4, 4) and m1.dtype == torch.bool
    assert m1.flatten(1).sum(1).tolist() == [48, 48]
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


def test_self_prior_follows_reconstruction_error():
    masker = StepMasker(8, ratio=0.5, mode="lesion_aware", prior_source="self", grid=(4, 4, 4),
                        ema=0.0)
    mask = torch.ones(1, 4, 4, 4, dtype=torch.bool)
    loss = torch.zeros(1, 64)
    loss[0, 21] = 10.0  # one hard patch
    masker.update(mask, loss)
    prior = masker.prior(torch.zeros(1, 1, 32, 32, 32), {}, progress=1.0)
    assert int(prior.flatten(1).argmax()) == 21
    assert "self_prior" in dict(masker.named_modules())  # its state goes into checkpoints


def test_partition_masks_show_every_patch_once():
    g = torch.Generator().manual_seed(0)
    masks = partition_masks(3, (4, 4, 2), 4, g)
    assert masks.shape == (4, 3, 4, 4, 2)
    visible = (~masks).sum(0)
    assert torch.all(visible == 1)
    counts = masks.flatten(2).sum(2)
    assert torch.all(counts == counts[:, :1])  # same count in every sample of a draw


def test_score_window_and_inferer_shapes():
    torch.manual_seed(0)
    net = create_model("vit_mae_tiny_p8_i32").eval()
    window = torch.randn(1, 1, 32, 32, 32)
    out = score_window(net, window, ratio=0.75)
    assert out.shape == (1, 2, 32, 32, 32) and torch.all(out[:, 1] >= 0)
    vol = torch.randn(1, 1, 40, 48, 32)
    maps = AnomalyInferer(roi_size=(32, 32, 32), overlap=0.25)(vol, net)
    assert maps.shape == (1, 2, 40, 48, 32) and torch.isfinite(maps).all()


def test_auroc():
    score = np.array([0.9, 0.8, 0.1, 0.2, 0.3])
    pos = np.array([1, 1, 0, 0, 0], bool)
    assert anomaly_auroc(score, pos, ~pos) == 1.0
    assert anomaly_auroc(-score, pos, ~pos) == 0.0
    with pytest.raises(ValueError):
        anomaly_auroc(score, np.zeros(5, bool), ~pos)


def test_plan_normalised_ct_and_mr():
    norm = {"CT": {"scheme": "ct_clip_zscore", "clip": [-100.0, 300.0], "mean": 100.0,
                   "std": 50.0},
            "MR": {"scheme": "mr_zscore_per_image", "nonzero": True}}
    t = PlanNormalized("image", norm)
    ct = t({"image": torch.tensor([[-1000.0, 100.0, 1000.0]]), "modality": "CT"})["image"]
    assert ct.tolist() == [[-4.0, 0.0, 4.0]]
    mr = t({"image": torch.tensor([[0.0, 10.0, 20.0, 30.0]]), "modality": "MR"})["image"]
    assert mr[0, 0] == 0 and abs(float(mr[0, 1:].mean())) < 1e-6
    from monai_mask.errors import ConfigError

    with pytest.raises(ConfigError):
        t({"image": torch.zeros(1, 3), "modality": "PET"})


def test_pretrain_transforms_crop_sample_data(sample_data):
    from monai_mask.data.datalist import load_datalist

    prepared = sample_data / "ct" / "prepared"
    item = load_datalist(prepared / "datalist.json")[1]
    out = pretrain_transforms(prepared / "plan.json", roi_size=(32, 32, 32), num_samples=2,
                              label_key="label", raw_key="raw")(item)
    assert len(out) == 2
    assert set(out[0]) == {"image", "label", "raw"}
    assert out[0]["image"].shape == (1, 32, 32, 32)
    assert float(out[0]["raw"].min()) < -500  # raw keeps Hounsfield units
    assert abs(float(out[0]["image"].mean())) < 5  # normalised
