"""monai_mask.engines."""
