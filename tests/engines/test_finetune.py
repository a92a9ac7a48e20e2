"""monai_mask.engines.finetune: network from an MAE, encoder transfer, LR groups, label subsets."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from monai_mask.engines.finetune import (
    init_from_pretrained,
    num_encoder_layers,
    param_groups_lrd,
    segmentation_network_from_mae,
    select_labelled,
)
from monai_mask.errors import CheckpointError, ConfigError
from monai_mask.networks import create_model

VIT, CNN = "vit_mae_tiny_p8_i32", "cnn_mae_resenc_tiny_s16_i32"
ROI = (32, 32, 32)


@pytest.fixture(scope="module")
def vit_net():
    return segmentation_network_from_mae(VIT, ROI, out_channels=2)


@pytest.fixture(scope="module")
def cnn_net():
    return segmentation_network_from_mae(CNN, ROI, out_channels=2)


def _group_of(groups: list[dict]) -> dict[int, dict]:
    return {id(p): g for g in groups for p in g["params"]}


@pytest.mark.parametrize("name,cls", [(VIT, "ViTUNETR"), (CNN, "DynUNet")])
def test_network_from_mae_segments_a_crop(name, cls):
    net = segmentation_network_from_mae(name, ROI, out_channels=3).eval()
    assert type(net).__name__ == cls
    with torch.no_grad():
        assert net(torch.zeros(1, 1, *ROI)).shape == (1, 3, *ROI)


def test_vit_layer_decay_groups(vit_net):
    depth = num_encoder_layers(vit_net, "vit")
    assert depth == 2  # the tiny ViT has 2 blocks
    groups = param_groups_lrd(vit_net, "vit", base_lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    of = _group_of(groups)
    params = dict(vit_net.named_parameters())
    assert len(of) == len(params)  # each parameter in exactly one group
    scale = {n: of[id(p)]["lr_scale"] for n, p in params.items()}
    assert scale["vit.patch_embedding.patch_embeddings.weight"] == pytest.approx(0.5**3)
    assert scale["vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.5**2)
    assert scale["vit.blocks.1.attn.qkv.weight"] == pytest.approx(0.5)
    assert scale["out.conv.conv.weight"] == 1.0 and scale["vit.norm.weight"] == 1.0
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    decay = {n: of[id(p)]["weight_decay"] for n, p in params.items()}
    assert decay["vit.patch_embedding.position_embeddings"] == 0.0
    assert decay["vit.blocks.0.norm1.weight"] == 0.0 and decay["vit.blocks.0.mlp.linear1.bias"] == 0
    assert decay["vit.blocks.0.mlp.linear1.weight"] == 0.05


def test_cnn_layer_decay_counts_shared_dynunet_tensors_once(cnn_net):
    depth = num_encoder_layers(cnn_net, "cnn")
    assert depth == 4  # 3 downsampling stages + bottleneck
    groups = param_groups_lrd(cnn_net, "cnn", base_lr=1.0, layer_decay=0.5)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in cnn_net.parameters())
    of = _group_of(groups)
    params = dict(cnn_net.named_parameters())
    assert of[id(params["input_block.conv1.conv.weight"])]["lr"] == pytest.approx(0.5**5)
    assert of[id(params["downsamples.2.conv1.conv.weight"])]["lr"] == pytest.approx(0.5**2)
    assert of[id(params["bottleneck.conv1.conv.weight"])]["lr"] == pytest.approx(0.5)
    assert of[id(params["output_block.conv.conv.weight"])]["lr"] == 1.0


def test_layer_decay_one_is_plain_training_and_wrappers_unwrap(vit_net):
    class Wrapper(nn.Module):  # the shape of DistributedDataParallel: the net under `module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    groups = param_groups_lrd(Wrapper(vit_net), "vit", base_lr=0.1, layer_decay=1.0)
    assert {g["lr"] for g in groups} == {0.1}
    with pytest.raises(ConfigError, match="layer_decay"):
        param_groups_lrd(vit_net, "vit", base_lr=0.1, layer_decay=0.0)
    with pytest.raises(ConfigError, match="not a DynUNet"):
        param_groups_lrd(vit_net, "cnn", base_lr=0.1)


def test_select_labelled_is_seeded_nested_and_drops_unlabelled():
    data = [{"image": f"i{k}", "label": f"l{k}"} for k in range(10)] + [{"image": "u"}]
    quarter = select_labelled(data, 0.25, seed=3)
    assert len(quarter) == 2 and all("label" in d for d in quarter)
    assert quarter == select_labelled(data, 0.25, seed=3)
    half = select_labelled(data, 0.5, seed=3)
    assert all(d in half for d in quarter)  # nested: same seed, larger fraction
    assert half == sorted(half, key=data.index)  # datalist order kept
    assert len(select_labelled(data, 0.01, seed=0)) == 1
    assert select_labelled(data, 1.0) == data[:10]
    assert {d["image"] for d in select_labelled(data, 0.5, seed=4)} != {d["image"] for d in half}
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="label_fraction"):
            select_labelled(data, bad)
    with pytest.raises(ConfigError, match="no training case"):
        select_labelled([{"image": "u"}], 1.0)


def test_init_from_pretrained_loads_the_encoder(tmp_path):
    mae = create_model(VIT, img_size=list(ROI))
    torch.save(mae.state_dict(), tmp_path / "mae.pt")
    net = segmentation_network_from_mae(VIT, ROI, out_channels=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert init_from_pretrained(net, "", "vit") is net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    init_from_pretrained(net, tmp_path / "mae.pt", "vit")
    qkv = "vit.blocks.0.attn.qkv.weight"
    assert torch.equal(net.state_dict()[qkv], mae.state_dict()["blocks.0.attn.qkv.weight"])
    assert torch.equal(net.state_dict()["out.conv.conv.weight"], before["out.conv.conv.weight"])


def test_init_from_pretrained_rejects_mismatched_checkpoints(tmp_path):
    torch.save(create_model(CNN).state_dict(), tmp_path / "cnn.pt")
    torch.save(create_model(VIT, hidden_size=48, num_heads=3).state_dict(), tmp_path / "narrow.pt")
    net = segmentation_network_from_mae(VIT, ROI, out_channels=2)
    with pytest.raises(CheckpointError, match=r"cnn\.pt: does not match ViTUNETR"):
        init_from_pretrained(net, tmp_path / "cnn.pt", "vit")
    with pytest.raises(CheckpointError, match=r"narrow\.pt: does not match ViTUNETR.*shape"):
        init_from_pretrained(net, tmp_path / "narrow.pt", "vit")
    cnn = segmentation_network_from_mae(CNN, ROI, out_channels=2)
    with pytest.raises(CheckpointError):
        init_from_pretrained(cnn, tmp_path / "narrow.pt", "cnn")
