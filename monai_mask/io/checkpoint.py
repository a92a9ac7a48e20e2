"""The one place where monai-mask saves and loads weights.

* ``save_checkpoint`` writes atomically (temp file in the same folder, then ``os.replace``),
  as safetensors for pure tensor dicts or ``torch.save`` otherwise.
* ``load_checkpoint`` reads with ``torch.load(..., weights_only=True)`` (or safetensors) and
  refuses pickles that carry code; ``extract_state_dict`` unwraps common containers.
* Key maps are pure ``(state_dict) -> state_dict`` functions (timm ``checkpoint_filter_fn``
  style): ``strip_prefix``, ``add_prefix``, ``drop_cross_attn``, ``vit_mae_to_vit``,
  ``monai_mae_to_vit``.
* ``load_into`` applies the maps, compares names and shapes with the model, loads, and
  returns a ``LoadReport``; anything missing or unexpected that was not explicitly allowed
  raises ``CheckpointError`` naming the file. There is no silent non-strict load.
"""

from __future__ import annotations

import fnmatch
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from monai.utils import look_up_option

from monai_mask.errors import CheckpointError
from monai_mask.networks.pos_embed import interpolate_pos_embed

__all__ = [
    "LoadReport",
    "save_checkpoint",
    "load_checkpoint",
    "extract_state_dict",
    "strip_prefix",
    "add_prefix",
    "drop_cross_attn",
    "vit_mae_to_vit",
    "monai_mae_to_vit",
    "pos_embed_resizer",
    "load_into",
    "load_pretrained",
    "load_encoder_into_unetr",
]

StateDict = dict[str, torch.Tensor]
KeyMap = Callable[[StateDict], StateDict]
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "network", "net", "encoder", "module")


# ---------------------------------------------------------------------- save / load
def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _safetensors_ready(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Contiguous CPU tensors; storage shared between entries is cloned (safetensors refuses it)."""
    out: StateDict = {}
    seen: set[int] = set()
    for k, v in sd.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


def save_checkpoint(
    obj: dict, path: str | os.PathLike, *, format: Literal["pt", "safetensors"] | None = None
) -> Path:
    """Save ``obj`` atomically: a temp file in the target folder is renamed over ``path``.

    Args:
        obj: a state dict or any ``torch.save``-able dict (tensors, numbers, strings, lists).
        path: destination; its folder is created if needed.
        format: ``"safetensors"`` (requires a flat ``str -> Tensor`` dict) or ``"pt"``;
            default: safetensors when ``path`` ends with ``.safetensors``, else ``"pt"``.

    Returns:
        the path written.

    Raises:
        CheckpointError: ``format="safetensors"`` for a dict that is not all tensors.
    """
    path = Path(path)
    fmt = format or ("safetensors" if path.suffix == ".safetensors" else "pt")
    fmt = look_up_option(fmt, ("pt", "safetensors"))
    if fmt == "safetensors" and not _is_tensor_dict(obj):
        raise CheckpointError(path, "safetensors needs a flat dict of str -> Tensor; use .pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(_safetensors_ready(obj), tmp, metadata={"format": "pt"})
        else:
            torch.save(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _refusal(err: pickle.UnpicklingError) -> str:
    msg = str(err)
    found = re.search(r"(unsupported GLOBAL \S+|Unsupported global: \S+ \S+)", msg, re.IGNORECASE)
    if found:
        return f"refused: checkpoint contains a pickled code payload ({found.group(1)})"
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
    reason = detail.group(1).strip() if detail else msg.splitlines()[0][:200]
    return f"refused: checkpoint pickle is not loadable with weights_only=True ({reason})"


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely; never executes pickled code.

    ``.pt/.pth/.ckpt`` files go through ``torch.load(..., weights_only=True)`` on the CPU;
    safetensors files (by suffix or header) through safetensors.

    Returns:
        the stored dict, unchanged (use ``extract_state_dict`` for the weights).

    Raises:
        CheckpointError: missing file; a pickle that needs code (refused); a corrupt or
            truncated file; content that is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        if path.suffix == ".safetensors" or _looks_like_safetensors(head):
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(path, _refusal(e)) from e
    except Exception as e:  # corrupt zip, truncated stream, bad header ...
        reason = " ".join(str(e).split())[:200] or "no detail"
        raise CheckpointError(
            path, f"corrupt or truncated checkpoint ({type(e).__name__}: {reason})"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"expected a dict, found {type(obj).__name__}")
    return obj


def extract_state_dict(
    obj: Mapping, *, key: str | None = None, path: str | os.PathLike | None = None
) -> StateDict:
    """The ``str -> Tensor`` state dict inside a checkpoint dict.

    Args:
        obj: a state dict, or a wrapper such as ``{"state_dict": ...}``, ``{"model": ...}``,
            ``{"network": ...}`` (MONAI ``CheckpointSaver``), ``{"encoder": ...}``; nested
            wrappers are followed.
        key: take ``obj[key]`` instead of searching ``WRAPPER_KEYS``.
        path: the file, for error messages.

    Raises:
        CheckpointError: no state dict found.
    """
    where = path if path is not None else "<checkpoint>"
    if key is not None:
        if key not in obj:
            raise CheckpointError(where, f"no entry {key!r}; entries: {sorted(map(str, obj))}")
        obj = obj[key]
    for _ in range(4):
        if _is_tensor_dict(obj) and len(obj) > 0:
            return dict(obj)
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = obj[inner]
    raise CheckpointError(
        where, f"no state dict found; top-level entries: {sorted(map(str, obj))[:12]}"
    )


# ---------------------------------------------------------------------- key maps
def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str = "module.") -> StateDict:
    """Remove ``prefix`` (default: DDP's ``module.``) from the keys that start with it."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}


def add_prefix(sd: Mapping[str, torch.Tensor], prefix: str = "vit.") -> StateDict:
    """Prepend ``prefix`` to every key (e.g. ``"vit."`` to load a ViT into MONAI UNETR)."""
    return {f"{prefix}{k}": v for k, v in sd.items()}


def drop_cross_attn(sd: Mapping[str, torch.Tensor], *, include_norm: bool = False) -> StateDict:
    """Drop MONAI 1.5 cross-attention leftovers ``*.cross_attn.*`` (and ``*.norm_cross_attn.*``
    when ``include_norm``, for targets without that norm)."""
    pat = re.compile(r"(^|\.)(norm_)?cross_attn\." if include_norm else r"(^|\.)cross_attn\.")
    return {k: v for k, v in sd.items() if not pat.search(k)}


_MAE_DECODER = re.compile(r"^(decoder_[^.]*|mask_token|mask_tokens|cls_token)(\.|$)")


def vit_mae_to_vit(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Our ``MaskedAutoencoderViT3D`` -> MONAI ``ViT`` keys.

    Encoder names are already MONAI's; the decoder (``decoder_*``, ``mask_token``) and the
    optional ``cls_token`` are dropped explicitly. Other keys pass through (and are then
    reported as unexpected by ``load_into``).
    """
    return drop_cross_attn({k: v for k, v in sd.items() if not _MAE_DECODER.match(k)})


def monai_mae_to_vit(sd: Mapping[str, torch.Tensor], depth: int | None = None) -> StateDict:
    """MONAI ``MaskedAutoEncoderViT`` -> MONAI ``ViT`` keys.

    MONAI's MAE stores its encoder as ``blocks = nn.Sequential(*transformer_blocks,
    LayerNorm)``, so the final encoder norm is ``blocks.{depth}.weight/bias``; it becomes
    ``norm.weight/bias``. ``cls_token``, ``mask_tokens``, ``decoder_embed``,
    ``decoder_pos_embedding``, ``decoder_blocks.*``, ``decoder_pred`` and MONAI 1.5
    ``cross_attn`` leftovers are dropped.

    Args:
        sd: the MAE state dict.
        depth: number of transformer blocks; inferred as the index of the block that holds
            only ``weight``/``bias`` when None.
    """
    if depth is None:
        found = (re.match(r"^blocks\.(\d+)\.(weight|bias)$", k) for k in sd)
        norm_ids = {int(m.group(1)) for m in found if m}
        if len(norm_ids) != 1:
            raise ValueError(f"cannot infer the encoder depth; norm-like blocks {sorted(norm_ids)}")
        depth = norm_ids.pop()
    out = {}
    for k, v in vit_mae_to_vit(sd).items():
        if k in (f"blocks.{depth}.weight", f"blocks.{depth}.bias"):
            k = "norm." + k.rsplit(".", 1)[1]
        out[k] = v
    return out


def pos_embed_resizer(
    old_grid: Sequence[int],
    new_grid: Sequence[int],
    keys: Iterable[str] = ("patch_embedding.position_embeddings", "decoder_pos_embed"),
) -> KeyMap:
    """A key map that resamples ``(1, L, E)`` position embeddings between patch grids.

    E.g. encoder pretrained on 96^3 crops (grid 6^3) -> UNETR on 128^3 (grid 8^3):
    ``pos_embed_resizer((6, 6, 6), (8, 8, 8))`` (trilinear, see ``interpolate_pos_embed``).
    Keys absent from the state dict are ignored.
    """
    keys = tuple(keys)

    def resize(sd: StateDict) -> StateDict:
        return {k: (interpolate_pos_embed(v, old_grid, new_grid) if k in keys else v)
                for k, v in sd.items()}  # fmt: skip

    return resize


# ---------------------------------------------------------------------- strict loading
@dataclass
class LoadReport:
    """What ``load_into`` did: names loaded, target keys missing from the checkpoint,
    checkpoint keys the target lacks, and ``(key, checkpoint shape, model shape)`` clashes."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    path: str | None = None

    def __str__(self) -> str:
        head = f"loaded {len(self.loaded)} tensors" + (f" from {self.path}" if self.path else "")
        return f"{head}; {_problems(self.missing, self.unexpected, self.shape_mismatch)}"


def _problems(missing: list, unexpected: list, mismatch: list) -> str:
    def few(items: list) -> str:
        if not items:
            return ""
        return f" [{', '.join(map(str, items[:5]))}{' ...' if len(items) > 5 else ''}]"

    return (f"{len(missing)} missing{few(missing)}; {len(unexpected)} unexpected{few(unexpected)}; "
            f"{len(mismatch)} shape mismatches{few(mismatch)}")  # fmt: skip


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _compare(model: nn.Module, sd: Mapping[str, torch.Tensor], path: str | None) -> LoadReport:
    target = model.state_dict()
    rep = LoadReport(path=path)
    for k, v in sd.items():
        if k not in target:
            rep.unexpected.append(k)
        elif tuple(v.shape) != tuple(target[k].shape):
            rep.shape_mismatch.append((k, tuple(v.shape), tuple(target[k].shape)))
        else:
            rep.loaded.append(k)
    rep.missing = [k for k in target if k not in sd]
    return rep


def _apply_maps(sd: Mapping[str, torch.Tensor], key_map: KeyMap | Iterable[KeyMap]) -> StateDict:
    maps = [key_map] if callable(key_map) else list(key_map)
    out = dict(sd)
    for fn in maps:
        out = fn(out)
    return out


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    key_map: KeyMap | Iterable[KeyMap] = (),
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    required_prefix: str | None = None,
    path: str | os.PathLike | None = None,
) -> LoadReport:
    """Map keys, check names and shapes, then load; fail loudly on anything not allowed.

    Args:
        model: the target network.
        state_dict: source tensors.
        key_map: one map or a list applied in order, each ``(state_dict) -> state_dict``.
        allow_missing: fnmatch patterns of model keys that may stay at their current values
            (e.g. ``"decoder*"``, ``"out.*"``).
        allow_unexpected: fnmatch patterns of checkpoint keys that may be ignored.
        required_prefix: keys under this prefix (e.g. ``"vit."``) must all load, whatever
            the allowed patterns say.
        path: the checkpoint file, named in errors and in the report.

    Returns:
        the ``LoadReport``.

    Raises:
        CheckpointError: a shape clash, a key under ``required_prefix`` missing, or a
            missing/unexpected key not in the allowed sets. The model is left untouched.
    """
    where = None if path is None else str(path)
    sd = _apply_maps(state_dict, key_map)
    rep = _compare(model, sd, where)
    prefix = required_prefix or None
    bad_missing = [
        k for k in rep.missing
        if not _matches(k, allow_missing) or (prefix is not None and k.startswith(prefix))
    ]  # fmt: skip
    bad_unexpected = [k for k in rep.unexpected if not _matches(k, allow_unexpected)]
    if bad_missing or bad_unexpected or rep.shape_mismatch:
        bad = _problems(bad_missing, bad_unexpected, rep.shape_mismatch)
        name = type(model).__name__
        raise CheckpointError(where or "<state dict>", f"does not match {name}: {bad}")
    result = model.load_state_dict({k: sd[k] for k in rep.loaded}, strict=False)
    # the non-strict call above is checked here, against the report computed beforehand
    if set(result.missing_keys) != set(rep.missing) or result.unexpected_keys:
        raise CheckpointError(where or "<state dict>", f"inconsistent load: {result}")
    return rep


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    key_map: KeyMap | Iterable[KeyMap] = (),
    **kwargs: Any,
) -> LoadReport:
    """``load_checkpoint`` + ``extract_state_dict`` + ``load_into`` (``kwargs`` go to it)."""
    sd = extract_state_dict(load_checkpoint(path), path=path)
    return load_into(model, sd, key_map=key_map, path=path, **kwargs)


def _encoder_map(sd: Mapping[str, torch.Tensor], source: str) -> list[KeyMap]:
    if source == "auto":
        if any(k.startswith("vit.") for k in sd):
            source = "unetr"
        elif "mask_tokens" in sd or "decoder_pos_embedding" in sd:
            source = "monai_mae"
        else:
            source = "vit_mae"  # covers plain ViT dicts too: nothing to drop
    return {
        "unetr": [lambda s: {k: v for k, v in s.items() if k.startswith("vit.")}],
        "monai_mae": [monai_mae_to_vit, lambda s: add_prefix(s, "vit.")],
        "vit_mae": [vit_mae_to_vit, lambda s: add_prefix(s, "vit.")],
        "vit": [drop_cross_attn, lambda s: add_prefix(s, "vit.")],
    }[source]


def load_encoder_into_unetr(
    unetr: nn.Module,
    path_or_sd: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    source: Literal["auto", "vit_mae", "monai_mae", "vit", "unetr"] = "auto",
    pretrained_grid: Sequence[int] | None = None,
) -> LoadReport:
    """Load a pretrained ViT encoder into MONAI ``UNETR`` (its ``vit.*`` submodule).

    Every ``vit.*`` tensor must load; the convolutional encoder/decoder of UNETR keeps its
    initialisation. ``module.`` (DDP) prefixes are stripped first.

    Args:
        unetr: a ``monai.networks.nets.UNETR`` (or any model with a ``vit`` submodule).
        path_or_sd: a checkpoint file or a state dict (wrappers are unwrapped).
        source: checkpoint layout: our ViT MAE, MONAI ``MaskedAutoEncoderViT``, a MONAI
            ``ViT``, a UNETR; ``"auto"`` guesses from the key names.
        pretrained_grid: patch grid the encoder was pretrained on; when given, the position
            embedding is resampled to the UNETR's grid (``unetr.feat_size``).
    """
    source = look_up_option(source, ("auto", "vit_mae", "monai_mae", "vit", "unetr"))
    path = None if isinstance(path_or_sd, Mapping) else path_or_sd
    raw = load_checkpoint(path_or_sd) if path is not None else path_or_sd
    sd = strip_prefix(extract_state_dict(raw, path=path), "module.")
    maps = _encoder_map(sd, source)
    if pretrained_grid is not None:
        key = "vit.patch_embedding.position_embeddings"
        maps.append(pos_embed_resizer(pretrained_grid, unetr.feat_size, keys=(key,)))
    return load_into(unetr, sd, key_map=maps, allow_missing=("*",), required_prefix="vit.",
                     path=path)  # fmt: skip
