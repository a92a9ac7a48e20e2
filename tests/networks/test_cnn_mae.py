"""SparkMAE3D: no leakage from masked regions, shapes, masked-only loss, stride alignment."""

from __future__ import annotations

import pytest
import torch

from monai_mask.networks.cnn_mae import SparkMAE3D, cnn_mae_resenc_tiny_s16_i32
from monai_mask.networks.registry import create_model, list_models


def _mask(batch: int = 2, grid: tuple[int, ...] = (2, 2, 2), seed: int = 0) -> torch.Tensor:
    """Fixed mask with masked and visible cells in every sample."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, *grid, generator=g) < 0.5
    mask.view(batch, -1)[:, 0] = True
    mask.view(batch, -1)[:, -1] = False
    return mask


def _fill_masked(model: SparkMAE3D, x: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """``x`` with every masked voxel replaced by large random values."""
    keep = model.visible_masks(mask)[0]
    noise = 1.0e3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return x * keep + noise * (1 - keep)


@pytest.fixture(scope="module")
def tiny() -> SparkMAE3D:
    torch.manual_seed(0)
    return cnn_mae_resenc_tiny_s16_i32().eval()


@pytest.mark.parametrize("sparse_norm", [True, False])
def test_masked_input_never_reaches_encoder_features(sparse_norm: bool) -> None:
    torch.manual_seed(0)
    model = cnn_mae_resenc_tiny_s16_i32(sparse_norm=sparse_norm).eval()
    mask = _mask()
    x = torch.randn(2, 1, 32, 32, 32)
    x2 = _fill_masked(model, x, mask, seed=1)
    assert not torch.equal(x, x2)
    with torch.no_grad():
        f1, f2 = model.forward_encoder(x, mask), model.forward_encoder(x2, mask)
        keeps = model.visible_masks(mask)[1:]
        for a, b, keep in zip(f1, f2, keeps, strict=True):
            assert torch.equal(a * keep, b * keep)  # atol 0 at visible positions
            assert torch.count_nonzero(a * (1 - keep)) == 0  # masked positions stay zero
        # the whole prediction is blind to masked input values as well
        assert torch.equal(model.forward_decoder(f1, mask), model.forward_decoder(f2, mask))


def test_leak_test_is_sensitive(tiny: SparkMAE3D) -> None:
    """Controls: a visible voxel change is seen; the unmasked encoder does see masked regions."""
    mask = _mask()
    x = torch.randn(2, 1, 32, 32, 32)
    keep = tiny.visible_masks(mask)[0]
    visible = keep[0, 0].nonzero()[0]
    x_vis = x.clone()
    x_vis[0, 0, visible[0], visible[1], visible[2]] += 5.0
    x_masked = _fill_masked(tiny, x, mask, seed=2)
    with torch.no_grad():
        base = tiny.forward_encoder(x, mask)
        assert not torch.equal(base[0], tiny.forward_encoder(x_vis, mask)[0])
        plain_a, plain_b = tiny.encoder(x), tiny.encoder(x_masked)
        keep_last = tiny.visible_masks(mask)[-1]
        assert not torch.equal(plain_a[-1] * keep_last, plain_b[-1] * keep_last)


def test_all_visible_equals_plain_encoder(tiny: SparkMAE3D) -> None:
    x = torch.randn(1, 1, 32, 32, 32)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    with torch.no_grad():
        masked = tiny.forward_encoder(x, mask)
        plain = tiny.encoder(x)
    for a, b in zip(masked, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "strides, filters", [((1, 2, 2, 2, 2), (8, 16, 16, 32, 32)), ((2, 2, (2, 2, 1)), (8, 16, 16))]
)
def test_prediction_shape_equals_input(strides, filters) -> None:
    model = SparkMAE3D(in_channels=2, filters=filters, strides=strides, img_size=32)
    x = torch.randn(1, 2, 32, 32, 32)
    loss, pred, mask = model(x, generator=torch.Generator().manual_seed(0))
    grid = model.mask_grid(32)
    assert pred.shape == x.shape
    assert mask.shape == (1, *grid) and mask.dtype == torch.bool
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_loss_counts_masked_voxels_only(tiny: SparkMAE3D) -> None:
    x = torch.randn(2, 1, 32, 32, 32)
    mask = _mask()
    pred = torch.randn_like(x)
    keep = tiny.visible_masks(mask)[0]
    loss = tiny.forward_loss(x, pred, mask)
    changed_visible = pred + 7.0 * keep * torch.randn_like(pred)
    assert torch.equal(tiny.forward_loss(x, changed_visible, mask), loss)
    changed_masked = pred + 7.0 * (1 - keep) * torch.randn_like(pred)
    assert not torch.allclose(tiny.forward_loss(x, changed_masked, mask), loss)
    per_patch = tiny.forward_loss(x, pred, mask, reduction="none")
    assert per_patch.shape == (2, 8)
    m = mask.flatten(1).float()
    torch.testing.assert_close(loss, (per_patch * m).sum() / m.sum())
    # the loss is the MSE over masked voxels
    expected = ((pred - x) ** 2 * (1 - keep)).sum() / (1 - keep).sum()
    torch.testing.assert_close(loss, expected)


def test_norm_pix_loss_targets_are_normalised_per_patch() -> None:
    model = cnn_mae_resenc_tiny_s16_i32(norm_pix_loss=True)
    x = 3.0 + 2.0 * torch.randn(1, 1, 32, 32, 32)
    patches = model.patchify(x)
    assert patches.shape == (1, 8, 16**3)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    target = (patches - mean) / (var + 1e-6) ** 0.5
    # a prediction equal to the normalised target: invert patchify's permutation
    pred = target.view(1, 2, 2, 2, 16, 16, 16, 1).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape)
    assert torch.equal(model.patchify(pred), target)
    assert model.per_patch_loss(x, pred).max() < 1e-8
    assert model.per_patch_loss(x, x).min() > 1.0  # raw pixels are not the target


def test_patch_size_must_equal_total_stride() -> None:
    with pytest.raises(ValueError, match="total stride"):
        SparkMAE3D(filters=(8, 16, 32, 64, 64), strides=(1, 2, 2, 2, 2), img_size=32, patch_size=8)
    SparkMAE3D(filters=(8, 16, 32), strides=(1, 2, 2), img_size=32, patch_size=4)
    with pytest.raises(ValueError, match="divisible"):
        SparkMAE3D(filters=(8, 16, 32, 64, 64), strides=(1, 2, 2, 2, 2), img_size=40)


def test_mask_grid_mismatch_is_rejected(tiny: SparkMAE3D) -> None:
    x = torch.randn(1, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="does not match the grid"):
        tiny(x, mask=torch.zeros(1, 4, 4, 4, dtype=torch.bool))  # an 8-voxel block mask
    with pytest.raises(ValueError, match="divisible"):
        tiny(torch.randn(1, 1, 40, 32, 32))


def test_random_masking_exact_ratio_and_generator(tiny: SparkMAE3D) -> None:
    grid = (4, 4, 4)
    m1 = tiny.random_masking(3, grid, torch.Generator().manual_seed(5))
    m2 = tiny.random_masking(3, grid, torch.Generator().manual_seed(5))
    assert torch.equal(m1, m2)
    assert m1.flatten(1).sum(1).tolist() == [48, 48, 48]  # 0.75 * 64 per sample


def test_gradients_reach_encoder_decoder_and_mask_tokens() -> None:
    model = cnn_mae_resenc_tiny_s16_i32()
    loss, _, _ = model(torch.randn(2, 1, 32, 32, 32), mask=_mask())
    loss.backward()
    assert model.encoder.input_block.conv1.conv.weight.grad.abs().sum() > 0
    assert model.encoder.bottleneck.conv1.conv.weight.grad.abs().sum() > 0
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in model.mask_tokens)
    assert model.decoder_pred.conv.weight.grad.abs().sum() > 0


def test_two_dimensional_model() -> None:
    model = SparkMAE3D(spatial_dims=2, filters=(8, 16, 32), strides=(1, 2, 2), img_size=16)
    x = torch.randn(2, 1, 16, 16)
    loss, pred, mask = model(x, generator=torch.Generator().manual_seed(0))
    assert pred.shape == x.shape and mask.shape == (2, 4, 4) and torch.isfinite(loss)


def test_registry_factories_and_overrides() -> None:
    names = list_models("cnn_mae*")
    assert {"cnn_mae_resenc_tiny_s16_i32", "cnn_mae_resenc_small_s16_i96",
            "cnn_mae_resenc_base_s32_i160"} <= set(names)  # fmt: skip
    model = create_model("cnn_mae_resenc_tiny_s16_i32", in_channels=3, img_size=64)
    assert model.config["in_channels"] == 3 and model.mask_grid(model.img_size) == (4, 4, 4)
    assert model.patch_size == (16, 16, 16)
    assert SparkMAE3D(**model.config).config == model.config


@pytest.mark.slow
def test_base_factory_patch_size() -> None:
    model = create_model("cnn_mae_resenc_base_s32_i160")
    assert model.patch_size == (32, 32, 32) and model.mask_grid(160) == (5, 5, 5)
