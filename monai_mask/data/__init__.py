"""monai_mask.data."""
