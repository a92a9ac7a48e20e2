"""monai_mask.cli."""
