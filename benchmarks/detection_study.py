"""Pretrained vs scratch tumour detector on the synthetic phantoms (sensitivity at 1 FP/scan, CPM).

Pretrain the CNN MAE once on the training images (``bundles/mae_pretrain``, no labels; or
reuse ``--mae``), then for each seed fine-tune ``bundles/tumor_detection`` from scratch and
from the MAE encoder on the training cases, and evaluate both on the datalist's ``test`` list
(``prepare --holdout``; ``evaluate.json``: COCO + FROC in world mm). Writes
``<out>/detection_study.json`` and a markdown table ``<out>/detection_study.md``.

``--inits`` picks the detector arms: ``scratch``, ``pretrained`` (the MAE encoder) and
``seg`` (the two-step recipe: the encoder of the segmentation baseline's network of the same
seed, trained on the same cases, which the run trains first when missing). ``--fpn-stages 1``
adds the stride-2 pyramid level (``detector_archs#cnn#fpn_stages``); ``--seg-loss-weight``
> 0 trains every detector arm as a Retina U-Net (a segmentation head on the finest level).

``--seg-baseline`` adds, per seed, the segmentation baseline evaluated the same way: the
``bundles/tumor_segmentation`` CNN (scratch, ``--seg-iterations`` at ``--seg-learning-rate``) on
the same training cases, its tumour probabilities on the test cases turned into boxes by
connected components (:func:`monai_mask.engines.seg_to_boxes.segmentation_detections`, score =
max probability, thresholds 0.5 and 0.1).

    monai-mask sample-data runs/phantoms --n 36 --seed 100 --modality ct
    seq -f "case_%03g" 24 35 > runs/test_ids.txt
    monai-mask prepare --images runs/phantoms/imagesTr --labels runs/phantoms/labelsTr \
        --out runs/phantoms/prepared --holdout runs/test_ids.txt
    python benchmarks/detection_study.py --prepared runs/phantoms/prepared --out runs/study \
        --seeds 0 1 2 --epochs 30 --mae-epochs 30
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from monai_mask.bundle_runner import bundle_command, find_bundle, run_bundle


def _run(name: str, configs: list[str], overrides: dict) -> None:
    if run_bundle(bundle_command(find_bundle(name), configs, overrides)):
        raise SystemExit(f"{name} {configs} failed")


def _pretrain(args, out: Path) -> str:
    if args.mae:
        return str(Path(args.mae).resolve())
    mae = out / "mae"
    _run("mae_pretrain", ["train.json"], {"dataset_dir": args.prepared, "output_dir": str(mae),
                                          "ckpt_dir": str(mae / "models"), "backbone": "cnn",
                                          "max_epochs": args.mae_epochs})  # fmt: skip
    return str(mae / "models" / "model.pt")


def _detector(args, run: Path, seed: int, ckpt: str) -> dict:
    common = {"dataset_dir": args.prepared, "output_dir": str(run),
              "ckpt_dir": str(run / "models"), "seed": seed,
              "detector_archs#cnn#fpn_stages": args.fpn_stages,
              "seg_loss_weight": args.seg_loss_weight}  # fmt: skip
    if not (run / "models" / "model.pt").is_file():  # a finished run is reused
        _run("tumor_detection", ["train.json"],
             {**common, "max_epochs": args.epochs, "val_interval": args.epochs,
              "pretrained_ckpt": ckpt, "train#data": "$@all_data"})  # fmt: skip
    test = {"_target_": "monai_mask.data.datalist.load_datalist", "path": "@datalist",
            "key": "test"}
    _run("tumor_detection", ["train.json", "evaluate.json"], {**common, "eval_data": test})
    overall = json.loads((run / "eval" / "metrics.json").read_text())["overall"]
    return {"sens@1": overall["sens@1"], "cpm": overall["cpm"]}


def _seg_common(args, run: Path, seed: int) -> dict:
    """Overrides shared by the segmentation baseline's training and its inference config."""
    return {"dataset_dir": args.prepared, "output_dir": str(run),
            "ckpt_dir": str(run / "models"), "seed": seed, "backbone": "cnn"}  # fmt: skip


def _seg_model(args, run: Path, seed: int) -> Path:
    """Train (once) the segmentation baseline's network of this seed; its ``model.pt``."""
    from monai_mask.data.datalist import load_datalist

    model = run / "models" / "model.pt"
    if not model.is_file():  # a finished run is reused
        steps = math.ceil(len(load_datalist(Path(args.prepared) / "datalist.json")) / 2)
        _run("tumor_segmentation", ["train.json"],
             {**_seg_common(args, run, seed),
              "max_epochs": max(1, math.ceil(args.seg_iterations / steps)),
              "learning_rate": args.seg_learning_rate, "val_interval": 10**6,
              "ckpt_interval": 10**6, "train#data": "$@all_data"})  # fmt: skip
    return model


def _seg_baseline(args, run: Path, seed: int) -> dict:
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from monai_mask.data.datalist import load_datalist
    from monai_mask.data.presets import load_plan, load_transforms
    from monai_mask.engines.detection_metrics import evaluate_detections
    from monai_mask.engines.seg_to_boxes import (
        detections_from_probabilities,
        segmentation_probabilities,
    )
    from monai_mask.io.checkpoint import extract_state_dict, load_checkpoint

    datalist = Path(args.prepared) / "datalist.json"
    model = _seg_model(args, run, seed)
    bundle = find_bundle("tumor_segmentation")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle), **_seg_common(args, run, seed),
                   "pretrained_ckpt": ""})
    net = parser.get_parsed_content("network")
    net.load_state_dict(extract_state_dict(load_checkpoint(model), path=model))
    inferer = parser.get_parsed_content("validate#inferer")
    load = Compose(load_transforms(load_plan(Path(args.prepared) / "plan.json"), ("image",)))
    samples = [{**d, "image": load({"image": d["image"]})["image"]}
               for d in load_datalist(datalist, key="test")]  # fmt: skip
    probs = segmentation_probabilities(net, inferer, samples)  # the network runs once
    out = {}
    for thresh in (0.5, 0.1):
        cases = detections_from_probabilities(probs, threshold=thresh)
        metrics = evaluate_detections(cases)
        (run / f"metrics_t{thresh}.json").write_text(json.dumps(metrics, indent=2) + "\n")
        out[f"t{thresh}"] = {"sens@1": metrics["overall"]["sens@1"],
                             "cpm": metrics["overall"]["cpm"]}
    return out


def _table(results: dict) -> str:
    lines = ["| init | seeds | sensitivity @ 1 FP/scan | CPM |", "|---|---|---|---|"]
    for init, runs in results.items():
        cells = []
        for key in ("sens@1", "cpm"):
            vals = [r[key] or 0.0 for r in runs.values()]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        lines.append(f"| {init} | {len(runs)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", default="sample_data/ct/prepared")
    p.add_argument("--out", default="runs/detection_study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--mae-epochs", type=int, default=50)
    p.add_argument("--mae", help="existing CNN MAE checkpoint (skips pretraining)")
    p.add_argument("--inits", nargs="+", default=["scratch", "pretrained"],
                   choices=["scratch", "pretrained", "seg"], help="detector initialisations")
    p.add_argument("--fpn-stages", type=int, default=2,
                   help="first encoder stage in the pyramid (1: add the stride-2 level)")
    p.add_argument("--seg-loss-weight", type=float, default=0.0,
                   help="> 0: Retina U-Net, the detector also learns the label maps")
    p.add_argument("--seg-baseline", action="store_true",
                   help="add the segmentation -> connected-components baseline per seed")
    p.add_argument("--seg-only", action="store_true", help="run only the segmentation baseline")
    p.add_argument("--seg-iterations", type=int, default=1000)
    p.add_argument("--seg-learning-rate", type=float, default=0.01)
    args = p.parse_args()
    args.prepared = str(Path(args.prepared).resolve())
    out = Path(args.out).resolve()
    results: dict[str, dict] = {}
    if not args.seg_only:
        ckpt = _pretrain(args, out) if "pretrained" in args.inits else ""
        for seed in args.seeds:
            for init in args.inits:
                if init == "seg":  # the segmentation baseline's network of this seed
                    path = str(_seg_model(args, out / f"segbaseline_s{seed}", seed))
                else:
                    path = ckpt if init == "pretrained" else ""
                res = _detector(args, out / f"{init}_s{seed}", seed, path)
                results.setdefault(init, {})[str(seed)] = res
    if args.seg_baseline or args.seg_only:
        for seed in args.seeds:
            for thresh, res in _seg_baseline(args, out / f"segbaseline_s{seed}", seed).items():
                results.setdefault(f"seg baseline ({thresh})", {})[str(seed)] = res
    (out / "detection_study.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "detection_study.md").write_text(_table(results))
    print(_table(results))


if __name__ == "__main__":
    main()
