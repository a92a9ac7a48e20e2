"""Run bundles the way users do: ``python -m monai.bundle run`` (or torchrun) in a subprocess."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"


def run_bundle(name: str, configs, overrides: dict, nproc: int = 1, extra=(), timeout=600):
    """Run ``configs`` of bundle ``name``; asserts success and returns the completed process."""
    bundle = BUNDLES / name
    files = [str(bundle / "configs" / c) for c in configs]
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "monai.bundle", "run", "--config_file",
            files[0] if len(files) == 1 else json.dumps(files),
            "--meta_file", str(bundle / "configs" / "metadata.json"),
            "--bundle_root", str(bundle), *extra]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def read_loss_csv(path: Path) -> list[tuple[int, int, float]]:
    """Rows ``(epoch, iteration, loss)`` written by ``LossCSVLogger``."""
    with open(path) as f:
        return [(int(r["epoch"]), int(r["iteration"]), float(r["loss"])) for r in csv.DictReader(f)]


def train_workflow(name: str, tmp_path: Path, **overrides):
    """``ConfigWorkflow`` of bundle ``name``'s train.json, initialised, outputs under tmp_path."""
    from monai.bundle import ConfigWorkflow

    configs = BUNDLES / name / "configs"
    wf = ConfigWorkflow(config_file=str(configs / "train.json"),
                        meta_file=str(configs / "metadata.json"),
                        logging_file=str(configs / "logging.conf"), workflow_type="train",
                        bundle_root=str(BUNDLES / name), output_dir=str(tmp_path),
                        ckpt_dir=str(tmp_path / "m"), **overrides)
    wf.initialize()
    return wf
