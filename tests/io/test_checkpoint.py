"""Tests of monai_mask.io.checkpoint: safe loading, key maps, strict reports, transfers."""

from __future__ import annotations

import os

import pytest
import torch
from monai.networks.nets import UNETR, MaskedAutoEncoderViT, ViT

from monai_mask.errors import CheckpointError
from monai_mask.io.checkpoint import (
    LoadReport,
    add_prefix,
    drop_cross_attn,
    extract_state_dict,
    load_checkpoint,
    load_encoder_into_unetr,
    load_into,
    load_pretrained,
    monai_mae_to_vit,
    pos_embed_resizer,
    save_checkpoint,
    strip_prefix,
    vit_mae_to_vit,
)
from monai_mask.networks.vit_mae import MaskedAutoencoderViT3D

# UNETR fixes patch 16 and 12 layers; keep everything else tiny
VIT_CFG = dict(hidden_size=48, mlp_dim=96, num_heads=3)


def small_mae(hidden: int = 48, **kw) -> MaskedAutoencoderViT3D:
    torch.manual_seed(0)
    cfg = dict(in_channels=1, img_size=32, patch_size=16, hidden_size=hidden, mlp_dim=96,
               num_layers=12, num_heads=3, decoder_hidden_size=24, decoder_mlp_dim=48,
               decoder_num_layers=1, decoder_num_heads=2)  # fmt: skip
    return MaskedAutoencoderViT3D(**{**cfg, **kw})


def small_unetr() -> UNETR:
    torch.manual_seed(1)
    return UNETR(1, 2, img_size=32, feature_size=8, proj_type="conv", **VIT_CFG)


# ---------------------------------------------------------------------- save / load
def test_safetensors_round_trip_and_format_inference(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5), "tied": None}
    sd["tied"] = sd["a"]  # shared storage is cloned, not refused
    path = save_checkpoint(sd, tmp_path / "w.safetensors")
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    out = load_checkpoint(path)
    assert set(out) == {"a", "b", "tied"}
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    # safetensors content is recognised by its header even under another suffix
    save_checkpoint(sd, tmp_path / "w.bin", format="safetensors")
    assert torch.equal(load_checkpoint(tmp_path / "w.bin")["b"], sd["b"])


def test_pt_round_trip_keeps_wrappers(tmp_path):
    obj = {"network": {"w": torch.ones(2)}, "epoch": 3, "optimizer": {"lr": [0.1]}}
    save_checkpoint(obj, tmp_path / "c.pt")
    out = load_checkpoint(tmp_path / "c.pt")
    assert out["epoch"] == 3 and torch.equal(out["network"]["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="safetensors"):
        save_checkpoint(obj, tmp_path / "c.safetensors")


def test_atomic_save_leaves_no_temp_files(tmp_path):
    target = tmp_path / "ckpt.pt"
    save_checkpoint({"w": torch.zeros(2)}, target)
    save_checkpoint({"w": torch.ones(2)}, target)  # overwrite
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    with pytest.raises(Exception):  # noqa: B017 - any pickling error
        save_checkpoint({"w": torch.ones(2), "bad": lambda: 0}, target)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.equal(load_checkpoint(target)["w"], torch.ones(2))  # old file intact


class _Payload:
    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.flag}",))


def test_crafted_pickle_payload_is_refused(tmp_path):
    flag = tmp_path / "FILE"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _Payload(str(flag))}, evil)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(evil)
    msg = str(err.value)
    assert msg.startswith(str(evil))
    assert "refused: checkpoint contains a pickled code payload" in msg
    assert "system" in msg
    with pytest.raises(CheckpointError):
        load_pretrained(torch.nn.Linear(1, 1), evil)
    assert not flag.exists()


def test_corrupt_truncated_and_missing_files(tmp_path):
    good = save_checkpoint({"w": torch.randn(64, 64)}, tmp_path / "good.pt")
    data = good.read_bytes()
    cases = {"trunc.pt": data[: len(data) // 2], "garbage.pt": b"not a checkpoint at all",
             "empty.pt": b"", "trunc.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_extract_state_dict_from_wrappers():
    sd = {"w": torch.ones(1)}
    for wrapped in (sd, {"state_dict": sd}, {"network": sd, "optimizer": {}},
                    {"model": {"state_dict": sd}}, {"encoder": sd, "epoch": 1}):  # fmt: skip
        assert extract_state_dict(wrapped) == sd
    assert extract_state_dict({"ema": sd, "model": {}}, key="ema") == sd
    with pytest.raises(CheckpointError, match="no state dict"):
        extract_state_dict({"epoch": 1, "lr": 0.1}, path="x.pt")


# ---------------------------------------------------------------------- key maps
def test_prefix_maps():
    sd = {"module.a": torch.ones(1), "b": torch.zeros(1)}
    assert set(strip_prefix(sd, "module.")) == {"a", "b"}
    assert set(add_prefix({"a": torch.ones(1)}, "vit.")) == {"vit.a"}


def test_drop_cross_attn():
    sd = {"blocks.0.cross_attn.to_q.weight": 1, "blocks.0.norm_cross_attn.weight": 2,
          "blocks.0.attn.qkv.weight": 3}  # fmt: skip
    kept = {"blocks.0.norm_cross_attn.weight", "blocks.0.attn.qkv.weight"}
    assert set(drop_cross_attn(sd)) == kept
    assert set(drop_cross_attn(sd, include_norm=True)) == {"blocks.0.attn.qkv.weight"}


def test_module_prefix_checkpoint_loads_via_map(tmp_path):
    model = small_mae()
    path = save_checkpoint({"state_dict": add_prefix(model.state_dict(), "module.")},
                           tmp_path / "ddp.pt")  # fmt: skip
    other = small_mae(qkv_bias=False)
    torch.nn.init.zeros_(other.norm.weight)
    report = load_pretrained(other, path, key_map=lambda s: strip_prefix(s, "module."))
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(other.norm.weight, model.norm.weight)
    with pytest.raises(CheckpointError, match="ddp.pt"):  # without the map nothing matches
        load_pretrained(small_mae(), path)


# ---------------------------------------------------------------------- transfers
def test_vit_mae_encoder_transfers_exactly_into_unetr(tmp_path):
    mae, unetr = small_mae().eval(), small_unetr().eval()
    path = save_checkpoint({"network": mae.state_dict(), "epoch": 1}, tmp_path / "mae.pt")
    report = load_encoder_into_unetr(unetr, path)
    vit_sd = unetr.state_dict()
    enc = vit_mae_to_vit(mae.state_dict())
    vit_keys = {k for k in vit_sd if k.startswith("vit.")}
    assert vit_keys == {f"vit.{k}" for k in enc} == set(report.loaded)
    for k in vit_keys:
        assert torch.equal(vit_sd[k], enc[k[4:]]), k
    assert all(not k.startswith("vit.") for k in report.missing)
    # the proof: UNETR's ViT computes what our encoder computes on an all-visible input
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        ours, _ = mae.forward_encoder(x, torch.zeros(2, 2, 2, 2, dtype=torch.bool))
        theirs, _ = unetr.vit(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_vit_mae_with_cls_token_loads_into_monai_vit():
    mae = small_mae(cls_token=True)
    vit = ViT(1, 32, 16, num_layers=12, pos_embed_type="sincos", **VIT_CFG)
    report = load_into(vit, mae.state_dict(), key_map=vit_mae_to_vit)
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == []
    assert torch.equal(vit.patch_embedding.position_embeddings,
                       mae.patch_embedding.position_embeddings)  # fmt: skip


def test_encoder_pretrained_on_smaller_crops_loads_into_larger_unetr():
    mae = small_mae()  # 32^3, grid 2^3
    unetr = UNETR(1, 2, img_size=64, feature_size=8, **VIT_CFG)  # grid 4^3
    with pytest.raises(CheckpointError, match="position_embeddings"):
        load_encoder_into_unetr(unetr, mae.state_dict())
    report = load_encoder_into_unetr(unetr, mae.state_dict(), pretrained_grid=(2, 2, 2))
    assert not [k for k in report.missing if k.startswith("vit.")]
    assert unetr.vit.patch_embedding.position_embeddings.shape == (1, 64, 48)
    resized = pos_embed_resizer((2, 2, 2), (4, 4, 4))(mae.state_dict())
    assert resized["decoder_pos_embed"].shape == (1, 64, 24)


def test_monai_masked_autoencoder_vit_map_loads_fully():
    torch.manual_seed(2)
    monai_mae = MaskedAutoEncoderViT(1, 32, 16, num_layers=12, **VIT_CFG)
    sd = monai_mae.state_dict()
    assert "blocks.12.weight" in sd and "norm.weight" not in sd  # the layout the map handles
    sd["blocks.0.cross_attn.to_q.weight"] = torch.zeros(48, 48)  # MONAI 1.5 leftover
    vit = ViT(1, 32, 16, num_layers=12, **VIT_CFG)
    report = load_into(vit, sd, key_map=monai_mae_to_vit)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(vit.norm.weight, sd["blocks.12.weight"])
    assert torch.equal(vit.blocks[3].attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])
    assert set(monai_mae_to_vit(sd, depth=12)) == set(monai_mae_to_vit(sd))
    unetr = small_unetr()
    load_encoder_into_unetr(unetr, monai_mae.state_dict())
    assert torch.equal(unetr.vit.norm.bias, sd["blocks.12.bias"])


def test_wrong_and_partial_checkpoints_fail_naming_the_file(tmp_path):
    wide = save_checkpoint(small_mae(hidden=96).state_dict(), tmp_path / "wide.safetensors")
    sd = small_mae().state_dict()
    partial_sd = {k: v for k, v in sd.items() if not k.startswith("blocks.11.")}
    partial = save_checkpoint(partial_sd, tmp_path / "partial.pt")
    unetr = small_unetr()
    before = {k: v.clone() for k, v in unetr.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"wide\.safetensors: .*shape mismatches"):
        load_encoder_into_unetr(unetr, wide)
    with pytest.raises(CheckpointError, match=r"partial\.pt: .*vit\.blocks\.11\."):
        load_encoder_into_unetr(unetr, partial)
    after = unetr.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched on failure


def test_load_into_allowed_sets_and_report():
    mae = small_mae()
    encoder_only = vit_mae_to_vit(mae.state_dict())
    target = small_mae()
    with pytest.raises(CheckpointError, match=r"<state dict>: .*: 21 missing \[mask_token"):
        load_into(target, encoder_only)
    report = load_into(target, encoder_only, allow_missing=("decoder_*", "mask_token"))
    assert isinstance(report, LoadReport)
    assert "mask_token" in report.missing and "decoder_pred.weight" in report.missing
    assert str(report).startswith(f"loaded {len(encoder_only)} tensors")
    extra = {**mae.state_dict(), "head.weight": torch.ones(1)}
    with pytest.raises(CheckpointError, match="1 unexpected"):
        load_into(target, extra)
    assert load_into(target, extra, allow_unexpected=("head.*",)).unexpected == ["head.weight"]
    # required_prefix beats the allowed patterns
    with pytest.raises(CheckpointError, match="missing"):
        load_into(target, encoder_only, allow_missing=("*",), required_prefix="decoder_")
