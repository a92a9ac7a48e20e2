"""Crops per second of the whole pretraining step against the model-only step.

The whole step is what ``bundles/mae_pretrain`` runs: a batch from a MONAI DataLoader over a
CacheDataset (random crops of cached, resampled, normalised volumes), copied to the device, a
lesion-aware mask drawn on the device (intensity prior), then forward, backward and AdamW. The
model-only step repeats forward, backward and AdamW on one batch already on the device with a
fixed mask. ``pipeline_to_model_ratio`` = whole / model-only throughput (1.0: data loading and
masking cost nothing).

    python benchmarks/pretrain_throughput.py --json docs/benchmarks/pretrain_throughput_cpu.json
    python benchmarks/pretrain_throughput.py --device cuda --crop 160 --workers 8 --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from monai_mask.engines.masker import StepMasker
from monai_mask.engines.pretrain import autocast_for
from monai_mask.networks import create_model

CPU_MODELS = {"vit": "vit_mae_tiny_p8_i32", "cnn": "cnn_mae_resenc_tiny_s16_i32"}
GPU_MODELS = {"vit": "vit_mae_base_p16_i96", "cnn": "cnn_mae_resenc_base_s32_i160"}


def machine(device: str) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "cores": torch.get_num_threads(), "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def make_loader(root: Path, crop: int, batch: int, workers: int, n_cases: int):
    """Prepared synthetic CT phantoms -> the bundle's train pipeline and loader."""
    from monai.data import CacheDataset, DataLoader

    from monai_mask.data.datalist import load_datalist
    from monai_mask.data.prepare import prepare_dataset
    from monai_mask.data.presets import pretrain_transforms
    from monai_mask.data.synthetic import write_dataset

    side = max(crop + 16, 64)
    write_dataset(root / "raw", n=n_cases, seed=0, modality="ct", shape=(side, side, side))
    prepare_dataset(root / "raw" / "imagesTr", root / "prepared", progress=False)
    transform = pretrain_transforms(root / "prepared" / "plan.json", roi_size=[crop] * 3,
                                    num_samples=1, raw_key="raw")
    data = load_datalist(root / "prepared" / "datalist.json")
    ds = CacheDataset(data, transform, cache_rate=1.0, num_workers=0, progress=False)
    return DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0, drop_last=True)


def step(net, opt, images, mask, amp: bool) -> None:
    opt.zero_grad(set_to_none=True)
    with autocast_for(images.device, amp):
        loss, _, _ = net(images, mask=mask)
    loss.backward()
    opt.step()


def timed(fn, steps: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        fn(i)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_model(name: str, loader, args) -> dict:
    device = torch.device(args.device)
    net = create_model(name, img_size=[args.crop] * 3).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    masker = StepMasker(net.patch_size, 0.75, "lesion_aware", "intensity", block_size=(1, 2),
                        modality="ct").to(device)
    batches = iter(_cycle(loader))
    fixed = next(batches)
    images = fixed["image"].to(device)
    mask = masker(images, {"raw": fixed["raw"].to(device)}, 0)

    def model_only(_):
        step(net, opt, images, mask, args.amp)

    def whole(i):
        b = next(batches)
        x = b["image"].to(device, non_blocking=True)
        m = masker(x, {"raw": b["raw"].to(device, non_blocking=True)}, i)
        step(net, opt, x, m, args.amp)

    for fn in (model_only, whole):
        timed(fn, args.warmup, args.device)
    t_model = timed(model_only, args.steps, args.device)
    t_whole = timed(whole, args.steps, args.device)
    crops = args.steps * args.batch
    return {"model": name, "model_only_crops_per_s": crops / t_model,
            "pipeline_crops_per_s": crops / t_whole,
            "pipeline_to_model_ratio": t_model / t_whole}


def _cycle(loader):
    while True:
        yield from loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--crop", type=int, default=None, help="crop side (CPU 32, GPU 160)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.crop = args.crop or (160 if gpu else 32)
    args.batch = args.batch or (2 if gpu else 4)
    args.amp = gpu
    models = GPU_MODELS if gpu else CPU_MODELS
    with tempfile.TemporaryDirectory() as tmp:
        loader = make_loader(Path(tmp), args.crop, args.batch, args.workers, args.cases)
        results = {k: bench_model(name, loader, args) for k, name in models.items()}
    out = {"machine": machine(args.device), "device": args.device, "crop": args.crop,
           "batch": args.batch, "workers": args.workers, "steps": args.steps, "amp": args.amp,
           "results": results,
           "pipeline_to_model_ratio": min(r["pipeline_to_model_ratio"] for r in results.values())}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    for k, r in results.items():
        print(f"{k:4s} {r['model']:32s} model-only {r['model_only_crops_per_s']:8.2f} crops/s  "
              f"whole step {r['pipeline_crops_per_s']:8.2f} crops/s  "
              f"ratio {r['pipeline_to_model_ratio']:.2f}")


if __name__ == "__main__":
    main()
