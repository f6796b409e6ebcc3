"""Seeds derived from (stream, run seed, index...) so that every random stream of a run is a
function of its coordinates alone: per-image sampling noise and labels, per-step training
draws, per-epoch data order. NumPy's SeedSequence hashes the key, so streams of different
seeds, images or steps never coincide (a plain `seed * stride + index` would once the index
outgrows the stride)."""

from __future__ import annotations

import numpy as np

from ditlab.errors import UserError

# Stream keys: one per kind of randomness, so that no two kinds share a generator state.
IMAGE_NOISE = 0x1A6E
IMAGE_LABELS = 0x1AB3
BALANCED_LABELS = 0x1ABA  # the shuffled order of --labels balanced
TRAIN_STEP = 0x75E9
DATA_ORDER = 0xDA7A


def derive_seed(stream: int, seed: int, *index: int) -> int:
    """A 64-bit seed for `torch.Generator.manual_seed` / `torch.manual_seed` from the key."""
    if seed < 0 or any(i < 0 for i in index):
        raise UserError(f"seeds and indices must be non-negative, got seed {seed}, index {index}")
    return int(np.random.SeedSequence([stream, seed, *index]).generate_state(1, dtype=np.uint64)[0])
