"""Inference I/O of the segmentation bundle: read NIfTI/NRRD/MHA/DICOM, write NIfTI/Slicer/PACS.

* :class:`VolumeReader` is a MONAI ``ImageReader`` over :func:`monai_mask.io.readers.read_image`,
  so ``LoadImaged`` reads any of them (a DICOM series as a folder) into a ``MetaTensor`` with
  the exact RAS affine of ``monai_mask.io`` (series-aware slice order, rescale applied).
* :class:`SegmentationWriterd` writes, after ``Invertd`` has brought the prediction back to the
  input grid, a label NIfTI, a Slicer ``.seg.nrrd`` and (DICOM input) a DICOM-SEG, all with the
  affine the reader returned, through ``monai_mask.io.writers``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.data import ImageReader
from monai.transforms import LoadImaged, MapTransform
from monai.utils import ensure_tuple, look_up_option

from monai_mask.errors import InputError
from monai_mask.io.writers import SegmentInfo

__all__ = ["VolumeReader", "find_inputs", "check_inputs", "inference_transforms",
           "SegmentationWriterd", "tumour_segments", "parse_formats", "output_case",
           "label_nifti_path", "FORMATS", "DEFAULT_MAX_VOXELS"]

logger = logging.getLogger(__name__)
FORMATS = ("nifti", "seg.nrrd", "dicom-seg")
_IMAGE_KINDS = ("nifti", "nrrd", "mha")
#: default bound on the voxels of one inference input (512 x 512 x 2048); see docs/reliability.md.
DEFAULT_MAX_VOXELS = 512 * 512 * 2048


class VolumeReader(ImageReader):
    """MONAI reader of NIfTI, NRRD, MHA/MHD files and DICOM series folders (``read_image``).

    Meta data: ``affine`` = ``original_affine`` = the RAS affine of ``Volume``,
    ``spatial_shape``, ``space`` = RAS, ``original_channel_dim`` = "no channel".
    """

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        from monai_mask.io.readers import image_kind

        return all(Path(f).is_dir() or image_kind(f) is not None for f in ensure_tuple(filename))

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs):
        from monai_mask.io.readers import read_image

        files = ensure_tuple(data)
        if len(files) != 1:
            raise InputError(str(files[0]), "VolumeReader reads one image (or series) at a time")
        return read_image(files[0])

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        affine = np.asarray(img.affine, dtype=np.float64)
        meta = {
            "affine": affine.copy(), "original_affine": affine.copy(),
            "spatial_shape": np.asarray(img.shape), "space": "RAS",
            "original_channel_dim": float("nan"),
        }  # fmt: skip
        return np.asarray(img.array, dtype=np.float32), meta


def find_inputs(path: str | os.PathLike) -> list[dict]:
    """Data list ``[{"image": ...}]`` of an image file, a DICOM series folder, or a folder.

    A folder yields its NIfTI/NRRD/MHA files (not ``.seg.nrrd`` outputs) and the folder of
    every DICOM series under it, sorted.

    Raises:
        InputError: missing path, or nothing readable found.
    """
    from monai_mask.io.dicom import is_dicom_file, iter_files, scan_dicom
    from monai_mask.io.readers import image_kind

    path = Path(path)
    if path.is_file():
        return [{"image": str(path)}]
    if not path.is_dir():
        raise InputError(path, "no such file or folder")
    files = sorted(str(p) for p in path.iterdir() if p.is_file()
                   and image_kind(p) in _IMAGE_KINDS and not p.name.endswith(".seg.nrrd"))
    has_dicom = any(image_kind(f) in (None, "dicom") and is_dicom_file(f) for f in iter_files(path))
    series = sorted({str(s.folder) for s in scan_dicom(path)}) if has_dicom else []
    if not files and not series:
        raise InputError(path, "no NIfTI, NRRD, MHA image or DICOM series found")
    return [{"image": f} for f in files + series]


def check_inputs(items: Sequence[Mapping], plan: Mapping,
                 max_voxels: int = DEFAULT_MAX_VOXELS,
                 skip_bad: bool = False) -> tuple[list[dict], list[str]]:
    """Check every inference input before the model runs; returns (good items, skip notes).

    Each input must fit ``max_voxels`` (from its header, before any pixel is read), read
    cleanly (``read_image``: corrupt, 2D/4D, NaN/inf, broken geometry, irregular DICOM) and
    have intensities fitting the plan's modality (``check_intensities``; a DICOM Modality
    tag wins over the plan's). Reading every input twice (here and in the bundle) is the
    price of one clean error instead of a failure halfway through a folder.

    Args:
        items: ``[{"image": path}]`` from :func:`find_inputs`.
        plan: the plan the model was trained on (``modality``).
        max_voxels: largest number of voxels of one input.
        skip_bad: collect bad inputs as one-line notes instead of raising on the first.

    Raises:
        InputError: the first bad input (``skip_bad`` off), or every input is bad.
    """
    from monai_mask.data.fingerprint import check_intensities
    from monai_mask.io.readers import read_image, read_shape

    good, skipped = [], []
    for item in items:
        path = Path(item["image"])
        try:
            shape = read_shape(path)
            if int(np.prod(shape)) > max_voxels:
                raise InputError(path, f"{int(np.prod(shape))} voxels (shape "
                                       f"{'x'.join(map(str, shape))}) exceed max_voxels="
                                       f"{max_voxels}; raise --max-voxels if memory allows")
            volume = read_image(path)
            check_intensities(volume.array, volume.modality or plan["modality"], path)
        except InputError as err:
            if not skip_bad:
                raise
            skipped.append(str(err))
            continue
        good.append(dict(item))
    if not good:
        first = Path(items[0]["image"])
        raise InputError(first if len(items) == 1 else first.parent,
                         f"no usable input ({len(skipped)} skipped)")
    return good, skipped


def inference_transforms(plan: Mapping, image_key: str = "image") -> list:
    """The plan's load chain (``presets.load_transforms``) reading with :class:`VolumeReader`."""
    from monai_mask.data.presets import load_transforms

    chain = load_transforms(plan, (image_key,))
    if not isinstance(chain[0], LoadImaged):
        raise TypeError("presets.load_transforms no longer starts with LoadImaged")
    return [LoadImaged(image_key, reader=VolumeReader(), image_only=True), *chain[1:]]


def parse_formats(formats: str | Sequence[str]) -> list[str]:
    """Output formats from ``"nifti,seg.nrrd"`` or a list, each checked against ``FORMATS``."""
    from monai_mask.errors import ConfigError

    items = formats.split(",") if isinstance(formats, str) else list(formats)
    try:
        return [look_up_option(f.strip(), FORMATS) for f in items if f.strip()]
    except ValueError:
        raise ConfigError(f"--formats {formats!r}: choose from {', '.join(FORMATS)}") from None


def output_case(source: str | os.PathLike) -> str:
    """Output name stem of an input: file name without image extension, or the folder name."""
    from monai_mask.io.readers import case_name

    source = Path(source)
    return source.name if source.is_dir() else case_name(source)


def label_nifti_path(source: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Where :class:`SegmentationWriterd` writes the label NIfTI of ``source``."""
    return Path(output_dir) / f"{output_case(source)}_seg.nii.gz"


def tumour_segments(label_names: Mapping[int | str, str] | None = None,
                    colors: Mapping[int | str, Sequence[float]] | None = None) -> list[SegmentInfo]:
    """SegmentInfo per foreground class (default ``{1: "tumour"}``, red)."""
    names = {int(k): v for k, v in (label_names or {1: "tumour"}).items() if int(k) != 0}
    colors = {int(k): tuple(v) for k, v in (colors or {}).items()}
    return [SegmentInfo(k, names[k], colors.get(k, (0.86, 0.24, 0.24))) for k in sorted(names)]


class SegmentationWriterd(MapTransform):
    """Write an inverted label prediction as NIfTI, ``.seg.nrrd`` and (DICOM input) DICOM-SEG.

    Expects ``data[key]`` = (1, X, Y, Z) class indices on the input grid (after ``AsDiscreted``
    with ``argmax`` and ``Invertd``) and ``data[image_key].meta`` from :class:`VolumeReader`.
    Geometry written is the reader's ``original_affine``; a shape that differs from the
    input's raises. Files: ``{case}_seg.nii.gz``, ``{case}.seg.nrrd``, ``{case}_seg.dcm``.

    Args:
        keys: prediction key(s).
        output_dir: destination folder.
        segments: SegmentInfo per class (names, colours, codes).
        formats: any of ``"nifti"``, ``"seg.nrrd"``, ``"dicom-seg"``; DICOM-SEG is written
            for DICOM inputs only.
        image_key: key whose meta data holds the input path and geometry.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike,
                 segments: Sequence[SegmentInfo], formats: Sequence[str] = FORMATS,
                 image_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.segments, self.image_key = Path(output_dir), list(segments), image_key
        self.formats = parse_formats(formats)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        meta = d[self.image_key].meta
        source = Path(str(meta["filename_or_obj"]))
        affine = np.asarray(meta["original_affine"], dtype=np.float64)
        shape = tuple(int(s) for s in np.asarray(meta["spatial_shape"]).ravel())
        for key in self.key_iterator(d):
            label = np.asarray(d[key].detach().cpu() if hasattr(d[key], "detach") else d[key])
            label = np.rint(label[0]).astype(np.uint8)
            if label.shape != shape:
                raise InputError(source, f"prediction shape {label.shape} != input {shape}")
            self.write(label, affine, source)
        return d

    def write(self, label: np.ndarray, affine: np.ndarray, source: Path) -> list[Path]:
        """Write ``label`` (X, Y, Z) of input ``source`` in every configured format."""
        from monai_mask.io.writers import write_dicom_seg, write_label_nifti, write_seg_nrrd

        case = output_case(source)
        out = []
        if "nifti" in self.formats:
            out.append(write_label_nifti(label, affine, label_nifti_path(source, self.output_dir)))
        if "seg.nrrd" in self.formats:
            out.append(write_seg_nrrd(label, affine, self.output_dir / f"{case}.seg.nrrd",
                                      self.segments))
        files = _dicom_files(source)
        if "dicom-seg" in self.formats and files:
            out.append(write_dicom_seg(label, files, self.output_dir / f"{case}_seg.dcm",
                                       self.segments))
        logger.info("wrote %s", ", ".join(p.name for p in out))
        return out


def _dicom_files(source: Path) -> list[Path]:
    """Ordered slice files of a DICOM input (``unique_files``), ``[]`` for other formats."""
    from monai_mask.io.dicom import group_dicom_files, is_dicom_file, scan_dicom
    from monai_mask.io.readers import image_kind

    if source.is_dir():
        series = scan_dicom(source)
    elif image_kind(source) == "dicom" or (image_kind(source) is None and is_dicom_file(source)):
        series = group_dicom_files([source])
    else:
        return []
    return series[0].unique_files() if series else []
