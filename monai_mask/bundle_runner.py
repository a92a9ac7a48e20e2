"""Run the project's MONAI bundles as ``python -m monai.bundle run`` (or torchrun) subprocesses.

The ``monai-mask pretrain`` command is a thin wrapper over this module: it checks the prepared
folder, builds the ``monai.bundle run`` command line with the user's overrides and runs it, so
what the wrapper does is exactly what a user gets by typing the bundle command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from monai_mask.errors import ConfigError, InputError

__all__ = ["find_bundle", "bundle_command", "run_bundle", "check_prepared"]


def find_bundle(name: str, bundle_dir: str | os.PathLike | None = None) -> Path:
    """The bundle folder: ``bundle_dir`` if given, else ``<repository>/bundles/<name>``."""
    repo_bundles = Path(__file__).resolve().parents[1] / "bundles"
    path = Path(bundle_dir) if bundle_dir else repo_bundles / name
    if not (path / "configs" / "metadata.json").is_file():
        raise ConfigError(f"{path}: not a MONAI bundle (no configs/metadata.json); pass --bundle")
    return path


def check_prepared(prepared: str | os.PathLike, check_files: bool = False) -> Path:
    """A folder written by ``monai-mask prepare`` (datalist.json and plan.json present).

    Args:
        prepared: the folder.
        check_files: also check that every image and label the datalist names exists (a
            training run would otherwise fail deep inside data loading).

    Raises:
        InputError: a missing or invalid file, naming it.
    """
    path = Path(prepared)
    for name in ("datalist.json", "plan.json"):
        if not (path / name).is_file():
            raise InputError(path, f"no {name}: run `monai-mask prepare --out {path}` first")
        try:
            json.loads((path / name).read_text())
        except json.JSONDecodeError as err:
            raise InputError(path / name, f"not valid JSON ({err.msg})") from None
    if check_files:
        _check_datalist_files(path / "datalist.json")
    return path


def _check_datalist_files(datalist: Path) -> None:
    """Every ``image``/``label`` of the datalist's training and test lists is on disk."""
    entries = json.loads(datalist.read_text())
    for key in ("training", "test"):
        for entry in entries.get(key, []) if isinstance(entries, dict) else []:
            for field in ("image", "label"):
                value = entry.get(field) if isinstance(entry, dict) else None
                if isinstance(value, str) and not (datalist.parent / value).exists():
                    raise InputError(datalist.parent / value,
                                     f"listed in {datalist} ({key}) but not found")


def _override_args(overrides: Mapping[str, object]) -> list[str]:
    args = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        args += [f"--{key}", str(text)]
    return args


def bundle_command(bundle: Path, configs: Sequence[str], overrides: Mapping[str, object],
                   nproc: int = 1, tracking: str | None = None) -> list[str]:
    """The command line that runs ``configs`` of ``bundle`` with ``overrides``.

    ``nproc > 1`` runs through ``torch.distributed.run`` (torchrun) on this node; multi-node runs
    are started with torchrun directly (see the bundle README).
    """
    files = [str(bundle / "configs" / c) for c in configs]
    config_arg = files[0] if len(files) == 1 else json.dumps(files)
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "monai.bundle", "run", "--config_file", config_arg,
            "--meta_file", str(bundle / "configs" / "metadata.json"),
            "--logging_file", str(bundle / "configs" / "logging.conf"),
            "--bundle_root", str(bundle)]
    if tracking:
        cmd += ["--tracking", tracking]
    return cmd + _override_args(overrides)


def run_bundle(cmd: Sequence[str]) -> int:
    """Run a bundle command, streaming its output; returns its exit status."""
    print("running: " + " ".join(cmd), flush=True)
    return subprocess.call(list(cmd))
