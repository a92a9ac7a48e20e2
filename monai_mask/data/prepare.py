"""``monai-mask prepare``: folders of studies -> datalist.json, fingerprint.json, plan.json.

Stage one of the pipeline (nnU-Net style: each stage writes an inspectable file). Images are
discovered (NIfTI, NRRD, MHA/MHD, DICOM series), paired with labels, checked, fingerprinted and
planned. All outputs are written atomically at the end: when a case fails and ``skip_bad`` is off,
nothing is written. Converted DICOM series go to ``OUT/images`` under their pseudonymous case id.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from monai.utils import look_up_option
from tqdm.auto import tqdm

from monai_mask.data.boxes import boxes_from_label
from monai_mask.data.datalist import build_datalist, write_json_atomic
from monai_mask.data.fingerprint import (
    case_fingerprint,
    check_intensities,
    dataset_fingerprint,
    guess_modality,
)
from monai_mask.data.plan import make_plan
from monai_mask.errors import InputError

__all__ = ["PrepareResult", "prepare_dataset"]

MODALITIES = ("auto", "ct", "mr")


@dataclass
class PrepareResult:
    """What ``prepare_dataset`` wrote and what it skipped."""

    out_dir: Path
    datalist: Path
    fingerprint: Path
    plan: Path
    cases: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    pseudonym_map: Path | None = None


def _read_source(src):
    from monai_mask.io.readers import read_dicom_series, read_image

    return read_dicom_series(src.series) if src.kind == "dicom" else read_image(src.path)


def _modality(volume, requested: str) -> tuple[str, str]:
    if requested != "auto":
        return requested.upper(), "user"
    if volume.modality in ("CT", "MR"):
        return volume.modality, "dicom"
    return guess_modality(volume.array), "guessed"


def _process_case(src, label_path, staging: Path, modality: str, convert_dicom: bool, seed: int,
                  crowded: set[str]):
    """Read, check and fingerprint one case; returns (datalist entry, fingerprint)."""
    from monai_mask.io.readers import check_label, read_image, save_nifti

    vol = _read_source(src)
    mod, mod_source = _modality(vol, modality)
    check_intensities(vol.array, mod, src.path)
    label = None
    entry = {"case_id": src.case_id, "patient": src.patient_key or src.case_id}
    if label_path is not None:
        label = check_label(vol, read_image(label_path))
        entry["label"] = str(label_path)
        boxes, classes, _ = boxes_from_label(label, vol.affine)
        entry["box"] = np.round(boxes, 3).tolist()
        entry["box_label"] = classes.tolist()
    if src.kind == "dicom":
        if not convert_dicom and str(src.path) in crowded:
            raise InputError(src.path, "folder holds several DICOM series; use --convert-dicom")
        if convert_dicom:
            target = staging / "images" / f"{src.case_id}.nii.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            save_nifti(vol, target)
            entry["image"] = str(target)
            entry["converted_from_dicom"] = True
    entry.setdefault("image", str(src.path))
    entry["modality"] = mod
    fp = case_fingerprint(src.case_id, vol.array, vol.affine, mod, mod_source, label,
                          vol.warnings, seed=seed)
    return entry, fp


def _write_pseudonym_map(sources, path: Path) -> None:
    """Explicit, user-requested map from pseudonym to the DICOM PatientID (kept out of logs)."""
    import pydicom

    rows = []
    for src in sources:
        if src.kind == "dicom" and src.series is not None:
            ds = pydicom.dcmread(src.series.files[0], stop_before_pixels=True)
            rows.append((src.patient_key, src.case_id, str(ds.get("PatientID", ""))))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([("pseudonym", "case_id", "patient_id"), *sorted(set(rows))])
    os.replace(tmp, path)


def _discover(images) -> list:
    """Sources of one or several image folders; case ids must be unique across them."""
    from monai_mask.data.discovery import discover_images

    roots = [images] if isinstance(images, str | Path) else list(images)
    sources, seen = [], {}
    for root in roots:
        for src in discover_images(root):
            if src.case_id in seen:
                raise InputError(src.path,
                                 f"case id {src.case_id} also found in {seen[src.case_id]}")
            seen[src.case_id] = root
            sources.append(src)
    return sources


def read_holdout(path: str | Path) -> set[str]:
    """Case ids from a hold-out file: a JSON list, or one id per line (``#`` comments)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "hold-out file not found")
    text = path.read_text()
    if text.lstrip().startswith("["):
        return {str(c) for c in json.loads(text)}
    return {line.split("#")[0].strip() for line in text.splitlines()} - {""}


def prepare_dataset(
    images: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    labels: str | Path | None = None,
    folds: int = 5,
    skip_bad: bool = False,
    convert_dicom: bool = False,
    modality: Literal["auto", "ct", "mr"] = "auto",
    pseudonym_map: bool = False,
    seed: int = 0,
    progress: bool = True,
    holdout: str | Path | None = None,
) -> PrepareResult:
    """Scan ``images`` (and ``labels``) and write datalist, fingerprint and plan to ``out_dir``.

    Args:
        images: folder(s) of NIfTI/NRRD/MHA/MHD files and/or DICOM series (searched
            recursively); case ids must be unique across folders.
        out_dir: output folder (created).
        labels: optional folder of label maps named like the images.
        folds: patient-grouped folds in the datalist.
        skip_bad: report and skip bad cases instead of stopping at the first one.
        convert_dicom: write each DICOM series as ``OUT/images/<case_id>.nii.gz``.
        modality: force CT or MR; ``auto`` reads DICOM Modality or guesses from intensities.
        pseudonym_map: also write ``pseudonym_map.csv`` (pseudonym -> PatientID); off by default.
        seed: seed of fold assignment and intensity sampling.
        progress: show a progress bar.
        holdout: file of case ids kept out of training: they go to the datalist's ``test``
            list (labels kept), get no fold, and do not enter the fingerprint or plan.
    """
    from monai_mask.data.discovery import pair_labels

    modality = look_up_option(modality, MODALITIES)
    out = Path(out_dir)
    sources = _discover(images)
    held = read_holdout(holdout) if holdout else set()
    unknown = held - {s.case_id for s in sources}
    if unknown:
        raise InputError(holdout, f"{len(unknown)} hold-out case ids not found, e.g. "
                                  f"{sorted(unknown)[0]}")
    label_of = pair_labels(sources, labels) if labels is not None else {}
    staging = out / f".staging-{os.getpid()}"
    folders = Counter(str(s.path) for s in sources if s.kind == "dicom")
    crowded = {f for f, n in folders.items() if n > 1}
    entries, fps, skipped = [], [], []
    try:
        for src in tqdm(sources, desc="prepare", unit="case", disable=not progress):
            try:
                entry, fp = _process_case(src, label_of.get(src.case_id), staging, modality,
                                          convert_dicom, seed, crowded)
            except InputError as err:
                if not skip_bad:
                    raise
                skipped.append(str(err))
                continue
            entries.append(entry)
            fps.append(fp)
        if not entries:
            raise InputError(images, "no usable image (all cases were skipped)")
        result = _write_outputs(out, staging, entries, fps, folds, seed, skipped, held)
        if pseudonym_map:
            result.pseudonym_map = out / "pseudonym_map.csv"
            _write_pseudonym_map(sources, result.pseudonym_map)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_outputs(out, staging, entries, fps, folds, seed, skipped, held) -> PrepareResult:
    out.mkdir(parents=True, exist_ok=True)
    staged = staging / "images"
    if staged.exists():
        (out / "images").mkdir(exist_ok=True)
        for f in staged.iterdir():
            os.replace(f, out / "images" / f.name)
        for e in entries:
            if e.get("converted_from_dicom"):
                e["image"] = str(out / "images" / Path(e["image"]).name)
    train = [e for e in entries if e["case_id"] not in held]
    test = [e for e in entries if e["case_id"] in held]
    if not train:
        raise InputError(out, "every case is in the hold-out list; nothing left to train on")
    fingerprint = dataset_fingerprint([fp for fp in fps if fp.case_id not in held])
    plan = make_plan(fingerprint)
    labels = _label_names(fps)
    datalist = build_datalist(train, out, folds=folds, seed=seed, modality=plan["modality"],
                              labels=labels)
    if test:
        held_list = build_datalist(test, out, folds=1, seed=seed)["training"]
        datalist["test"] = [{k: v for k, v in e.items() if k != "fold"} for e in held_list]
        datalist["numTest"] = len(test)
    datalist["box_mode"], datalist["box_space"], datalist["box_units"] = "cccwhd", "LPS", "mm"
    datalist["skipped"] = skipped
    return PrepareResult(
        out_dir=out,
        fingerprint=write_json_atomic(fingerprint, out / "fingerprint.json"),
        plan=write_json_atomic(plan, out / "plan.json"),
        datalist=write_json_atomic(datalist, out / "datalist.json"),
        cases=datalist["training"],
        skipped=skipped,
    )


def _label_names(fps) -> dict[str, str]:
    values = sorted({v for fp in fps for v in fp.labels_present})
    if not values:
        return {}
    return {str(v): ("background" if v == 0 else f"label_{v}") for v in values}


def summary_table(result: PrepareResult, max_rows: int = 25) -> str:
    """Plain-text summary of a prepare run: one row per case (first ``max_rows``), then totals."""
    import json

    fp = json.loads(result.fingerprint.read_text())
    plan = json.loads(result.plan.read_text())
    header = f"{'case':<22}{'modality':<9}{'shape':<18}{'spacing (mm)':<22}{'label':<6}notes"
    rows = [header, "-" * len(header)]
    labelled = {c["case_id"] for c in result.cases if "label" in c}
    for c in fp["cases"][:max_rows]:
        shape = "x".join(str(s) for s in c["shape"])
        spacing = "x".join(f"{s:.3g}" for s in c["spacing"])
        rows.append(f"{c['case_id'][:21]:<22}{c['modality']:<9}{shape:<18}{spacing:<22}"
                    f"{'yes' if c['case_id'] in labelled else '-':<6}{'; '.join(c['warnings'])}")
    if len(fp["cases"]) > max_rows:
        rows.append(f"... {len(fp['cases']) - max_rows} more cases in {result.fingerprint.name}")
    rows.append("-" * len(header))
    rows.append(f"{fp['n_cases']} cases ({len(labelled)} labelled), {len(result.skipped)} skipped;"
                f" plan: {plan['modality']}, target spacing {plan['target_spacing']},"
                f" patch {plan['patch_size']}")
    rows += [f"skipped: {s}" for s in result.skipped]
    rows.append(f"wrote {result.datalist}, {result.fingerprint.name}, {result.plan.name}")
    return "\n".join(rows)
