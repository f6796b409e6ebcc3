"""Sampling: per-image seeds, generation, grids (`generate`), and `ditlab sample`'s rank loop (`run`)."""
