"""Ignite handlers used by the bundles: exact resume, per-epoch seeding, previews, loss CSV."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointSaver

from monai_mask.io.checkpoint import load_checkpoint

__all__ = ["EpochSeeder", "SafeCheckpointLoader", "TrainingCheckpointSaver", "PreviewSaver",
           "LossCSVLogger", "latest_checkpoint"]


def latest_checkpoint(folder: str | os.PathLike, prefix: str = "checkpoint") -> str:
    """Path of the newest ``{prefix}*.pt`` in ``folder`` by iteration number, or ``""``."""
    files = sorted(Path(folder).glob(f"{prefix}*.pt"),
                   key=lambda p: int("".join(c for c in p.stem.split("=")[-1] if c.isdigit()) or 0))
    return str(files[-1]) if files else ""


class EpochSeeder:
    """Reseeds data order and transform randomness at every epoch start from ``(seed, epoch)``.

    With it, epoch ``e`` sees the same crops in the same order whether the run started at epoch
    1 or resumed at ``e``: the sampler's epoch (a ``DistributedSampler``, also with one process,
    derives its permutation from ``seed + epoch`` alone), the DataLoader's generator (worker
    seeds) and, for ``num_workers=0``, the dataset transforms' random state. A plain
    ``RandomSampler`` would not do: it keeps drawing from a shared generator when an exhausted
    iterator is advanced, so an uninterrupted run and a resumed one would diverge.
    """

    def __init__(self, loader, seed: int = 0) -> None:
        self.loader, self.seed = loader, int(seed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from monai.data.utils import set_rnd

        epoch_seed = self.seed * 10_007 + int(engine.state.epoch)
        if getattr(self.loader, "generator", None) is not None:
            self.loader.generator.manual_seed(epoch_seed)
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(int(engine.state.epoch))
        set_rnd(self.loader.dataset, epoch_seed)


class SafeCheckpointLoader:
    """Resume training state from a checkpoint written by MONAI's ``CheckpointSaver``.

    Loads through :func:`monai_mask.io.checkpoint.load_checkpoint` (``weights_only=True``), so a
    file with a pickled code payload is refused. ``load_dict`` maps names to objects with
    ``load_state_dict`` (network, optimizer, lr scheduler, masker); the engine it is attached
    to is added as ``trainer`` (so configs need no circular reference); every name must be in
    the checkpoint (``include_engine=False`` for inference, where only weights load). Loading
    is strict: every tensor of every object must match. The configured ``max_epochs`` wins
    over the checkpoint's, so a finished run can be extended. An empty ``load_path`` does
    nothing (fresh start).
    """

    def __init__(self, load_path: str | os.PathLike | None, load_dict: dict,
                 include_engine: bool = True) -> None:
        self.load_path = str(load_path) if load_path else ""
        self.load_dict = load_dict
        self.include_engine = include_engine

    def attach(self, engine: Engine) -> None:
        if self.include_engine:
            self.load_dict.setdefault("trainer", engine)
        if self.load_path:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from monai_mask.errors import CheckpointError

        ckpt = load_checkpoint(self.load_path)
        if len(self.load_dict) == 1 and next(iter(self.load_dict)) not in ckpt:
            ckpt = {next(iter(self.load_dict)): ckpt}  # ignite saves a lone object unwrapped
        missing = sorted(set(self.load_dict) - set(ckpt))
        if missing:
            raise CheckpointError(self.load_path, f"resume checkpoint lacks {missing}")
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.load_dict, checkpoint=ckpt)
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)
        engine.logger.info(f"resumed from {self.load_path} at iteration {engine.state.iteration}")


class TrainingCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` that also saves the engine it is attached to as ``trainer``.

    Bundle configs cannot reference the trainer from its own handlers (circular reference); this
    adds the engine's state (iteration, epoch) to ``save_dict`` at attach time, so checkpoints
    carry everything :class:`SafeCheckpointLoader` needs for an exact resume. Files are written
    atomically by ignite's ``DiskSaver``.
    """

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        super().attach(engine)


class PreviewSaver:
    """PNG previews (input / mask / reconstruction, mid slices) every ``interval`` iterations."""

    def __init__(self, output_dir: str | os.PathLike, interval: int = 50,
                 network: torch.nn.Module | None = None) -> None:
        self.output_dir, self.interval, self.network = Path(output_dir), int(interval), network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from monai_mask.anomaly import reconstruction_image
        from monai_mask.visualize import mae_preview_png

        out = first_sample(engine.state.output)
        net = self.network or engine.network
        images = out["image"][None].detach().float()
        recon = reconstruction_image(net, images, out["pred"][None].detach().float())
        mask = out["mask"].reshape(1, *[s // p for s, p in
                                        zip(images.shape[2:], _patch(net), strict=True)])
        path = self.output_dir / f"preview_iter{engine.state.iteration:06d}.png"
        title = f"iteration {engine.state.iteration}"
        mae_preview_png(images[0, 0].cpu().numpy(), mask[0].cpu().numpy(),
                        recon[0, 0].cpu().numpy(), path, title=title)


def first_sample(output) -> dict:
    """The first sample's dict of an engine output, decollated (list) or not (batch dict)."""
    if isinstance(output, list):
        return output[0]
    return {k: (v[0] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in output.items()}


def _patch(net: torch.nn.Module):
    net = net.module if hasattr(net, "module") else net
    return net.patch_size


class LossCSVLogger:
    """Appends ``epoch, iteration, loss`` per iteration (and validation metrics) to a CSV."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        loss = first_sample(engine.state.output)["loss"]
        loss = float(loss.detach().float().mean()) if torch.is_tensor(loss) else float(loss)
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["epoch", "iteration", "loss"])
            w.writerow([engine.state.epoch, engine.state.iteration, f"{loss:.6g}"])
