"""monai_mask.masking."""
