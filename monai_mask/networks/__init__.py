"""Networks: ViT and CNN masked autoencoders and the heads built from their encoders."""

from __future__ import annotations

from monai_mask.networks.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
