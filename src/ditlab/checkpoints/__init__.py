"""DiT checkpoints: the training-state schema (`state`) and every format's read and write (`formats`)."""
