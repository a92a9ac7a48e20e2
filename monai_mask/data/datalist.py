"""Decathlon-style datalists with patient-grouped folds.

The datalist is what MONAI's ``load_decathlon_datalist`` reads: a JSON object whose ``training``
list holds ``{"image": ..., "label": ...}`` entries with paths relative to the datalist file.
monai-mask adds ``case_id``, ``patient`` (a pseudonym) and ``fold`` to each entry; no patient
identifier ever appears.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from monai_mask.errors import ConfigError

__all__ = ["assign_folds", "build_datalist", "write_json_atomic", "load_datalist"]


def assign_folds(patients: Sequence[str], k: int, seed: int = 0) -> dict[str, int]:
    """Map each distinct patient to a fold in ``[0, k)`` so that no patient is in two folds.

    Patients are shuffled with ``seed`` and dealt round-robin, so fold sizes (in patients) differ
    by at most one. With fewer patients than folds, some folds are empty.
    """
    if k < 1:
        raise ConfigError(f"--folds must be >= 1, got {k}")
    unique = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[j]: int(i % k) for i, j in enumerate(order)}


def _rel(path: str | Path, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), base.resolve())


def build_datalist(
    entries: list[dict],
    out_dir: str | Path,
    folds: int = 5,
    seed: int = 0,
    name: str = "monai-mask dataset",
    modality: str = "CT",
    labels: dict[str, str] | None = None,
) -> dict:
    """Datalist dict from case entries.

    Args:
        entries: dicts with ``case_id``, ``patient``, ``image`` (path) and optionally ``label``
            (path) and extra JSON-ready keys (``box``, ``box_label``...), kept as they are.
        out_dir: folder of the datalist; image/label paths are written relative to it.
        folds: number of patient-grouped folds.
    """
    out = Path(out_dir)
    fold_of = assign_folds([e["patient"] for e in entries], folds, seed)
    items = []
    for e in entries:
        item = dict(e)
        item["image"] = _rel(e["image"], out)
        if e.get("label"):
            item["label"] = _rel(e["label"], out)
        item["fold"] = fold_of[e["patient"]]
        items.append(item)
    labelled = [i for i in items if "label" in i]
    return {
        "name": name,
        "description": "written by monai-mask prepare; paths are relative to this file",
        "modality": {"0": modality},
        "labels": labels or ({"0": "background"} if not labelled else {}),
        "numTraining": len(items),
        "numLabelled": len(labelled),
        "numFolds": folds,
        "training": items,
    }


def write_json_atomic(obj: dict, path: str | Path) -> Path:
    """Write JSON to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_datalist(path: str | Path, key: str = "training") -> list[dict]:
    """Entries of ``key`` with paths made absolute (MONAI's decathlon loader)."""
    from monai.data import load_decathlon_datalist

    path = Path(path)
    return load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key,
                                   base_dir=str(path.parent))
