"""Label-efficiency study: scratch vs MAE pretraining (random / block / lesion-aware masking).

Protocol (one dataset per call):

1. ``prepare`` with a fixed hold-out test split (real MRI: benchmarks/splits/hippocampus_test.txt,
   208 train / 52 test; synthetic: generated CT phantoms, the last quarter held out).
2. Pretrain one tiny MAE (ViT, or CNN with ``--backbone cnn``) per masking scheme on the
   training images only (no labels):
   ``random``, ``block`` and ``lesion_aware`` with the intensity prior (pretraining uses no
   labels).
3. Fine-tune ``bundles/tumor_segmentation`` from scratch and from each checkpoint with 10 %,
   25 % and 100 % of the training labels (seeded subsets), a fixed iteration budget per run, and
   several seeds; evaluate the final model on the test split (mean foreground Dice).

Everything runs in-process through MONAI's ``ConfigWorkflow`` on the two bundles' own configs.

    python benchmarks/label_efficiency.py --dataset hippocampus --out runs/le_mri
    python benchmarks/label_efficiency.py --dataset synthetic --out runs/le_ct
    python benchmarks/label_efficiency.py --dataset synthetic --out runs/le_ct_cnn \
        --backbone cnn --learning-rate 0.01 --iterations 1000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
METHODS = {"scratch": None, "random": ("random", "none"), "block": ("block", "none"),
           "lesion_aware": ("lesion_aware", "intensity")}


def prepare(dataset: str, out: Path) -> Path:
    from monai_mask.data.prepare import prepare_dataset
    from monai_mask.data.synthetic import write_dataset

    prepared = out / "prepared"
    if (prepared / "datalist.json").exists():
        return prepared
    if dataset == "hippocampus":
        msd = REAL / "mri_hippocampus_msd"
        prepare_dataset(msd / "imagesTr", prepared, labels=msd / "labelsTr", folds=5,
                        holdout=REPO / "benchmarks" / "splits" / "hippocampus_test.txt",
                        progress=False)
    else:
        write_dataset(out / "raw", n=40, seed=100, modality="ct", shape=(64, 64, 48))
        held = out / "holdout.txt"
        held.write_text("\n".join(f"case_{i:03d}" for i in range(30, 40)) + "\n")
        prepare_dataset(out / "raw" / "imagesTr", prepared, labels=out / "raw" / "labelsTr",
                        folds=5, holdout=held, progress=False)
    return prepared


def run_workflow(bundle: str, config: str | list[str], **overrides):
    from monai.bundle import ConfigWorkflow

    root = REPO / "bundles" / bundle
    files = [str(root / "configs" / c) for c in ([config] if isinstance(config, str) else config)]
    wf = ConfigWorkflow(config_file=files, meta_file=str(root / "configs" / "metadata.json"),
                        logging_file=str(root / "configs" / "logging.conf"),
                        workflow_type="train", bundle_root=str(root), **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()


def pretrain(prepared: Path, out: Path, mode: str, prior: str, epochs: int,
             backbone: str = "vit") -> Path:
    ckpt = out / "models" / "model.pt"
    if not ckpt.exists():
        run_workflow("mae_pretrain", "train.json", dataset_dir=str(prepared),
                     output_dir=str(out), ckpt_dir=str(out / "models"), mask_mode=mode,
                     backbone=backbone,
                     prior_source=prior, max_epochs=epochs, batch_size=4,
                     learning_rate=0.0005, val_interval=10_000, ckpt_interval=100_000,
                     preview_interval=100_000, **{"train#data": "$@all_data"})
    return ckpt


def finetune_and_test(prepared: Path, out: Path, ckpt: Path | None, fraction: float, seed: int,
                      iterations: int, n_train: int, out_channels: int, backbone: str = "vit",
                      learning_rate: float = 1e-3) -> float:
    summary = out / "eval" / "metrics_summary.json"
    if not summary.exists():
        n_cases = max(1, math.ceil(fraction * n_train))
        epochs = max(1, math.ceil(iterations / math.ceil(n_cases / 2)))
        common = dict(dataset_dir=str(prepared), output_dir=str(out), ckpt_dir=str(out / "models"),
                      out_channels=out_channels, seed=seed, backbone=backbone)
        run_workflow("tumor_segmentation", "train.json", pretrained_ckpt=str(ckpt or ""),
                     label_fraction=fraction, max_epochs=epochs, val_interval=10_000,
                     learning_rate=learning_rate,
                     ckpt_interval=100_000, **common,
                     **{"train#data": "$monai_mask.engines.finetune.select_labelled("
                                      "@all_data, @label_fraction, @label_seed)"})
        run_workflow("tumor_segmentation", ["train.json", "evaluate.json"],
                     ckpt_path=str(out / "models" / "model.pt"), **common,
                     **{"validate#data": "$monai_mask.data.datalist.load_datalist("
                                         "@datalist, 'test')"})
    return _mean_foreground_dice(summary)


def _mean_foreground_dice(summary: Path) -> float:
    """Mean over foreground classes of the per-class mean Dice on the test split."""
    data = json.loads(summary.read_text())
    return float(np.nanmean([stats["dice"]["mean"] for stats in data.values()]))


def markdown_table(results: list[dict]) -> str:
    """Mean Dice +- std over seeds: one row per method, one column per label fraction."""
    fractions = sorted({r["fraction"] for r in results})
    methods = list(dict.fromkeys(r["method"] for r in results))
    lines = ["| method | " + " | ".join(f"{f:.0%} labels" for f in fractions) + " |",
             "|---|" + "---:|" * len(fractions)]
    for m in methods:
        cells = []
        for f in fractions:
            d = [r["dice"] for r in results if r["method"] == m and r["fraction"] == f]
            cells.append(f"{np.mean(d):.4f} +- {np.std(d):.4f} (n={len(d)})" if d else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("hippocampus", "synthetic"))
    p.add_argument("--out")
    p.add_argument("--report", help="print the markdown table of a results.json and exit")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument("--iterations", type=int, default=300, help="fine-tuning budget per run")
    p.add_argument("--json", help="results file (default OUT/results.json)")
    p.add_argument("--backbone", choices=("vit", "cnn"), default="vit",
                   help="tiny ViT MAE -> ViTUNETR (default) or tiny CNN MAE -> DynUNet")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="fine-tuning lr")
    args = p.parse_args()
    if args.report:
        print(markdown_table(json.loads(Path(args.report).read_text())["results"]))
        return
    if not (args.dataset and args.out):
        p.error("--dataset and --out are required")
    out = Path(args.out)
    prepared = prepare(args.dataset, out)
    from monai_mask.data.datalist import load_datalist

    n_train = len(load_datalist(prepared / "datalist.json"))
    out_channels = 3 if args.dataset == "hippocampus" else 2
    results, start = [], time.time()
    ckpts = {m: pretrain(prepared, out / f"pretrain_{m}", *METHODS[m], args.pretrain_epochs,
                         args.backbone) if METHODS[m] else None for m in args.methods}
    # smallest label fraction first: partial results answer the 10 % question first
    for fraction in args.fractions:
        for seed in args.seeds:
            for method in args.methods:
                ckpt = ckpts[method]
                run = out / f"ft_{method}_f{fraction}_s{seed}"
                dice = finetune_and_test(prepared, run, ckpt, fraction, seed, args.iterations,
                                         n_train, out_channels, args.backbone,
                                         args.learning_rate)
                results.append({"method": method, "fraction": fraction, "seed": seed,
                                "dice": dice})
                print(f"{method:13s} labels {fraction:>5.0%} seed {seed}: Dice {dice:.4f} "
                      f"({time.time() - start:.0f} s)", flush=True)
                Path(args.json or out / "results.json").write_text(
                    json.dumps({"dataset": args.dataset, "args": vars(args),
                                "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
