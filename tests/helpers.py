"""Helpers shared by the tests (importable: pytest puts tests/ on sys.path)."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Give every trainable parameter random values (the zero inits would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@torch.no_grad()
def rows_batch_invariant(model: torch.nn.Module, shape: tuple[int, ...], sizes: tuple[int, ...],
                         num_classes: int = 0, seed: int = 0) -> bool:
    """Whether model(x, t, y) gives every row the same bits in a batch of max(sizes) as in the
    leading chunks of each of `sizes`: a property of this machine's kernels (BLAS, convolution),
    which a bitwise comparison across batch sizes needs and must check first."""
    g = torch.Generator().manual_seed(seed)
    n = max(sizes)
    x = torch.randn(n, *shape, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, num_classes + 1, (n,), generator=g) if num_classes else None
    full = model(x, t, y)
    return all(torch.equal(model(x[:k], t[:k], None if y is None else y[:k]), full[:k]) for k in sizes)


def skip_unless_rows_batch_invariant(model, shape, sizes, num_classes=0):
    if not rows_batch_invariant(model, shape, sizes, num_classes):
        pytest.skip(f"this machine's kernels round a row differently in batches of {sizes}: bitwise equality "
                    "across batch sizes does not hold here (the tolerance tests cover it)")


class NearlyExact(torch.nn.Module):
    """A sampling model whose samples stay O(1): eps = sqrt(1 - ab_t) x_t + scale * DiT(x_t, t, y), the
    exact noise prediction for data N(0, I) plus a small random DiT's output, and the variance
    channels v = scale * DiT's (near 0: halfway between the two log-variance bounds). A random
    DiT alone predicts eps far from that at high noise, and its samples
    x_0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) are then O(100), where a tolerance means little."""

    def __init__(self, model: torch.nn.Module, scale: float = 0.05):
        super().__init__()
        import ditlab

        self.model, self.scale = model, scale
        self.num_classes, self.null_class = model.num_classes, model.null_class
        self.sqrt_one_minus_ab = (1 - ditlab.Diffusion().alphas_cumprod).sqrt().float()  # (1000,)
        self.eval()

    def forward(self, x, t, y):
        out = self.model(x, t, y)  # (N, 2C or C, H, W)
        c = x.shape[1]
        eps = self.sqrt_one_minus_ab[t].reshape(-1, 1, 1, 1).to(x.dtype) * x + self.scale * out[:, :c]
        return torch.cat([eps, self.scale * out[:, c:]], dim=1)


def wait_for(condition, what: str, deadline_s: float = 120.0):
    """Poll `condition()` until it returns something truthy (a generous deadline: the poll stops as
    soon as the condition holds, so no test depends on how fast the machine is)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def unpin(monkeypatch, *names: str) -> None:
    """Let tiny stand-ins be served under released names: drop what those names imply (DiT-XL/2, 256
    pixels, ...) from `ditlab.hub.RELEASED` for this test (their pins are tested in test_hub.py)."""
    import dataclasses

    from ditlab import hub

    for name in names:
        monkeypatch.setitem(hub.RELEASED, name, dataclasses.replace(hub.RELEASED[name], implies=None))


GOLDEN = Path(__file__).parent / "data"  # the reference codes' outputs (scripts/make_golden*.py)


def read_golden(name: str) -> dict[str, np.ndarray]:
    """Every array of the golden fixture tests/data/NAME, read whole (no pickles)."""
    with np.load(GOLDEN / name, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def golden_tensor(golden: dict[str, np.ndarray], key: str, float32: bool = True) -> torch.Tensor:
    """A fixture array as a tensor: integers as int64, floats as float32 (or as stored: `float32=False`)."""
    a = golden[key]
    return torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iu" else a.astype(np.float32) if float32 else a)
