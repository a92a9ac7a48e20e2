"""monai-mask: lesion-aware masked autoencoders for tumour analysis in CT and MRI, on MONAI."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
