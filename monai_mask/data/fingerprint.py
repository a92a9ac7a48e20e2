"""Dataset fingerprint: per-case geometry and dataset-wide foreground intensity statistics.

In the spirit of nnU-Net's dataset fingerprint (Isensee et al., Nature Methods 2021):
intensity statistics are computed on foreground voxels (the label when one exists, otherwise a
body/foreground mask), from a fixed-size random sample per case, so that CT normalisation can clip
to the foreground 0.5/99.5 percentiles and z-score with the foreground mean and std.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import nibabel as nib
import numpy as np

__all__ = [
    "CaseFingerprint",
    "case_fingerprint",
    "foreground_mask",
    "guess_modality",
    "dataset_fingerprint",
    "check_intensities",
]

Modality = Literal["CT", "MR"]
SAMPLES_PER_CASE = 10_000


@dataclass
class CaseFingerprint:
    """Geometry and intensity summary of one case (no patient identifiers)."""

    case_id: str
    shape: list[int]
    spacing: list[float]
    orientation: str
    modality: str
    modality_source: str
    intensity_min: float
    intensity_max: float
    labels_present: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    samples: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        """JSON-serialisable dict (without the intensity samples)."""
        d = asdict(self)
        d.pop("samples")
        return d


def guess_modality(array: np.ndarray) -> Modality:
    """Guess CT vs MR from intensities: CT volumes hold air near -1000 HU.

    A volume whose 1st percentile is below -500 is taken as CT (Hounsfield units); anything else
    as MR (arbitrary, mostly non-negative units). Callers record that the modality was guessed.
    """
    flat = np.asarray(array, dtype=np.float32).ravel()
    step = max(1, flat.size // 200_000)
    return "CT" if float(np.percentile(flat[::step], 1)) < -500 else "MR"


#: a CT in Hounsfield units holds air (-1000) or at least fat (-100); above this minimum it is
#: not one (an MR image, or stored values without their rescale).
CT_MIN_HU = -200.0


def check_intensities(array: np.ndarray, modality: str, where) -> None:
    """Refuse a volume whose intensities cannot be an image of ``modality``.

    Rules: a constant volume carries no image; a CT must have some voxel below ``CT_MIN_HU``
    (air or fat in HU); an MR must not look like CT (1st percentile below -500, the rule of
    :func:`guess_modality`). ``where`` names the file in the error.

    Raises:
        InputError: constant volume, or intensities that contradict ``modality``.
    """
    from monai_mask.errors import InputError

    low, high = float(np.min(array)), float(np.max(array))
    if low == high:
        raise InputError(where, f"constant image (every voxel is {low:g}); nothing to segment")
    if modality.upper() == "CT" and low > CT_MIN_HU:
        raise InputError(where, f"intensities {low:g}..{high:g} are not CT Hounsfield units "
                                f"(no voxel below {CT_MIN_HU:g}); an MR image given to a CT "
                                "plan? use --modality mr or an MR plan")
    if modality.upper() == "MR" and guess_modality(array) == "CT":
        raise InputError(where, f"intensities {low:g}..{high:g} look like CT Hounsfield units, "
                                "not MR; use --modality ct or a CT plan")


def foreground_mask(
    array: np.ndarray, modality: str, label: np.ndarray | None = None
) -> np.ndarray:
    """Voxels used for intensity statistics.

    The label (> 0) when given and non-empty; otherwise CT body (HU > -500) or MR non-background
    (above 5% of the 99th percentile, which drops the zero/air background of MR scans). Falls back
    to all voxels when the mask would be empty (for example a constant crop).
    """
    if label is not None and np.any(label > 0):
        return label > 0
    if modality.upper() == "CT":
        mask = array > -500
    else:
        hi = float(np.percentile(array, 99))
        mask = array > 0.05 * hi if hi > 0 else np.ones(array.shape, bool)
    return mask if mask.any() else np.ones(array.shape, bool)


def case_fingerprint(
    case_id: str,
    array: np.ndarray,
    affine: np.ndarray,
    modality: str,
    modality_source: str,
    label: np.ndarray | None = None,
    warnings: list[str] | None = None,
    seed: int = 0,
) -> CaseFingerprint:
    """Fingerprint of one 3D case; keeps a random sample of foreground intensities."""
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    fg = array[foreground_mask(array, modality, label)].astype(np.float64)
    rng = np.random.default_rng(seed)
    take = min(SAMPLES_PER_CASE, fg.size)
    samples = rng.choice(fg, size=take, replace=False) if take < fg.size else fg
    return CaseFingerprint(
        case_id=case_id,
        shape=[int(s) for s in array.shape],
        spacing=[round(float(s), 6) for s in spacing],
        orientation="".join(nib.aff2axcodes(affine)),
        modality=modality,
        modality_source=modality_source,
        intensity_min=float(array.min()),
        intensity_max=float(array.max()),
        labels_present=[] if label is None else [int(v) for v in np.unique(label)],
        warnings=list(warnings or []),
        samples=samples,
    )


def _intensity_stats(samples: np.ndarray) -> dict:
    if samples.size == 0:
        return {}
    p = np.percentile(samples, [0.5, 50, 99.5])
    return {
        "mean": float(samples.mean()),
        "std": float(samples.std()),
        "percentile_00_5": float(p[0]),
        "median": float(p[1]),
        "percentile_99_5": float(p[2]),
        "min": float(samples.min()),
        "max": float(samples.max()),
        "n_samples": int(samples.size),
    }


def dataset_fingerprint(cases: list[CaseFingerprint]) -> dict:
    """Dataset fingerprint: per-case entries plus foreground intensity statistics per modality."""
    by_modality: dict[str, list[np.ndarray]] = {}
    for c in cases:
        if c.samples is not None:
            by_modality.setdefault(c.modality, []).append(c.samples)
    spacings = np.array([c.spacing for c in cases], dtype=np.float64).reshape(-1, 3)
    shapes = np.array([c.shape for c in cases], dtype=np.float64).reshape(-1, 3)
    return {
        "n_cases": len(cases),
        "modalities": sorted(by_modality),
        "median_spacing": np.median(spacings, axis=0).tolist() if len(cases) else [],
        "median_shape": np.median(shapes, axis=0).tolist() if len(cases) else [],
        "foreground_intensity": {
            m: _intensity_stats(np.concatenate(s)) for m, s in sorted(by_modality.items())
        },
        "cases": [c.to_json() for c in cases],
    }
