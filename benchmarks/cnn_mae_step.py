"""Benchmark: SparK-style CNN MAE training step (forward, backward, AdamW).

Measures steps/s and peak memory of ``cnn_mae_resenc_small_s16_i96`` and
``cnn_mae_resenc_base_s32_i160`` (crop size set by ``--img``). On CPU each model runs in a
child process and the peak is that child's ``ru_maxrss``; on CUDA the step runs under bf16
autocast and the peak is ``torch.cuda.max_memory_allocated``.

Usage:
    python benchmarks/cnn_mae_step.py --json out.json --device cpu --img 64 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

MODELS = ("cnn_mae_resenc_small_s16_i96", "cnn_mae_resenc_base_s32_i160")


def machine(device: str) -> dict:
    """A short description of where the numbers come from."""
    import monai
    import torch

    info = {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "monai": monai.__version__, "device": device,
    }  # fmt: skip
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_model(name: str, device: str, img: int, steps: int, batch: int) -> dict:
    """Time ``steps`` training steps after one warm-up step; returns the measurements."""
    import torch

    from monai_mask.networks.registry import create_model

    torch.manual_seed(0)
    model = create_model(name, img_size=img).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1.0e-4, weight_decay=0.05)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, model.in_channels, img, img, img, device=device)
    use_amp = device == "cuda"

    def step() -> float:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_amp):
            loss, _, _ = model(x, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    step()  # warm-up (allocations, cudnn autotune)
    if use_amp:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if use_amp:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out = {
        "model": name, "img": img, "batch": batch, "steps": steps,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "steps_per_s": steps / elapsed, "s_per_step": elapsed / steps, "loss": loss,
        "patch_size": list(model.patch_size), "autocast": "bf16" if use_amp else "fp32",
    }  # fmt: skip
    if use_amp:
        out["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:  # this function runs in its own child process: its peak RSS is the model's
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
    return out


def run_child(name: str, args: argparse.Namespace) -> dict:
    """Run one model in a fresh process (CPU peak memory = that process's ru_maxrss)."""
    cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--img",
           str(args.img), "--steps", str(args.steps), "--batch", str(args.batch)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"model": name, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--img", type=int, default=96, help="cubic crop size (multiple of 32)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_model(args.child, args.device, args.img, args.steps, args.batch)))
        return 0
    results = {"machine": machine(args.device), "runs": [run_child(m, args) for m in args.models]}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if all("error" not in r for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
