"""TorchScript and ONNX exports of the segmentation and detection networks, onnxruntime runs.

* The segmentation network (``UNETR``/``ViTUNETR`` or ``DynUNet`` of
  :func:`monai_mask.engines.finetune.segmentation_network_from_mae`) is exported as is: input
  ``image`` (B, C, *roi) float32, output ``pred`` (B, classes, *roi) float32 logits.
* The detector is exported as its network's forward only (MONAI's detection tutorials script
  ``detector.network``): :class:`DetectionHeadOutputs` flattens RetinaNet's head outputs to
  ``cls_logits_{l}`` (B, A * classes, *roi / stride_l) and ``box_regression_{l}``
  (B, A * 2 * dims, *roi / stride_l) per pyramid level ``l``; anchors, box decoding, score
  threshold and NMS stay in PyTorch (``RetinaNetDetector``).
* :class:`OnnxPredictor` runs an exported file in onnxruntime with the call signature of a
  network, so MONAI's ``SlidingWindowInferer`` drives it over a whole volume.

Files are written under a temporary name and renamed (:func:`monai_mask.io.writers.atomic_write`).
Every ONNX input and output has a dynamic batch axis; spatial axes are fixed to the window
(``roi``) the file was exported for. The layout is documented in docs/deploy.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from monai_mask.errors import InputError
from monai_mask.io.writers import atomic_write

__all__ = ["SEG_INPUT", "SEG_OUTPUT", "DetectionHeadOutputs", "export_torchscript",
           "export_onnx", "OnnxPredictor"]

SEG_INPUT, SEG_OUTPUT = "image", "pred"


class DetectionHeadOutputs(nn.Module):
    """A RetinaNet's forward as a flat tuple: classification maps per level, then box maps.

    Args:
        network: ``monai.apps.detection.networks.retinanet_network.RetinaNet`` (the
            ``network`` of a :func:`~monai_mask.networks.detection.build_detector` detector)
            whose forward returns the dict of per-level head outputs.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.num_levels = len(network.feature_extractor.level_strides)

    @property
    def output_names(self) -> list[str]:
        """``cls_logits_0..L-1`` then ``box_regression_0..L-1`` (finest level first)."""
        levels = range(self.num_levels)
        return [f"cls_logits_{i}" for i in levels] + [f"box_regression_{i}" for i in levels]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, C, *roi) -> ``2 * num_levels`` maps, in :attr:`output_names` order."""
        heads = self.network(images)
        return (*heads[self.network.cls_key], *heads[self.network.box_reg_key])


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | os.PathLike,
                       trace: bool = True) -> Path:
    """Save ``model`` (eval mode) as TorchScript: traced on ``example`` or scripted.

    ViT-based networks are traced (their Python control flow does not script); tracing fixes
    the spatial size to ``example``'s, the batch size stays free.
    """
    model = model.eval()
    with torch.no_grad():
        scripted = torch.jit.trace(model, example) if trace else torch.jit.script(model)
    return atomic_write(Path(path), lambda tmp: torch.jit.save(scripted, str(tmp)), ".pt")


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike,
                input_name: str = SEG_INPUT, output_names: Sequence[str] = (SEG_OUTPUT,),
                opset_version: int | None = None) -> Path:
    """Export ``model`` (eval mode) to one self-contained ONNX file with a dynamic batch axis.

    Args:
        model: network taking one (B, C, *roi) float32 tensor.
        example: input of the window size the file is made for (its batch size is free).
        path: destination ``.onnx``.
        input_name, output_names: graph names (one per output tensor, in order).
        opset_version: ONNX opset (default: the exporter's).
    """
    batch = torch.export.Dim("batch", min=1, max=1024)

    def write(tmp: Path) -> None:
        with torch.no_grad():
            torch.onnx.export(model.eval(), (example,), str(tmp), input_names=[input_name],
                              output_names=list(output_names), dynamic_shapes=({0: batch},),
                              opset_version=opset_version, dynamo=True, external_data=False,
                              verbose=False)  # fmt: skip

    return atomic_write(Path(path), write, ".onnx")


class OnnxPredictor:
    """An ONNX file run by onnxruntime, callable like the network it was exported from.

    ``predictor(x)`` takes a (B, C, *roi) tensor and returns a float32 tensor on ``x``'s
    device, or a tuple of them when the graph has several outputs (RetinaNet heads), which is
    what ``SlidingWindowInferer`` expects of a network.

    Args:
        path: exported ``.onnx`` file.
        num_threads: onnxruntime intra-op threads (None: onnxruntime's default).
        providers: onnxruntime execution providers, in order of preference.

    Raises:
        InputError: the file is missing or is not a loadable ONNX model.
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
            options.inter_op_num_threads = 1
        if not Path(path).is_file():
            raise InputError(path, "no such ONNX file")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own exception types
            raise InputError(path, f"not a loadable ONNX model ({type(e).__name__})") from e
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        feed = {self.input_name: np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)}
        outs = [torch.from_numpy(o).to(x.device) for o in self.session.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)
