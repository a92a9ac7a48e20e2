"""Tests of the 3D ViT masked autoencoder (tiny synthetic volumes)."""

from __future__ import annotations

import math

import pytest
import torch

from monai_mask.networks import vit_mae
from monai_mask.networks.pos_embed import get_3d_sincos_pos_embed, interpolate_pos_embed
from monai_mask.networks.vit_mae import MaskedAutoencoderViT3D


def tiny(**kw) -> MaskedAutoencoderViT3D:
    torch.manual_seed(0)
    return vit_mae.vit_mae_tiny_p8_i32(**kw)


def grid_mask(batch: int, grid: tuple[int, int, int], n_masked: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(grid)
    idx = torch.stack([torch.randperm(n, generator=g)[:n_masked] for _ in range(batch)])
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask.reshape(batch, *grid)


@pytest.mark.parametrize("channels", [1, 4])
def test_patchify_round_trip_non_cubic(channels):
    model = tiny(in_channels=channels, img_size=(32, 16, 24))
    imgs = torch.randn(2, channels, 32, 16, 24)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 4 * 2 * 3, 8**3 * channels)
    # first token is the corner patch, channels fastest inside a patch
    corner = imgs[:, :, :8, :8, :8].permute(0, 2, 3, 4, 1).reshape(2, -1)
    torch.testing.assert_close(patches[:, 0], corner)
    # token order is C-order over (gh, gw, gd): token 1 is the next patch along D
    nxt = imgs[:, :, :8, :8, 8:16].permute(0, 2, 3, 4, 1).reshape(2, -1)
    torch.testing.assert_close(patches[:, 1], nxt)
    assert torch.equal(model.unpatchify(patches, (4, 2, 3)), imgs)


def test_patchify_rejects_sizes_not_multiple_of_patch():
    with pytest.raises(ValueError):
        tiny().patchify(torch.randn(1, 1, 32, 30, 32))


def test_forward_shapes_and_random_mask_ratio():
    model = tiny(in_channels=2)
    imgs = torch.randn(3, 2, 32, 32, 32)
    loss, pred, mask = model(imgs, generator=torch.Generator().manual_seed(1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (3, 64, 8**3 * 2)
    assert mask.dtype == torch.bool and mask.shape == (3, 64)
    assert mask.sum(1).tolist() == [48, 48, 48]


def test_random_masking_reproducible_and_consistent():
    model = tiny()
    m1, r1 = model.random_masking(4, torch.Generator().manual_seed(3))
    m2, r2 = model.random_masking(4, torch.Generator().manual_seed(3))
    m3, _ = model.random_masking(4, torch.Generator().manual_seed(4))
    assert torch.equal(m1, m2) and torch.equal(r1, r2) and not torch.equal(m1, m3)
    assert m1.sum(1).tolist() == [48] * 4
    # ids_restore undoes a visible-first ordering: the first 16 shuffled ids are visible
    ids_shuffle = torch.argsort(r1, dim=1)
    assert not torch.gather(m1, 1, ids_shuffle[:, :16]).any()


def test_encoder_sees_only_visible_tokens():
    model = tiny()
    seen = []
    model.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    mask = grid_mask(2, (4, 4, 4), n_masked=40)
    model(torch.randn(2, 1, 32, 32, 32), mask=mask)
    assert seen == [torch.Size([2, 24, 96])]


def test_encoder_ignores_masked_content_and_uses_visible():
    model = tiny().eval()
    mask = grid_mask(1, (4, 4, 4), n_masked=48)
    imgs = torch.randn(1, 1, 32, 32, 32)
    pix_mask = mask.repeat_interleave(8, 1).repeat_interleave(8, 2).repeat_interleave(8, 3)[:, None]
    latent, _ = model.forward_encoder(imgs, mask)
    latent_m, _ = model.forward_encoder(imgs + 5.0 * pix_mask, mask)  # change hidden patches
    latent_v, _ = model.forward_encoder(imgs + 5.0 * (~pix_mask), mask)  # change visible ones
    torch.testing.assert_close(latent, latent_m)
    assert not torch.allclose(latent, latent_v)


def test_external_mask_returned_and_ids_restore_order():
    model = tiny()
    mask = grid_mask(2, (4, 4, 4), n_masked=32)
    _, pred, out_mask = model(torch.randn(2, 1, 32, 32, 32), mask=mask.float())
    assert torch.equal(out_mask, mask.flatten(1))
    latent, ids_restore = model.forward_encoder(torch.randn(2, 1, 32, 32, 32), mask)
    shuffled_mask = torch.gather(mask.flatten(1), 1, torch.argsort(ids_restore, dim=1))
    assert not shuffled_mask[:, :32].any() and shuffled_mask[:, 32:].all()
    assert latent.shape == (2, 32, 96)


def test_loss_only_from_masked_patches():
    model = tiny()
    imgs = torch.randn(2, 1, 32, 32, 32)
    mask = grid_mask(2, (4, 4, 4), n_masked=48).flatten(1)
    pred = torch.randn(2, 64, 512)
    base = model.forward_loss(imgs, pred, mask)
    changed_visible = pred.clone()
    changed_visible[~mask] += 10.0
    changed_masked = pred.clone()
    changed_masked[mask] += 10.0
    torch.testing.assert_close(model.forward_loss(imgs, changed_visible, mask), base)
    assert model.forward_loss(imgs, changed_masked, mask) > base + 1.0
    per_patch = model.forward_loss(imgs, pred, mask, reduction="none")
    assert per_patch.shape == (2, 64)
    torch.testing.assert_close(per_patch[mask].mean(), base)


def test_norm_pix_loss_uses_per_patch_normalised_targets():
    imgs = torch.rand(1, 1, 32, 32, 32)
    pred = torch.randn(1, 64, 512)
    plain, normed = tiny(), tiny(norm_pix_loss=True)
    # an affine change of intensity leaves normalised targets (hence the loss) unchanged
    torch.testing.assert_close(
        normed.per_patch_loss(imgs, pred), normed.per_patch_loss(3.0 * imgs + 7.0, pred)
    )
    scaled = plain.per_patch_loss(3 * imgs, pred)
    assert not torch.allclose(plain.per_patch_loss(imgs, pred), scaled)
    target = normed.patchify(imgs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    zeros = torch.zeros(1, 64)
    torch.testing.assert_close(normed.per_patch_loss(imgs, target), zeros, atol=1e-5, rtol=0)


def test_mask_with_unequal_counts_or_wrong_shape_raises():
    model = tiny()
    imgs = torch.randn(2, 1, 32, 32, 32)
    mask = grid_mask(2, (4, 4, 4), n_masked=48)
    flat = mask.flatten(1).clone()
    flat[1, torch.nonzero(~flat[1])[0, 0]] = True  # sample 1 hides one more
    with pytest.raises(ValueError, match="same number"):
        model(imgs, mask=flat)
    with pytest.raises(ValueError, match="mask shape"):
        model(imgs, mask=torch.zeros(2, 4, 4, 3, dtype=torch.bool))


def test_all_visible_mask_runs_and_loss_is_zero():
    model = tiny()
    loss, pred, mask = model(torch.randn(1, 1, 32, 32, 32), mask=torch.zeros(1, 64))
    assert not mask.any() and loss.item() == 0.0 and pred.shape == (1, 64, 512)


def test_sincos_pos_embed_shape_and_values():
    emb = get_3d_sincos_pos_embed(96, (4, 3, 2))
    assert emb.shape == (1, 24, 96) and emb.dtype == torch.float32
    assert emb.abs().max() <= 1.0
    assert torch.unique(emb[0], dim=0).shape[0] == 24  # every position distinct
    odd = get_3d_sincos_pos_embed(64, (2, 2, 2))  # 64 = 6 * 10 + 4 zero channels
    assert odd.shape == (1, 8, 64) and torch.all(odd[..., 60:] == 0)


def test_interpolate_pos_embed_shape_and_identity():
    emb = get_3d_sincos_pos_embed(48, (4, 4, 4))
    assert interpolate_pos_embed(emb, (4, 4, 4), (4, 4, 4)) is emb
    up = interpolate_pos_embed(emb, (4, 4, 4), (8, 6, 4))
    assert up.shape == (1, 8 * 6 * 4, 48)
    with pytest.raises(ValueError):
        interpolate_pos_embed(emb, (4, 4, 3), (8, 8, 8))


def test_model_runs_on_larger_crop_with_interpolated_pos_embed():
    model = tiny()  # built for 32^3 (grid 4^3)
    imgs = torch.randn(1, 1, 48, 40, 32)
    mask = grid_mask(1, (6, 5, 4), n_masked=90)
    loss, pred, _ = model(imgs, mask=mask)
    assert pred.shape == (1, 120, 512) and torch.isfinite(loss)
    assert model.unpatchify(pred, (6, 5, 4)).shape == (1, 1, 48, 40, 32)


def test_all_trainable_parameters_get_gradients():
    model = tiny(cls_token=True)
    loss, _, _ = model(torch.randn(2, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "patch_embedding.position_embeddings" in frozen and "decoder_pos_embed" in frozen


def test_attention_goes_through_sdpa(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape if args else kwargs["query"].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    tiny()(torch.randn(1, 1, 32, 32, 32), mask=grid_mask(1, (4, 4, 4), 48))
    assert len(calls) == 3  # 2 encoder blocks + 1 decoder block
    assert calls[0][-2] == 16 and calls[-1][-2] == 64  # visible tokens, then all tokens


def test_factories_and_overrides():
    model = vit_mae.vit_mae_tiny_p4_i32(in_channels=3, norm_pix_loss=True)
    assert model.patch_size == (4, 4, 4) and model.num_patches == 512 and model.norm_pix_loss
    assert model.decoder_pred.out_features == 4**3 * 3
    with pytest.raises(TypeError):
        vit_mae.vit_mae_tiny_p8_i32(no_such_option=1)


def test_registry_lists_and_creates_vit_maes():
    pytest.importorskip("monai_mask.networks.cnn_mae")  # the registry imports both modules
    from monai_mask.networks.registry import create_model, list_models

    names = set(list_models("vit_mae*"))
    assert {"vit_mae_base_p16_i96", "vit_mae_base_p8_i96", "vit_mae_small_p16_i96",
            "vit_mae_tiny_p8_i32", "vit_mae_tiny_p4_i32"} <= names  # fmt: skip
    assert create_model("vit_mae_tiny_p8_i32", in_channels=4).in_channels == 4


@pytest.mark.slow
def test_base_models_build_and_step():
    for factory in (vit_mae.vit_mae_base_p16_i96, vit_mae.vit_mae_small_p16_i96):
        model = factory()
        gen = torch.Generator().manual_seed(0)
        loss, pred, mask = model(torch.randn(1, 1, 96, 96, 96), generator=gen)
        loss.backward()
        assert pred.shape == (1, 216, 16**3) and mask.sum().item() == 162
    base = vit_mae.vit_mae_base_p8_i96()
    encoder = sum(
        p.numel() for n, p in base.named_parameters() if not n.startswith(("decoder", "mask"))
    )
    assert 85e6 < encoder < 90e6  # ViT-B
