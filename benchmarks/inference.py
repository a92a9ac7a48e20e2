"""Seconds and peak memory to segment a CT-sized volume on CPU: PyTorch vs onnxruntime.

Two modes, each engine in its own child process so that its peak resident memory (``ru_maxrss``
of that child, from ``os.wait4``) is its own:

* default (``network``): the segmentation bundle's network (default tiny ViT UNETR,
  ``vit_mae_tiny_p8_i32`` at 32^3, **untrained** seeded weights: speed and memory do not depend
  on the weights) over a whole preprocessed volume of ``--shape`` with the bundle's sliding
  windows (32^3, ``sw_batch_size`` 4, overlap 0.5, gaussian blending, aggregation on the CPU),
  then argmax to a uint8 label map. ``torch``: the ``nn.Module``; ``onnx``: the ONNX export of
  the same network (``monai_mask.deploy.export``) run by onnxruntime, one window batch at a
  time, through the same ``SlidingWindowInferer``.
* ``--bundle-path``: the whole inference path of ``bundles/tumor_segmentation/configs/
  inference.json`` (read an uncompressed NIfTI of ``--shape`` in LPS orientation at the plan's
  spacing, reorient, resample, normalise, sliding windows, argmax, invert, write the label
  NIfTI) with PyTorch, for the memory bound of a large volume. ``--stub-network`` replaces the
  network with a 1x1x1 convolution with the same inputs and outputs, so the memory of the path
  (whole-volume buffers) is measured in minutes rather than hours; the network's own share is
  the ``network`` mode's peak minus its ``rss_before_inference_mb``.

    python benchmarks/inference.py --json docs/benchmarks/inference.json --shape 512 512 300
    python benchmarks/inference.py --json docs/benchmarks/inference_bound.json \\
        --bundle-path --stub-network --shape 512 512 600
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "tumor_segmentation"
PLAN = REPO / "sample_data" / "ct" / "prepared" / "plan.json"
ROI, SW_BATCH, OVERLAP, MAE = (32, 32, 32), 4, 0.5, "vit_mae_tiny_p8_i32"


def _network() -> torch.nn.Module:
    from monai_mask.engines.finetune import segmentation_network_from_mae

    torch.manual_seed(0)
    return segmentation_network_from_mae(MAE, ROI, out_channels=2).eval()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _windows(shape) -> int:
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    interval = _get_scan_interval(tuple(shape), ROI, 3, (OVERLAP,) * 3)
    return len(dense_patch_slices(tuple(shape), ROI, interval))


def child_network(spec: dict) -> dict:
    """One engine over an in-memory (1, 1, *shape) volume; labels as uint8."""
    from monai.inferers import SlidingWindowInferer

    from monai_mask.deploy.export import OnnxPredictor

    torch.set_num_threads(spec["threads"])
    net = _network() if spec["engine"] == "torch" else OnnxPredictor(spec["onnx"], spec["threads"])
    volume = torch.randn(1, 1, *spec["shape"], generator=torch.Generator().manual_seed(0))
    inferer = SlidingWindowInferer(ROI, sw_batch_size=SW_BATCH, overlap=OVERLAP, mode="gaussian",
                                   device=torch.device("cpu"))
    before = _peak_mb()
    start = time.perf_counter()
    with torch.inference_mode():
        logits = inferer(volume, net)
        labels = logits.argmax(1).to(torch.uint8)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_before_inference_mb": before,
            "foreground_fraction": float(labels.float().mean())}


def child_bundle(spec: dict) -> dict:
    """``inference.json`` run through ``ConfigWorkflow`` on a NIfTI file (PyTorch)."""
    from monai.bundle import ConfigWorkflow

    torch.set_num_threads(spec["threads"])
    overrides = {"input_path": spec["image"], "output_dir": spec["out"],
                 "ckpt_path": spec["ckpt"], "plan_file": str(PLAN), "formats": ["nifti"],
                 "device": "$torch.device('cpu')", "amp": False}
    if spec["stub"]:
        overrides["network_def"] = "$torch.nn.Conv3d(@in_channels, @out_channels, 1)"
    wf = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "inference.json"),
                        meta_file=str(BUNDLE / "configs" / "metadata.json"), logging_file=False,
                        workflow_type="infer", bundle_root=str(BUNDLE), **overrides)
    wf.initialize()
    before = _peak_mb()
    start = time.perf_counter()
    wf.run()
    seconds = time.perf_counter() - start
    wf.finalize()
    written = sorted(p.name for p in Path(spec["out"]).iterdir())
    return {"seconds": seconds, "rss_before_inference_mb": before, "written": written}


def run_child(spec: dict, tmp: Path) -> dict:
    """Run one measurement in a child process; its own peak RSS from ``os.wait4``."""
    spec_path, result_path = tmp / "spec.json", tmp / "result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec_path)], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['engine']} child failed with exit code {proc.returncode}")
    result = json.loads(result_path.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    result_path.unlink()
    return result


def write_volume(path: Path, shape) -> None:
    """Uncompressed int16 NIfTI of CT-like noise, LPS orientation, the plan's spacing."""
    import nibabel as nib

    spacing = json.loads(PLAN.read_text())["target_spacing"]
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1000, size=tuple(shape), dtype=np.int16)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))


def network_mode(args, tmp: Path) -> dict:
    results = {}
    for engine in args.engines:
        spec = {"mode": "network", "engine": engine, "shape": args.shape, "threads": args.threads}
        if engine == "onnx":
            from monai_mask.deploy.export import export_onnx

            spec["onnx"] = str(export_onnx(_network(), torch.zeros(1, 1, *ROI), tmp / "seg.onnx"))
        results[engine] = run_child(spec, tmp)
        print(engine, json.dumps(results[engine]), flush=True)
    return results


def bundle_mode(args, tmp: Path) -> dict:
    image, ckpt = tmp / "ct.nii", tmp / "model.pt"
    write_volume(image, args.shape)
    net = torch.nn.Conv3d(1, 2, 1) if args.stub_network else _network()
    torch.save(net.state_dict(), ckpt)
    spec = {"mode": "bundle", "engine": "torch", "shape": args.shape, "threads": args.threads,
            "image": str(image), "ckpt": str(ckpt), "out": str(tmp / "out"),
            "stub": args.stub_network}
    result = run_child(spec, tmp)
    print("bundle", json.dumps(result), flush=True)
    return {"torch": result}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo")
               if line.startswith("MemTotal"))
    import onnxruntime

    return {"cpu": cpu, "cpus": os.cpu_count(), "mem_gib": round(mem / 2**20, 1),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "load_avg_at_start": os.getloadavg()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    p.add_argument("--engines", nargs="+", choices=["torch", "onnx"], default=["torch", "onnx"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bundle-path", action="store_true", help="the whole inference.json path")
    p.add_argument("--stub-network", action="store_true", help="1x1x1 conv instead of the net")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child.read_text())
        result = (child_bundle if spec["mode"] == "bundle" else child_network)(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return
    report = {"machine": machine(), "shape": args.shape, "threads": args.threads,
              "network": f"{MAE} UNETR, untrained" if not args.stub_network else "1x1x1 conv stub",
              "sliding_window": {"roi": ROI, "sw_batch_size": SW_BATCH, "overlap": OVERLAP,
                                 "mode": "gaussian", "aggregation": "cpu"},
              "windows": _windows(args.shape),
              "mode": "bundle-path" if args.bundle_path else "network"}
    with tempfile.TemporaryDirectory() as tmp:
        run = bundle_mode if args.bundle_path else network_mode
        report["results"] = run(args, Path(tmp))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        tmp_json = args.json.with_name(f".{args.json.name}.tmp")
        tmp_json.write_text(text + "\n")
        os.replace(tmp_json, args.json)


if __name__ == "__main__":
    main()
