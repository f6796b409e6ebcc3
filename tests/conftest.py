import os

# Some virtual machines (this project's CI among them) advertise Intel AMX but fault on its
# instructions; oneDNN would then crash bf16 matmuls on CPU with SIGILL. Cap oneDNN below AMX
# for the test process (it reads the variable once, when torch first uses it).
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
# MKL picks its GEMM kernels by matrix size, so a row's result can change with the batch it is
# computed in; its strict conditional-reproducibility mode gives every row the same arithmetic,
# so that tests can compare images sampled in different batch sizes exactly (MKL reads it once).
os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")


import pytest  # noqa: E402

# A tiny AutoencoderKL (downsamples by 2) saved in diffusers' format stands in for the SD VAE.
TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                latent_channels=4, sample_size=32)  # fmt: skip


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    import torch

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae")
    diffusers.AutoencoderKL(**TINY_VAE).save_pretrained(path)
    return str(path)


@pytest.fixture
def batch_invariant_cpu(monkeypatch):
    """Row-for-row the same arithmetic in any batch on CPU: MKL's strict mode (set above) for the
    GEMMs, and the native convolution instead of oneDNN's, which picks its algorithm by batch size."""
    import torch

    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


# A one-block DiT of DiT-S width (so the authors' format, which stores no head count, reads back),
# on 8x8 inputs with 4 channels, for sampling and checkpoint tests.
TINY_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=1, num_heads=6, num_classes=10)


@pytest.fixture
def make_dit():
    """make_dit(seed, **overrides): a TINY_DIT in eval mode with random (not zero-initialised) weights."""

    from helpers import randomize

    import ditlab

    def make(seed: int = 0, **overrides):
        return randomize(ditlab.DiT(**{**TINY_DIT, **overrides}).eval(), seed, std=0.05)

    return make
