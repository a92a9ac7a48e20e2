"""Model registry: small named factories whose names spell their settings (timm style).

Example:
    >>> from monai_mask.networks import create_model, list_models
    >>> list_models("vit_mae*")
    >>> model = create_model("vit_mae_tiny_p8_i32", in_channels=4)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch.nn as nn

__all__ = ["register_model", "create_model", "list_models"]

_MODEL_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its function name; the name must spell the settings."""
    name = fn.__name__
    if name in _MODEL_FACTORIES:
        raise ValueError(f"model {name!r} is registered twice")
    _MODEL_FACTORIES[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching the shell-style ``pattern``."""
    _import_all()
    return sorted(n for n in _MODEL_FACTORIES if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides) -> nn.Module:
    """Build the registered model ``name``; ``overrides`` replace factory defaults."""
    _import_all()
    if name not in _MODEL_FACTORIES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _MODEL_FACTORIES[name](**overrides)


def _import_all() -> None:
    # importing the modules runs their @register_model decorators
    from monai_mask.networks import cnn_mae, vit_mae  # noqa: F401
