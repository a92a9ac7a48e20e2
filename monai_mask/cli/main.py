"""``monai-mask`` command line: thin subcommands over the library (lazy imports, no logic)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def _sample_data(args: argparse.Namespace) -> None:
    from monai_mask.data.synthetic import write_dataset

    path = write_dataset(args.out, n=args.n, seed=args.seed, modality=args.modality,
                         shape=tuple(args.shape), progress=True)
    print(f"wrote {args.n} {args.modality.upper()} phantoms and {path}")


def _prepare(args: argparse.Namespace) -> None:
    from monai_mask.data.prepare import prepare_dataset, summary_table

    result = prepare_dataset(args.images, args.out, labels=args.labels, folds=args.folds,
                             skip_bad=args.skip_bad, convert_dicom=args.convert_dicom,
                             modality=args.modality, pseudonym_map=args.pseudonym_map,
                             seed=args.seed, holdout=args.holdout,
                             progress=sys.stderr.isatty())
    print(summary_table(result))


def _overview(args: argparse.Namespace) -> None:
    from monai_mask.visualize import overview_png

    print(f"wrote {overview_png(args.prepared, args.out, case_id=args.case)}")


def _training_run(args: argparse.Namespace, bundle_name: str) -> tuple[Path, dict]:
    """Bundle folder and the overrides every training wrapper sets (data, outputs, resume)."""
    from monai_mask.bundle_runner import check_prepared, find_bundle
    from monai_mask.engines.handlers import latest_checkpoint

    prepared = check_prepared(args.prepared, check_files=True).resolve()
    bundle = find_bundle(bundle_name, args.bundle)
    out = Path(args.out).resolve()
    resume = latest_checkpoint(out / "models") if args.resume == "auto" else (args.resume or "")
    return bundle, {"dataset_dir": str(prepared), "output_dir": str(out),
                    "ckpt_dir": str(out / "models"), "backbone": args.backbone,
                    "max_epochs": args.epochs, "resume_from": resume, "seed": args.seed}


def _inference_run(args: argparse.Namespace, bundle_name: str) -> tuple[Path, dict]:
    """Bundle folder and the overrides every inference wrapper sets (input, model, outputs)."""
    from monai_mask.bundle_runner import check_prepared, find_bundle
    from monai_mask.errors import InputError

    prepared = check_prepared(args.prepared).resolve()
    bundle = find_bundle(bundle_name, args.bundle)
    source, model = Path(args.input), Path(args.model)
    for path in (source, model):
        if not path.exists():
            raise InputError(path, "no such file or folder")
    return bundle, {"dataset_dir": str(prepared), "input_path": str(source.resolve()),
                    "ckpt_path": str(model.resolve()), "output_dir": str(Path(args.out).resolve()),
                    "backbone": args.backbone}


def _launch(bundle: Path, configs: list[str], overrides: dict, args: argparse.Namespace,
            nproc: int = 1, tracking: str | None = None) -> None:
    """Apply ``--set`` overrides and run the bundle; a failed run exits with its status."""
    from monai_mask.bundle_runner import bundle_command, run_bundle

    overrides.update(dict(_key_value(kv) for kv in args.set))
    if nproc > 1:
        configs = [*configs, "multi_gpu_train.json"]
    code = run_bundle(bundle_command(bundle, configs, overrides, nproc, tracking))
    if code:
        raise SystemExit(code)


def _pretrain(args: argparse.Namespace) -> None:
    bundle, overrides = _training_run(args, "mae_pretrain")
    overrides.update({"mask_mode": args.masking, "prior_source": args.prior})
    if args.model:
        overrides["network_name"] = args.model
    if args.roi:
        overrides["roi_size"] = list(args.roi)
    _launch(bundle, ["train.json"], overrides, args, args.nproc, args.tracking)


def _finetune(args: argparse.Namespace) -> None:
    from monai_mask.errors import ConfigError

    detection = args.task == "detection"
    if detection and args.label_fraction != 1.0:
        raise ConfigError("--label-fraction is supported for --task segmentation only")
    if args.backbone is None:
        args.backbone = "cnn" if detection else "vit"
    if args.pretrained and not Path(args.pretrained).is_file():
        from monai_mask.errors import InputError

        raise InputError(args.pretrained, "no such checkpoint")
    bundle, overrides = _training_run(args, "tumor_detection" if detection
                                      else "tumor_segmentation")  # fmt: skip
    overrides["pretrained_ckpt"] = str(Path(args.pretrained).resolve()) if args.pretrained else ""
    if not detection:
        overrides["label_fraction"] = args.label_fraction
    _launch(bundle, ["train.json"], overrides, args, args.nproc, args.tracking)


def _segment(args: argparse.Namespace) -> None:
    from monai_mask.data.presets import load_plan
    from monai_mask.engines.segment_io import (
        check_inputs,
        find_inputs,
        label_nifti_path,
        parse_formats,
    )
    from monai_mask.errors import ConfigError

    bundle, overrides = _inference_run(args, "tumor_segmentation")
    formats = parse_formats(args.formats)
    if args.overlay and "nifti" not in formats:
        raise ConfigError("--overlay needs 'nifti' in --formats")
    overrides["formats"] = formats
    items, skipped = check_inputs(find_inputs(overrides["input_path"]),
                                  load_plan(Path(args.prepared) / "plan.json"),
                                  max_voxels=args.max_voxels, skip_bad=args.skip_bad)
    for note in skipped:
        print(f"monai-mask segment: skipped {note}", file=sys.stderr)
    if skipped:
        overrides["data"] = items
    _launch(bundle, ["inference.json"], overrides, args)
    if args.overlay:
        from monai_mask.visualize import segmentation_overlay_png

        label = label_nifti_path(Path(args.input), Path(overrides["output_dir"]))
        print(f"wrote {segmentation_overlay_png(Path(args.input), label, args.overlay)}")


def _detect(args: argparse.Namespace) -> None:
    bundle, overrides = _inference_run(args, "tumor_detection")
    overrides["min_score"] = args.min_score
    _launch(bundle, ["inference.json"], overrides, args)
    print(f"wrote <case>_boxes.json and <case>.mrk.json (LPS mm) in {overrides['output_dir']}")


def _key_value(text: str) -> tuple[str, object]:
    import json

    from monai_mask.errors import ConfigError

    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_training_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the training wrappers (pretrain, finetune)."""
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this node, torchrun")
    p.add_argument("--tracking", choices=("mlflow",), help="experiment tracking")
    p.add_argument("--resume", help="checkpoint to resume from, or 'auto' (latest in OUT)")


def _add_bundle_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every bundle wrapper: bundle folder and config overrides."""
    p.add_argument("--bundle", help="bundle folder (default: the repository's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any bundle config override, e.g. --set batch_size=4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``monai-mask`` and its subcommands."""
    parser = argparse.ArgumentParser(prog="monai-mask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample-data", help="write synthetic CT/MR tumour phantoms + datalist")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=8, help="number of cases (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modality", choices=("ct", "mr"), default="ct")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 64, 48), metavar=("X", "Y", "Z"))
    p.set_defaults(func=_sample_data)

    p = sub.add_parser("prepare", help="scan DICOM/NIfTI/NRRD/MHA -> datalist, fingerprint, plan")
    p.add_argument("--images", required=True, nargs="+",
                   help="folder(s) of images and/or DICOM series")
    p.add_argument("--labels", help="folder of label maps named like the images")
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--skip-bad", action="store_true", help="skip bad cases, report them")
    p.add_argument("--convert-dicom", action="store_true", help="write series as NIfTI in OUT")
    p.add_argument("--modality", choices=("auto", "ct", "mr"), default="auto")
    p.add_argument("--pseudonym-map", action="store_true",
                   help="also write pseudonym_map.csv (pseudonym -> PatientID)")
    p.add_argument("--holdout", help="file of case ids kept out (datalist 'test' list)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_prepare)

    p = sub.add_parser("pretrain", help="MAE pretraining with bundles/mae_pretrain")
    p.add_argument("--prepared", required=True, help="folder written by prepare")
    p.add_argument("--out", required=True, help="run folder (models/, previews/, logs)")
    p.add_argument("--backbone", choices=("vit", "cnn"), default="vit")
    p.add_argument("--model", help="registered model name (default: the bundle's tiny model)")
    p.add_argument("--roi", type=int, nargs=3, metavar=("X", "Y", "Z"), help="crop size")
    p.add_argument("--masking", choices=("random", "block", "lesion_aware"),
                   default="lesion_aware")
    p.add_argument("--prior", choices=("intensity", "label", "self", "none"), default="intensity")
    _add_training_args(p)
    _add_bundle_args(p)
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("overview", help="PNG of a prepared case with its tumour outline")
    p.add_argument("prepared", help="folder written by prepare")
    p.add_argument("--out", required=True, help="PNG file")
    p.add_argument("--case", help="case id (default: the largest tumour)")
    p.set_defaults(func=_overview)

    p = sub.add_parser("finetune", help="fine-tune tumour segmentation (bundles/"
                       "tumor_segmentation) or detection (bundles/tumor_detection)")
    p.add_argument("--task", choices=("segmentation", "detection"), default="segmentation")
    p.add_argument("--prepared", required=True, help="folder written by prepare (with labels)")
    p.add_argument("--out", required=True, help="run folder (models/, loss.csv, tensorboard/)")
    p.add_argument("--pretrained", help="MAE checkpoint (pretrain's models/model.pt) or, for "
                   "--task detection, a segmentation model of the same backbone "
                   "(finetune --task segmentation's models/model.pt); default: from scratch")
    p.add_argument("--backbone", choices=("vit", "cnn"),
                   help="default: vit for segmentation, cnn for detection")
    p.add_argument("--label-fraction", type=float, default=1.0,
                   help="fraction of the labelled training cases used (default 1)")
    _add_training_args(p)
    _add_bundle_args(p)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("segment", help="segment tumours: NIfTI, .seg.nrrd, DICOM-SEG (+ PNG)")
    p.add_argument("--input", required=True, help="image file, DICOM series folder, or folder")
    p.add_argument("--model", required=True, help="fine-tuned model (finetune's models/model.pt)")
    p.add_argument("--prepared", required=True, help="folder of the plan the model was trained on")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--formats", default="nifti,seg.nrrd,dicom-seg",
                   help="comma-separated: nifti, seg.nrrd, dicom-seg (DICOM inputs only)")
    p.add_argument("--backbone", choices=("vit", "cnn"), default="vit")
    p.add_argument("--overlay", help="also write a PNG overlay of the segmentation here")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad inputs (one line each on stderr), segment the others")
    p.add_argument("--max-voxels", type=int, default=512 * 512 * 2048,
                   help="refuse inputs with more voxels (default 512*512*2048)")
    p.add_argument("--bundle", help="bundle folder (default: the repository's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any bundle config override, e.g. --set sw_overlap=0.25 (repeatable)")
    p.set_defaults(func=_segment)

    p = sub.add_parser("detect", help="detect tumours: boxes JSON + Slicer markups (.mrk.json)")
    p.add_argument("--input", required=True, help="image file or folder of images")
    p.add_argument("--model", required=True,
                   help="trained detector (tumor_detection train's models/model.pt)")
    p.add_argument("--prepared", required=True, help="folder of the plan the model was trained on")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--backbone", choices=("cnn", "vit"), default="cnn")
    p.add_argument("--min-score", type=float, default=0.05, help="drop boxes scoring below")
    p.add_argument("--bundle", help="bundle folder (default: the repository's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any bundle config override, e.g. --set sw_overlap=0.5 (repeatable)")
    p.set_defaults(func=_detect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (errors print one line and return 2)."""
    from monai_mask.errors import MonaiMaskError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MonaiMaskError as err:
        print(f"monai-mask {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"monai-mask {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
