"""MAE pretraining engines: MONAI ``SupervisedTrainer``/``SupervisedEvaluator`` with a masking step.

The trainer keeps everything a MONAI bundle expects (handlers, events, ``max_epochs``, key
metrics, AMP), and replaces the iteration: the batch mask is drawn on the device by a
:class:`~monai_mask.engines.masker.StepMasker`, the MAE computes its masked-patch loss, and the
step's per-patch losses feed the self-guided prior. The evaluator reports the masked-region
reconstruction error on held-out volumes with masks fixed by the iteration index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from monai_mask.engines.masker import StepMasker

__all__ = ["MAEPretrainer", "MAEEvaluator", "autocast_for", "lower_is_better", "output_item"]


def autocast_for(device: torch.device | str, enabled: bool):
    """bf16 autocast where the device supports it (CUDA with bf16, or CPU), else a no-op.

    bf16 needs no gradient scaler, so the same step code serves every device.
    """
    device = torch.device(device)
    if not enabled:
        return nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for errors (MONAI's default keeps the largest metric)."""
    return current < best


def output_item(key: str) -> Callable:
    """``output_transform`` picking ``key`` of the engine output (for ignite metrics)."""

    def pick(output):
        items = output if isinstance(output, list) else [output]
        values = [torch.as_tensor(item[key]).detach().float().mean() for item in items]
        return torch.stack(values).mean()

    return pick


def _progress(engine) -> float:
    total = max(1, (engine.state.max_epochs or 1) * (engine.state.epoch_length or 1))
    return min(1.0, engine.state.iteration / total)


class MAEPretrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration masks, reconstructs and updates the prior.

    Args:
        masker: draws the batch mask on the device (see ``StepMasker``).
        amp: bf16 autocast (fp16 on CUDA devices without bf16), no scaler needed.
        clip_grad: max gradient norm (None: no clipping).
        The other arguments are those of ``SupervisedTrainer``; ``loss_function`` is not used
        (the MAE computes its own masked loss) and defaults to None.
    """

    def __init__(self, device, max_epochs: int, train_data_loader, network, optimizer,
                 masker: StepMasker, loss_function: Callable | None = None,
                 amp: bool = False, clip_grad: float | None = None,
                 train_handlers: Sequence | None = None, **kwargs) -> None:
        super().__init__(device=device, max_epochs=max_epochs,
                         train_data_loader=train_data_loader, network=network,
                         optimizer=optimizer, loss_function=loss_function or _unused_loss,
                         amp=False, train_handlers=train_handlers, **kwargs)
        self.masker = masker.to(device)
        self.use_amp = amp
        self.clip_grad = clip_grad

    def _iteration(self, engine, batchdata: dict) -> dict:
        images = batchdata[Keys.IMAGE].to(engine.state.device, non_blocking=engine.non_blocking)
        images = images.as_tensor() if hasattr(images, "as_tensor") else images
        mask = self.masker(images, batchdata, engine.state.iteration, _progress(engine))
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with autocast_for(images.device, self.use_amp):
            loss, pred, mask = engine.network(images, mask=mask)
        engine.state.output = {Keys.IMAGE: images, Keys.PRED: pred, Keys.LOSS: loss,
                               "mask": mask}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.clip_grad)
        engine.optimizer.step()
        with torch.no_grad():
            per_patch = _unwrap(engine.network).per_patch_loss(images, pred.detach())
        self.masker.update(mask, per_patch)
        engine.state.output[Keys.LOSS] = loss.detach()
        engine.state.output[Keys.PRED] = pred.detach()
        # MONAI decollates the batch and output here (``decollate=True``), so handlers written
        # for MONAI's trainers (``from_engine(["loss"], first=True)``, MLflow) work unchanged
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class MAEEvaluator(SupervisedEvaluator):
    """Masked-region reconstruction error on held-out crops, masks fixed per iteration index.

    Output keys (per sample after MONAI's decollation): ``image``, ``pred``, ``mask``,
    ``recon_mse`` (mean squared error over masked patches). Use ``output_item("recon_mse")``
    in ``key_val_metric`` and ``metric_cmp_fn=lower_is_better``.
    """

    def __init__(self, device, val_data_loader, network, masker: StepMasker, amp: bool = False,
                 **kwargs) -> None:
        super().__init__(device=device, val_data_loader=val_data_loader, network=network,
                         amp=False, **kwargs)
        self.masker = masker.to(device)
        self.use_amp = amp

    def _iteration(self, engine, batchdata: dict) -> dict:
        images = batchdata[Keys.IMAGE].to(engine.state.device, non_blocking=engine.non_blocking)
        images = images.as_tensor() if hasattr(images, "as_tensor") else images
        mask = self.masker(images, batchdata, engine.state.iteration, 1.0)
        engine.network.eval()
        with torch.no_grad(), autocast_for(images.device, self.use_amp):
            _, pred, mask = engine.network(images, mask=mask)
            per_patch = _unwrap(engine.network).per_patch_loss(images, pred)
        m = mask.reshape(per_patch.shape).float()
        recon = (per_patch * m).sum(1) / m.sum(1).clamp_min(1.0)
        engine.state.output = {Keys.IMAGE: images, Keys.PRED: pred, "mask": mask,
                               "recon_mse": recon}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if hasattr(network, "module") else network


def _unused_loss(*_args, **_kwargs):  # pragma: no cover - never called
    raise RuntimeError("MAEPretrainer computes the MAE loss inside the network")
