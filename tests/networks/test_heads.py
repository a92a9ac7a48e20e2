"""Segmentation networks from pretrained MAE encoders: builders, key maps, strict transfer."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from monai.networks.nets import UNETR, DynUNet

from monai_mask.errors import CheckpointError, ConfigError
from monai_mask.io.checkpoint import save_checkpoint
from monai_mask.networks.cnn_mae import SparkMAE3D, cnn_mae_resenc_tiny_s16_i32
from monai_mask.networks.heads import (
    DYNUNET_DECODER_PATTERNS,
    DYNUNET_ENCODER_PREFIXES,
    ViTUNETR,
    build_segmentation_network,
    cnn_mae_to_dynunet,
    load_pretrained_encoder,
    seg_config_from_mae,
)

_TINY_VIT = {"hidden_size": 48, "num_heads": 3, "mlp_dim": 96}


@pytest.fixture(scope="module")
def mae() -> SparkMAE3D:
    torch.manual_seed(0)
    return cnn_mae_resenc_tiny_s16_i32()


def _seg_net(mae: SparkMAE3D, **kwargs) -> DynUNet:
    torch.manual_seed(1)  # different init than the MAE, so a missed tensor shows
    return build_segmentation_network(out_channels=3, **seg_config_from_mae(mae), **kwargs)


def _is_decoder(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in DYNUNET_DECODER_PATTERNS)


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_key_map_loads_encoder_strictly(mae: SparkMAE3D, deep_supervision: bool) -> None:
    net = _seg_net(mae, deep_supervision=deep_supervision)
    mapped = cnn_mae_to_dynunet(mae.state_dict())
    target = net.state_dict()
    # strict load: any misnamed key or shape clash fails; absent keys are the decoder only
    net.load_state_dict({**target, **mapped}, strict=True)
    missing = set(target) - set(mapped)
    assert missing and all(_is_decoder(k) for k in missing)
    assert not any(_is_decoder(k) for k in mapped)
    assert all(k.startswith(DYNUNET_ENCODER_PREFIXES) or k.startswith("skip_layers.")
               for k in mapped)  # fmt: skip
    sd = net.state_dict()
    enc = mae.encoder.state_dict()
    assert {k for k in sd if k.startswith(DYNUNET_ENCODER_PREFIXES)} == set(enc)
    for k, v in enc.items():
        assert torch.equal(sd[k], v), k


def test_transferred_encoder_computes_the_same_features(mae: SparkMAE3D) -> None:
    net = _seg_net(mae)
    report = load_pretrained_encoder(net, mae.state_dict(), backbone="cnn")
    assert not report.unexpected and all(_is_decoder(k) for k in report.missing)
    x = torch.randn(1, 1, 32, 32, 32)
    mae.eval(), net.eval()
    with torch.no_grad():
        feats, h = [], x
        for block in [net.input_block, *net.downsamples, net.bottleneck]:
            h = block(h)
            feats.append(h)
        plain = mae.encoder(x)
        visible = mae.forward_encoder(x, torch.zeros(1, 2, 2, 2, dtype=torch.bool))
        assert net(x).shape == (1, 3, 32, 32, 32)
    for a, b, c in zip(feats, plain, visible, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


def test_load_from_checkpoint_file(mae: SparkMAE3D, tmp_path) -> None:
    path = save_checkpoint({"model": mae.state_dict(), "epoch": 3}, tmp_path / "mae.pt")
    net = _seg_net(mae)
    report = load_pretrained_encoder(net, path, backbone="cnn")
    assert report.path == str(path)
    assert torch.equal(net.bottleneck.conv2.conv.weight, mae.encoder.bottleneck.conv2.conv.weight)


def test_partial_checkpoint_fails_loudly(mae: SparkMAE3D) -> None:
    sd = dict(mae.state_dict())
    del sd["encoder.downsamples.1.conv2.conv.weight"]
    net = _seg_net(mae)
    before = net.input_block.conv1.conv.weight.clone()
    with pytest.raises(CheckpointError, match="downsamples.1.conv2.conv.weight"):
        load_pretrained_encoder(net, sd, backbone="cnn")
    assert torch.equal(net.input_block.conv1.conv.weight, before)  # nothing half-loaded


def test_unknown_key_is_rejected_by_the_map(mae: SparkMAE3D) -> None:
    sd = {**mae.state_dict(), "projector.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="projector.weight"):
        cnn_mae_to_dynunet(sd)


def test_shape_mismatch_fails(mae: SparkMAE3D) -> None:
    other = SparkMAE3D(filters=(8, 16, 32, 64, 96), strides=(1, 2, 2, 2, 2), img_size=32)
    net = _seg_net(mae)
    with pytest.raises(CheckpointError, match="bottleneck"):
        load_pretrained_encoder(net, other.state_dict(), backbone="cnn")


def test_cnn_builder_validates_settings(mae: SparkMAE3D) -> None:
    cfg = seg_config_from_mae(mae)
    assert cfg["backbone"] == "cnn" and cfg["filters"] == (8, 16, 32, 64, 64)
    with pytest.raises(ConfigError, match="unknown"):
        build_segmentation_network(out_channels=2, **cfg, hidden_size=8)
    with pytest.raises(ConfigError, match="divisible"):
        build_segmentation_network(out_channels=2, **{**cfg, "img_size": 40})
    with pytest.raises(ConfigError, match="filters"):
        build_segmentation_network("cnn", in_channels=1, out_channels=2, img_size=32,
                                   kernel_size=3, strides=(1, 2, 2))  # fmt: skip


def test_vit_builder_matches_mae_settings() -> None:
    net = build_segmentation_network(
        "vit", in_channels=2, out_channels=3, img_size=32, patch_size=8, num_layers=2, **_TINY_VIT
    )
    assert isinstance(net, ViTUNETR)
    vit = net.vit
    assert tuple(vit.patch_embedding.patch_embeddings.kernel_size) == (8, 8, 8)
    assert vit.patch_embedding.patch_embeddings.in_channels == 2
    assert len(vit.blocks) == 2 and vit.norm.normalized_shape == (48,)
    assert vit.blocks[0].attn.num_heads == 3
    assert vit.blocks[0].mlp.linear1.out_features == 96
    assert net(torch.randn(1, 2, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_vit_builder_uses_monai_unetr_for_p16_depth12() -> None:
    net = build_segmentation_network(
        "vit", in_channels=1, out_channels=2, img_size=32, patch_size=16, num_layers=12,
        **_TINY_VIT,
    )  # fmt: skip
    assert type(net) is UNETR and net.vit.blocks[0].attn.num_heads == 3


def test_general_unetr_reproduces_monai_unetr() -> None:
    torch.manual_seed(0)
    ours = ViTUNETR(1, 2, 32, patch_size=16, num_layers=12, **_TINY_VIT).eval()
    monai = UNETR(1, 2, 32, **_TINY_VIT).eval()
    monai.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), monai(x))


@pytest.mark.parametrize("patch", [2, 4])
def test_general_unetr_other_patch_sizes(patch: int) -> None:
    net = ViTUNETR(1, 2, 16, patch_size=patch, num_layers=3, **_TINY_VIT)
    assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_vit_builder_rejects_bad_patch() -> None:
    with pytest.raises(ConfigError, match="power-of-two"):
        build_segmentation_network("vit", in_channels=1, out_channels=2, img_size=36,
                                   patch_size=6, num_layers=2, **_TINY_VIT)  # fmt: skip


def test_vit_mae_to_segmentation() -> None:
    from monai_mask.networks.vit_mae import MaskedAutoencoderViT3D

    torch.manual_seed(0)
    mae = MaskedAutoencoderViT3D(in_channels=1, img_size=32, patch_size=8, num_layers=2,
                                 decoder_num_layers=1, decoder_hidden_size=32,
                                 decoder_num_heads=2, decoder_mlp_dim=64, **_TINY_VIT)  # fmt: skip
    if not isinstance(getattr(mae, "config", None), dict):
        pytest.skip("MaskedAutoencoderViT3D has no `config` dict yet")
    cfg = seg_config_from_mae(mae)
    assert cfg["backbone"] == "vit"
    net = build_segmentation_network(out_channels=2, **cfg)
    load_pretrained_encoder(net, mae.state_dict(), backbone="vit")
    for name, value in net.vit.state_dict().items():
        assert torch.equal(value, mae.state_dict()[name]), name
