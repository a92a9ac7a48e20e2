"""Tests of the MONAI transforms in monai_mask.masking.array / dictionary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import list_data_collate
from monai.transforms import Compose

from monai_mask.errors import ConfigError, InputError
from monai_mask.masking import (
    LesionPrior,
    LesionPriord,
    RandPatchMask,
    RandPatchMaskd,
    prior_from_labels,
)

LESION = (slice(None), slice(2, 4), slice(4, 6), slice(6, 8))  # lesion patches at size 4


def _case() -> dict:
    """A 32^3 CT-like case: air, fat body, a soft-tissue lesion cube (8^3 voxels)."""
    image = torch.full((1, 32, 32, 32), -1000.0)
    image[:, 2:30, 2:30, 2:30] = -150.0
    image[:, 8:16, 16:24, 24:32] = 40.0
    label = torch.zeros(1, 32, 32, 32)
    label[:, 8:16, 16:24, 24:32] = 1
    return {"image": image, "label": label}


@pytest.mark.parametrize("mode", ["random", "block", "lesion_aware"])
def test_rand_patch_mask_shape_count_and_reproducibility(mode):
    image = torch.zeros(2, 32, 24, 16)
    a = RandPatchMask(8, ratio=0.5, mode=mode).set_random_state(seed=3)
    b = RandPatchMask(8, ratio=0.5, mode=mode).set_random_state(seed=3)
    masks_a = [a(image) for _ in range(3)]
    masks_b = [b(image) for _ in range(3)]
    assert masks_a[0].shape == (1, 4, 3, 2) and masks_a[0].dtype == torch.bool
    assert all(int(m.sum()) == 12 for m in masks_a)
    assert all(torch.equal(x, y) for x, y in zip(masks_a, masks_b, strict=True))
    assert not all(torch.equal(masks_a[0], m) for m in masks_a[1:])
    assert torch.equal(a(image, randomize=False), masks_a[-1])  # reuses the last draw
    other = RandPatchMask(8, ratio=0.5, mode=mode).set_random_state(seed=4)
    assert not all(torch.equal(x, other(image)) for x in masks_a)


def test_rand_patch_mask_uses_prior_and_checks_it():
    case = _case()
    prior = LesionPrior(4, source="label")(case["label"])
    assert prior.shape == (1, 8, 8, 8)
    masker = RandPatchMask(4, ratio=0.25, mode="lesion_aware").set_random_state(seed=0)
    hits = [masker(np.asarray(case["image"]), prior=prior[0])[LESION].float().mean()
            for _ in range(50)]
    assert np.mean(hits) > 0.8
    with pytest.raises(InputError):
        masker(case["image"], prior=torch.ones(1, 3, 8, 8))
    with pytest.raises(InputError, match="not divisible"):
        masker(torch.zeros(1, 30, 32, 32))
    with pytest.raises(ValueError):
        RandPatchMask(8, mode="checkerboard")


def test_lesion_prior_intensity_source():
    prior = LesionPrior(8, source="intensity", modality="ct")(_case()["image"])
    assert prior.shape == (1, 4, 4, 4) and prior[0, 1, 2, 3] == 1.0
    assert prior[0, 0, 0, 0] < 0.1


def test_lesion_priord_writes_prior_and_missing_keys():
    out = LesionPriord("image", patch_size=8, source="label", prior_key="prior")(_case())
    assert torch.equal(out["prior"], prior_from_labels(_case()["label"][None], 8)[:1])
    out = LesionPriord("image", patch_size=8, source="intensity")(_case())
    assert out["prior"][0, 1, 2, 3] == 1.0
    no_label = {"image": _case()["image"]}
    with pytest.raises(KeyError):
        LesionPriord("image", patch_size=8, source="label")(no_label)
    kept = LesionPriord("image", patch_size=8, source="label", allow_missing_keys=True)(no_label)
    assert set(kept) == {"image"}


@pytest.mark.parametrize("source, key", [("none", None), ("label", "label"),
                                         ("intensity", None), ("map", "prior")])
def test_rand_patch_maskd_sources(source, key):
    case = LesionPriord("image", patch_size=4, source="label")(_case())
    t = RandPatchMaskd("image", patch_size=4, ratio=0.25, prior_key=key, prior_source=source,
                       mask_key="mask")
    t.set_random_state(seed=1)
    outs = [t(case) for _ in range(40)]
    assert set(outs[0]) == {"image", "label", "prior", "mask"}
    assert outs[0]["mask"].shape == (1, 8, 8, 8) and int(outs[0]["mask"].sum()) == 128
    assert outs[0]["image"] is case["image"]
    lesion_hits = np.mean([float(o["mask"][LESION].float().mean()) for o in outs])
    if source == "none":
        assert lesion_hits < 0.5
    else:
        assert lesion_hits > 0.75


def test_rand_patch_maskd_reproducible_in_compose_and_collates():
    def pipeline():
        return Compose([
            LesionPriord("image", patch_size=8, source="label"),
            RandPatchMaskd("image", patch_size=8, prior_key="prior", prior_source="map"),
        ]).set_random_state(seed=5)

    first, second = pipeline(), pipeline()
    masks_1 = [first(_case())["mask"] for _ in range(3)]
    masks_2 = [second(_case())["mask"] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(masks_1, masks_2, strict=True))
    batch = list_data_collate([first(_case()), first(_case())])
    assert batch["mask"].shape == (2, 1, 4, 4, 4) and batch["mask"].dtype == torch.bool


def test_rand_patch_maskd_missing_keys():
    t = RandPatchMaskd("image", patch_size=8, prior_key="prior", prior_source="map")
    with pytest.raises(KeyError):
        t({"label": torch.zeros(1, 32, 32, 32)})
    with pytest.raises(KeyError):
        t({"image": torch.zeros(1, 32, 32, 32)})
    lenient = RandPatchMaskd("image", patch_size=8, prior_key="prior", prior_source="map",
                             allow_missing_keys=True)
    assert "mask" not in lenient({"label": torch.zeros(1, 32, 32, 32)})
    out = lenient({"image": torch.zeros(1, 32, 32, 32)})  # no prior: plain block masking
    assert int(out["mask"].sum()) == 48
    with pytest.raises(ConfigError):
        RandPatchMaskd("image", patch_size=8, prior_source="label")
