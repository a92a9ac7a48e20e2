"""monai_mask.io."""
