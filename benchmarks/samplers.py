"""Speed of the patch-grid mask samplers against a plain per-sample Python loop.

Measures masks per second and milliseconds per batch of 8 on a 12^3 patch grid for the
vectorised samplers of :mod:`monai_mask.masking.functional` (random, block, lesion-aware
with a label prior) and for a straightforward reference that loops over samples and blocks
in Python with numpy. Writes a JSON file and prints a table::

    python benchmarks/samplers.py --json docs/benchmarks/samplers.json [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from monai_mask.masking import (
    block_masking,
    lesion_aware_block_masking,
    prior_from_labels,
    random_masking,
)

GRID = (12, 12, 12)
BATCH = 8


# ----------------------------------------------------------------------------- reference
def _loop_block(mask: np.ndarray, rng: np.random.Generator, centre=None, margin: int = 0):
    """Add one block (sides 2..4 + 2 * margin) to ``mask`` in place, uniform or centred."""
    size = np.minimum(rng.integers(2, 5, size=3) + 2 * margin, GRID)
    if centre is None:
        start = [rng.integers(-(s - 1), g) for s, g in zip(size, GRID, strict=True)]
    else:
        start = [c - (s - 1) // 2 for c, s in zip(centre, size, strict=True)]
    sl = tuple(slice(max(a, 0), max(a + s, 0)) for a, s in zip(start, size, strict=True))
    mask[sl] = True


def _loop_fix(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Remove random surplus patches or add random patches, one at a time."""
    flat = mask.ravel()
    while flat.sum() > n:
        flat[rng.choice(np.flatnonzero(flat))] = False
    while flat.sum() < n:
        flat[rng.choice(np.flatnonzero(~flat))] = True
    return flat.reshape(GRID)


def loop_sampler(mode: str, prior: np.ndarray | None, ratio: float, rng: np.random.Generator):
    """Per-sample, per-block Python reference of the three samplers (numpy)."""
    num = int(np.prod(GRID))
    n_mask = round(ratio * num)
    out = np.zeros((BATCH, *GRID), dtype=bool)
    for b in range(BATCH):
        if mode == "random":
            out[b].ravel()[np.argsort(rng.random(num))[:n_mask]] = True
            continue
        mask = np.zeros(GRID, dtype=bool)
        if mode == "lesion_aware":
            p = prior[b].ravel() + 1e-6
            p = 0.9 * p / p.sum() + 0.1 / num
            while mask.sum() < round(0.7 * n_mask):
                centre = np.unravel_index(rng.choice(num, p=p), GRID)
                _loop_block(mask, rng, centre, margin=1)
        while mask.sum() < n_mask:
            _loop_block(mask, rng)
        out[b] = _loop_fix(mask, n_mask, rng)
    return out


# ----------------------------------------------------------------------------- timing
def _time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Best of three rounds of mean seconds per call."""
    for _ in range(max(3, repeats // 10)):
        fn()
    sync()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def _label_prior(device: torch.device) -> torch.Tensor:
    """Prior of a ball lesion (radius 10 voxels) in a 96^3 label, patch 8 -> 12^3 grid."""
    axes = [torch.arange(96, dtype=torch.float32)] * 3
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    ball = ((zz - 40) ** 2 + (yy - 52) ** 2 + (xx - 60) ** 2) <= 10**2
    label = ball.float().expand(BATCH, 1, 96, 96, 96).to(device)
    return prior_from_labels(label, 8, dilation=1)


def machine() -> dict:
    """CPU model, cores, torch version and the device name."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    info = {"cpu_model": model, "cpu_cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def run(device: torch.device, repeats: int, ratio: float) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)
    prior = _label_prior(device)
    prior_np = prior.cpu().numpy()
    rng = np.random.default_rng(0)
    cases = {
        "random": lambda: random_masking(BATCH, GRID, ratio, gen, device=device),
        "block": lambda: block_masking(BATCH, GRID, ratio, gen, device=device),
        "lesion_aware": lambda: lesion_aware_block_masking(prior, ratio, gen),
        "loop_random": lambda: loop_sampler("random", None, ratio, rng),
        "loop_block": lambda: loop_sampler("block", None, ratio, rng),
        "loop_lesion_aware": lambda: loop_sampler("lesion_aware", prior_np, ratio, rng),
    }
    results = {}
    for name, fn in cases.items():
        reps = repeats if not name.startswith("loop") else max(repeats // 10, 5)
        sec = _time(fn, reps, sync)
        results[name] = {"ms_per_batch8": sec * 1e3, "masks_per_s": BATCH / sec}
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="output JSON file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = run(device, args.repeats, args.ratio)
    vec, loop = results["lesion_aware"], results["loop_lesion_aware"]
    report = {
        "grid": list(GRID), "batch": BATCH, "ratio": args.ratio, "device": str(device),
        "repeats": args.repeats, "machine": machine(), "samplers": results,
        "ms_per_batch8": vec["ms_per_batch8"],
        "speedup_vs_loop": loop["ms_per_batch8"] / vec["ms_per_batch8"],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"{'sampler':<20}{'ms / batch of 8':>16}{'masks / s':>12}")
    for name, r in results.items():
        print(f"{name:<20}{r['ms_per_batch8']:>16.3f}{r['masks_per_s']:>12.0f}")
    print(f"lesion-aware speed-up vs loop: {report['speedup_vs_loop']:.1f}x")
    return report


if __name__ == "__main__":
    main()
