"""What the detection bundle's ``inference.json`` exposes for MONAI Label's ``BundleInferTask``.

MONAI Label 0.8.5 (``monailabel/tasks/infer/bundle.py`` and ``basic_infer.py``) runs a bundle
whose folder name contains ``detection`` as follows: the config's ``preprocessing`` transforms,
each applied alone; ``network_def`` instantiated and ``models/model.pt`` loaded into it; the
config's ``detector`` with ``detector.network`` set to that loaded network, called as
``detector(batch, use_inferer=True)``; the first output dict merged into the data; the
config's ``postprocessing``; then its ``DetectionWriter`` reads ``data["box"]`` (``cccwhd``
world LPS mm, which Slicer's markups use) and ``data["label"]``.

Our ``network_def`` is the whole MONAI ``RetinaNetDetector`` (its ``state_dict`` is what
training saves), so :class:`BundleDetector` only forwards the batch to it, and
:class:`DetectorBoxesToWorldd` maps its voxel boxes to world millimetres with the same
function the bundle's evaluator uses
(:func:`monai_mask.engines.detection.image_boxes_to_world`).

Both bundles wrap their preprocessing in :func:`guard_string_items`: MONAI Label puts the
request's ``image_path`` (a string) next to ``image``, and MONAI 1.6's ``Spacingd`` updates
every ``image_*`` item with the image's meta data when the input is NIfTI, which fails on a
string. The guard moves such strings aside around ``Spacingd`` and back after it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn as nn
from monai.config import KeysCollection
from monai.transforms import MapTransform, Spacingd

__all__ = ["BundleDetector", "DetectorBoxesToWorldd", "StringItemsGuardd", "guard_string_items"]

_HIDDEN = "__hidden__"


class StringItemsGuardd(MapTransform):
    """Move string items named ``f"{key}_*"`` aside (``hide=True``) or back (``hide=False``).

    Args:
        keys: image keys whose ``f"{key}_"``-prefixed string items are moved.
        hide: move them to ``"__hidden__<name>"`` (True) or restore them (False).
    """

    def __init__(self, keys: KeysCollection, hide: bool) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.hide = hide

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.keys:
            if self.hide:
                names = [k for k in d if isinstance(k, str) and k.startswith(f"{key}_")
                         and isinstance(d[k], str)]  # fmt: skip
                for name in names:
                    d[_HIDDEN + name] = d.pop(name)
            else:
                for name in [k for k in d if isinstance(k, str) and k.startswith(_HIDDEN)]:
                    d[name[len(_HIDDEN):]] = d.pop(name)
        return d


def guard_string_items(transforms: Sequence) -> list:
    """``transforms`` with every ``Spacingd`` between a hide and a restore ``StringItemsGuardd``."""
    out: list = []
    for t in transforms:
        if isinstance(t, Spacingd):
            out += [StringItemsGuardd(t.keys, hide=True), t, StringItemsGuardd(t.keys, hide=False)]
        else:
            out.append(t)
    return out


class BundleDetector:
    """The ``detector`` MONAI Label calls: forwards a batch to the loaded detector network.

    Args:
        network: the RetinaNet detector (``network_def``); MONAI Label replaces it with its
            copy holding ``models/model.pt``.
    """

    def __init__(self, network: nn.Module | None = None) -> None:
        self.network = network

    def eval(self) -> BundleDetector:
        """Put the detector network in eval mode (MONAI Label calls this before inference)."""
        if self.network is not None:
            self.network.eval()
        return self

    def __call__(self, images: torch.Tensor, use_inferer: bool = True) -> list[dict]:
        """Detections per image of a ``(B, C, X, Y, Z)`` batch (voxel ``xyzxyz`` boxes).

        Raises:
            RuntimeError: no network was set.
        """
        if self.network is None:
            raise RuntimeError("BundleDetector has no network (MONAI Label sets it)")
        batch = [x.as_tensor() if hasattr(x, "as_tensor") else x for x in images]
        return self.network(batch, use_inferer=use_inferer)


class DetectorBoxesToWorldd(MapTransform):
    """One image's detector output -> world LPS mm ``cccwhd`` boxes, best first.

    Reads ``box`` (N, 6) voxel ``xyzxyz`` of the preprocessed ``image`` (whose ``MetaTensor``
    affine undoes the plan's reorientation and resampling), ``label_key`` and its
    ``f"{label_key}_scores"``. Writes ``box`` (M, 6) float64 tensor in world LPS mm,
    ``label`` (M,) and ``score`` (M,) tensors: the boxes scoring at least ``min_score``,
    sorted by decreasing score.

    Args:
        box_key: detector box key (replaced by the world boxes).
        label_key: detector label key (the bundle's ``box_label``).
        image_key: key of the preprocessed image.
        min_score: boxes scoring below are dropped (MONAI Label returns no scores).
    """

    def __init__(self, box_key: str = "box", label_key: str = "box_label",
                 image_key: str = "image", min_score: float = 0.0) -> None:
        super().__init__([box_key, label_key])
        self.box_key, self.label_key, self.image_key = box_key, label_key, image_key
        self.min_score = float(min_score)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        from monai_mask.engines.detection import image_boxes_to_world

        d = dict(data)
        scores = torch.as_tensor(d[f"{self.label_key}_scores"]).detach().float().cpu()
        keep = torch.nonzero(scores >= self.min_score).flatten()
        keep = keep[torch.argsort(scores[keep], descending=True)]
        boxes = torch.as_tensor(d[self.box_key]).detach().float().cpu().reshape(-1, 6)[keep]
        world = image_boxes_to_world(boxes, d[self.image_key].affine)
        d["box"] = torch.as_tensor(world, dtype=torch.float64)
        d["label"] = torch.as_tensor(d[self.label_key]).detach().cpu().reshape(-1)[keep].long()
        d["score"] = scores[keep]
        return d
