"""Real-data pretraining run of bundles/mae_pretrain on CPU (tiny ViT MAE).

Data: the 208 training-split images of ../shared/data/real/mri_hippocampus_msd (the 52 cases of
benchmarks/splits/hippocampus_test.txt are held out) plus the abdominal CT and MR of
../shared/data/real/unlabeled_nifti. No labels are used. Writes the run to OUT and, with
``--docs``, the loss curve and a preview into bundles/mae_pretrain/docs/images/.

    python benchmarks/real_pretrain.py --out runs/real_pretrain --epochs 40 --docs
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
DOC_IMAGES = REPO / "bundles" / "mae_pretrain" / "docs" / "images"


def prepare(out: Path) -> Path:
    prepared = out / "prepared"
    if not (prepared / "plan.json").exists():
        hippocampus = REAL / "mri_hippocampus_msd" / "imagesTr"
        holdout = REPO / "benchmarks" / "splits" / "hippocampus_test.txt"
        subprocess.run([sys.executable, "-m", "monai_mask", "prepare", "--images",
                        str(hippocampus), str(REAL / "unlabeled_nifti"), "--out", str(prepared),
                        "--folds", "5", "--holdout", str(holdout)], check=True)
    return prepared


def pretrain(prepared: Path, out: Path, epochs: int) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "monai_mask", "pretrain", "--prepared", str(prepared),
                    "--out", str(out), "--epochs", str(epochs), "--backbone", "vit",
                    "--masking", "lesion_aware", "--prior", "intensity",
                    "--set", "batch_size=4", "--set", "learning_rate=0.0005",
                    "--set", "val_interval=5", "--set", "ckpt_interval=500",
                    "--set", "preview_interval=500"], check=True)
    return time.time() - start


def loss_curve(run: Path, png: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(run / "loss.csv")))
    it = [int(r["iteration"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(it, loss, lw=0.6, alpha=0.5, label="train loss (per iteration)")
    k = 42
    smooth = [sum(loss[max(0, i - k):i + 1]) / (i + 1 - max(0, i - k)) for i in range(len(loss))]
    ax.plot(it, smooth, lw=1.5, label=f"moving mean ({k} iterations)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("masked-patch MSE (normalised units)")
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {"iterations": it[-1], "first_epoch_mean_loss": sum(loss[:k]) / k,
            "last_epoch_mean_loss": sum(loss[-k:]) / k}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/real_pretrain")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--docs", action="store_true", help="write figures into the bundle docs")
    args = p.parse_args()
    out = Path(args.out)
    if not REAL.is_dir():
        sys.exit(f"real data not found at {REAL}")
    prepared = prepare(out)
    seconds = None
    if not (out / "models" / "model.pt").exists():
        seconds = pretrain(prepared, out, args.epochs)
    summary = loss_curve(out, (DOC_IMAGES if args.docs else out) / "real_loss_curve.png")
    summary["train_seconds"] = seconds
    if args.docs:
        previews = sorted((out / "previews").glob("*.png"))
        if previews:
            shutil.copy(previews[-1], DOC_IMAGES / "real_preview.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
