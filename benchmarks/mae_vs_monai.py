"""Training-step speed and peak memory: our ViT MAE vs MONAI's ``MaskedAutoEncoderViT``.

Both models get the identical configuration: ViT-B encoder (hidden 768, 12 layers, 12 heads,
MLP 3072), MONAI's default decoder (384 wide, MLP 512, 4 layers, 12 heads), 96^3 inputs with
one channel, 75 % of the patches masked, AdamW, MSE on the masked patches. Each model runs in
its own child process so that its peak memory is its own (CPU: ``ru_maxrss``; GPU:
``torch.cuda.max_memory_allocated``); on CUDA the forward pass runs under bf16 autocast.

Usage:
    python benchmarks/mae_vs_monai.py --patch 8 --json docs/bench_p8.json [--device cpu]
        [--steps 3] [--warmup 2] [--img 96] [--batch B]
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

VIT_B = dict(hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12)
MONAI_DECODER = dict(decoder_hidden_size=384, decoder_mlp_dim=512, decoder_num_layers=4,
                     decoder_num_heads=12)  # fmt: skip  (MONAI MaskedAutoEncoderViT defaults)
MASK_RATIO = 0.75


def build(name: str, patch: int, img: int) -> torch.nn.Module:
    """The model ``name`` ("ours" or "monai") at the shared configuration."""
    if name == "ours":
        from monai_mask.networks.vit_mae import MaskedAutoencoderViT3D

        return MaskedAutoencoderViT3D(in_channels=1, img_size=img, patch_size=patch,
                                      mask_ratio=MASK_RATIO, **VIT_B, **MONAI_DECODER)  # fmt: skip
    from monai.networks.nets import MaskedAutoEncoderViT

    return MaskedAutoEncoderViT(in_channels=1, img_size=img, patch_size=patch,
                                masking_ratio=MASK_RATIO, **VIT_B, **MONAI_DECODER)  # fmt: skip


def make_step(name: str, model: torch.nn.Module, x: torch.Tensor, device: str):
    """A closure doing forward, masked-patch MSE, backward and one AdamW step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1.5e-4, weight_decay=0.05)
    gen = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    p = model.patch_embedding.patch_embeddings.kernel_size[0]
    b, g = x.shape[0], x.shape[-1] // p

    def target() -> torch.Tensor:  # same patch order as the conv tokens; same cost for both
        t = x.reshape(b, 1, g, p, g, p, g, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return t.reshape(b, g**3, p**3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            if name == "ours":
                loss, _, _ = model(x, generator=gen)
            else:
                pred, mask = model(x)
                per_patch = (pred.float() - target()).pow(2).mean(-1)
                loss = (per_patch * mask).sum() / mask.sum()
        loss.backward()
        opt.step()

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args: argparse.Namespace) -> dict:
    """Measure one model; runs in its own process."""
    torch.manual_seed(0)
    model = build(args.child, args.patch, args.img).to(args.device).train()
    x = torch.randn(args.batch, 1, args.img, args.img, args.img, device=args.device)
    step = make_step(args.child, model, x, args.device)
    base = rss_mb()
    for _ in range(args.warmup):
        step()
    sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args.device)
    elapsed = time.perf_counter() - t0
    out = {"steps": args.steps, "seconds": elapsed, "steps_per_s": args.steps / elapsed,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}  # fmt: skip
    if args.device == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["rss_after_build_mb"] = base
        out["step_peak_mb"] = out["peak_mb"] - base
    return out


def machine(device: str) -> dict:
    cpu = platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}  # fmt: skip
    import monai

    info["monai"] = monai.__version__
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_child(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--patch", str(args.patch),
           "--img", str(args.img), "--device", args.device, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{name} benchmark failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patch", type=int, choices=(8, 16), required=True)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (cpu 3, cuda 20)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--img", type=int, default=96)
    ap.add_argument("--batch", type=int, default=None, help="default: 1 on cpu, 2 on cuda")
    ap.add_argument("--child", choices=("ours", "monai"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.steps = args.steps or (20 if args.device == "cuda" else 3)
    args.batch = args.batch or (2 if args.device == "cuda" else 1)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    results = {name: run_child(name, args) for name in ("ours", "monai")}
    ours, theirs = results["ours"], results["monai"]
    config = {"patch": args.patch, "img": args.img, "tokens": (args.img // args.patch) ** 3,
              "batch": args.batch, "mask_ratio": MASK_RATIO, "warmup": args.warmup,
              "bf16_autocast": args.device == "cuda", **VIT_B, **MONAI_DECODER}  # fmt: skip
    report = {"machine": machine(args.device), "device": args.device, "config": config,
              "models": results,
              "throughput_ratio": ours["steps_per_s"] / theirs["steps_per_s"],
              "peak_memory_ratio": ours["peak_mb"] / theirs["peak_mb"]}  # fmt: skip
    if args.device == "cpu":
        report["step_memory_ratio"] = ours["step_peak_mb"] / theirs["step_peak_mb"]
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
