"""Training data: the bundled digits, image folders, and latent caches."""
