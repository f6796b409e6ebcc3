"""InceptionV3 as TensorFlow's 2015-12-05 graph computes it: the network FID, sFID and IS are
defined with, and the one ADM's evaluator runs.

Parameter names are those of torch-fidelity's `FeatureExtractorInceptionV3`, so its converted
weights file (`WEIGHTS_FILENAME`, from `WEIGHTS_URL`) loads with `strict=True`. The computation
follows the TF graph, not torchvision: TF1 bilinear resize to 299x299, (x - 128) / 128, average
pools that ignore padding, a max pool in the last block, and logits without the bias."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.errors import UserError, UserFileNotFoundError

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILENAME
INPUT_SIZE = 299  # the graph resizes every image to 299x299
PIXEL_CENTER = 128.0  # uint8 pixels map to (x - 128) / 128
POOL_DIM = 2048  # pool_3: FID, precision and recall features
NUM_LOGITS = 1008  # the graph's softmax has 1008 classes (1000 used)
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv for sFID
SPATIAL_SIZE = 17  # mixed_6 is 17x17 at 299x299
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
BN_EPS = 1e-3


def default_weights_path() -> str:
    """Where `load_inception` looks without a path: torch hub's checkpoint cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILENAME)


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 `resize_bilinear(align_corners=False)`: x (N, C, H, W) float -> (N, C, size, size).

    TF1 samples output pixel i at input coordinate i * (in / out), computed in float32, with no
    half-pixel offset (unlike torch's `interpolate`), clamping the upper neighbour at the edge.
    Interpolating along width for every row and then along height is TF's own order of operations
    (top and bottom rows first, then between them), so the result is the same to the bit."""

    def taps(n_in: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, dtype=torch.float32, device=device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = pos.long()  # floor: pos >= 0
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, (pos - lo.to(torch.float32)).to(x.dtype)

    lo, hi, frac = taps(x.shape[3], x.device)
    left, right = x.index_select(3, lo), x.index_select(3, hi)  # (N, C, H, size) each
    x = left + (right - left) * frac  # (N, C, H, size)
    lo, hi, frac = taps(x.shape[2], x.device)
    top, bottom = x.index_select(2, lo), x.index_select(2, hi)  # (N, C, size, size) each
    return top + (bottom - top) * frac.view(-1, 1)


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU: one node of the TF graph."""

    def __init__(
        self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """TF's 3x3 stride-1 SAME average pool: border windows average only the pixels inside."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class Mixed35(nn.Module):
    """35x35 block (TF mixed, mixed_1, mixed_2): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_same(x))
        return torch.cat([a, b, c, d], 1)  # (N, 224 + pool_features, 35, 35)


class Reduce35(nn.Module):
    """35x35 -> 17x17 (TF mixed_3): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)  # (N, 480 + cin, 17, 17)


class Mixed17(nn.Module):
    """17x17 block (TF mixed_4 .. mixed_7): 1x1 | factorised 7x7 | double factorised 7x7 | avgpool-1x1."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = conv(c)
        d = self.branch_pool(_avg_pool_same(x))
        return torch.cat([a, b, c, d], 1)  # (N, 768, 17, 17); channels 0..191 are branch1x1


class Reduce17(nn.Module):
    """17x17 -> 8x8 (TF mixed_8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)  # (N, 512 + cin, 8, 8)


class Mixed8(nn.Module):
    """8x8 block (TF mixed_9, mixed_10): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

    The TF graph's last block (mixed_10) pools with a 3x3 max pool where the paper has an
    average pool; `max_pool=True` reproduces it."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
        return torch.cat([a, b, c, self.branch_pool(pooled)], 1)  # (N, 2048, 8, 8)


class InceptionV3(nn.Module):
    """The FID Inception network: uint8 images (N, 3, H, W) -> pool_3 (N, 2048) and the sFID
    spatial features (N, 2023); `logits` maps pool_3 to the unbiased logits (N, 1008)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = Mixed35(192, pool_features=32)  # TF mixed
        self.Mixed_5c = Mixed35(256, pool_features=64)  # TF mixed_1
        self.Mixed_5d = Mixed35(288, pool_features=64)  # TF mixed_2
        self.Mixed_6a = Reduce35(288)  # TF mixed_3
        self.Mixed_6b = Mixed17(768, c7=128)  # TF mixed_4
        self.Mixed_6c = Mixed17(768, c7=160)  # TF mixed_5
        self.Mixed_6d = Mixed17(768, c7=160)  # TF mixed_6
        self.Mixed_6e = Mixed17(768, c7=192)  # TF mixed_7
        self.Mixed_7a = Reduce17(768)  # TF mixed_8
        self.Mixed_7b = Mixed8(1280, max_pool=False)  # TF mixed_9
        self.Mixed_7c = Mixed8(2048, max_pool=True)  # TF mixed_10
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)  # TF softmax/logits

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, H, W) uint8 -> pool_3 (N, 2048), spatial (N, 17 * 17 * 7), float32."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise UserError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = resize_bilinear_tf1(images.to(self.fc.weight.dtype), INPUT_SIZE)  # (N, 3, 299, 299)
        x = (x - PIXEL_CENTER) / PIXEL_CENTER
        if images.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))  # (N, 768, 17, 17)
        # ADM's sFID tensor is `mixed_6/conv:0`. In the TF graph `mixed_6` is Mixed_6d (mixed..mixed_2
        # = Mixed_5b..5d, mixed_3 = Mixed_6a, mixed_4..7 = Mixed_6b..6e) and `conv` is its 1x1 branch,
        # whose conv2d_params and batchnorm are the weights of Mixed_6d.branch1x1; the op named
        # `mixed_6/conv` itself is the ReLU closing that scope, so the tensor is taken after BN and ReLU.
        # The block concatenates branch1x1 first, so its channels 0..6 are that tensor's first 7.
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # (N, 17, 17, 7): TF's NHWC order
        spatial = spatial.reshape(x.shape[0], -1)  # (N, 2023), flattened (h, w, c) as ADM does
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048): pool_3, the 8x8 average pool
        return pool.float(), spatial.float()

    def logits(self, pool: torch.Tensor) -> torch.Tensor:
        """Unbiased logits as ADM's IS takes them: pool_3 (N, 2048) @ W.T -> (N, 1008), no bias."""
        return pool.to(self.fc.weight.dtype) @ self.fc.weight.T


def check_weights_file(path: Path) -> None:
    """It loads, strictly, as the state dict of `InceptionV3`. (`ditlab.hub` checks a download of
    the weights with it.)"""
    load_inception(str(path))


def load_inception(path: str | None = None, device: str | torch.device = "cpu") -> InceptionV3:
    """The network with the weights file at `path` (default: `default_weights_path()`), in eval
    mode on `device`. A missing file raises a one-line FileNotFoundError saying where to get it."""
    path = path or default_weights_path()
    if not os.path.isfile(path):
        raise UserFileNotFoundError(
            f"Inception weights not found at {path}: download {WEIGHTS_URL} and put it there or pass --inception PATH"
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise UserError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from e
    model = InceptionV3()
    if not isinstance(state_dict, dict):
        raise UserError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
    # The converted TF weights carry no BN step counters; they are unused in eval mode.
    own = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    given = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    if own != given:
        diff = sorted(own ^ given)
        raise UserError(f"{path}: not the InceptionV3 of {WEIGHTS_FILENAME}: {len(diff)} keys differ, e.g. {diff[0]}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: {str(e).splitlines()[-1].strip()}") from e
    device = torch.device(device)
    model = model.to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights laid out as torch-fidelity's converted TF file (no BN step counters), scaled
    so that the activations neither vanish nor explode through the 94 layers: for exercising the
    evaluation path where the real weights cannot be had (tests, the GPU check). Its numbers mean
    nothing."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, v in InceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("conv.weight"):
            t = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5  # He init
        elif key.endswith(("bn.weight", "running_var")):
            t = torch.rand(v.shape, generator=g) + 0.5
        elif key.endswith(("bn.bias", "running_mean")):
            t = torch.randn(v.shape, generator=g) * 0.1
        else:  # the logits layer
            t = torch.randn(v.shape, generator=g) / v.shape[-1] ** 0.5
        out[key] = t
    return out
