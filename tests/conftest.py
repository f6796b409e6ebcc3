import os

# Some virtual machines advertise Intel AMX but fault on its instructions (seen on one of this
# project's Intel Xeon machines; another ran AMX fine); oneDNN would then kill the test process
# with SIGILL at the first bf16 matmul on CPU (the bf16 autocast tests). Cap oneDNN below AMX for
# the test process; it reads the variable once, when torch first uses it. Harmless without AMX.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
# Several tests compare two runs of the same computation bitwise (a checkpoint round trip samples
# the same images; a resumed run equals an uninterrupted one). MKL may pick other code paths for
# differently aligned buffers, so that the same GEMM gives other bits run to run; its conditional
# numerical reproducibility mode fixes the path (MKL reads the variable once). Nothing compares
# different batch sizes bitwise without first proving that the kernels allow it (see helpers.py).
os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")
# The compile tests get a kernel cache of their own: torch's inductor keys its on-disk cache without
# the CPU capability in use, so kernels another process compiled under other ISA settings were
# loaded as they were (an ATEN_CPU_CAPABILITY=avx2 run then computed NaN, the next run crashed).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ditlab-test-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


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
def cache(tmp_path, monkeypatch):
    """An empty $DITLAB_HOME, no mirror, not offline (the downloader's tests)."""
    home = tmp_path / "home"
    monkeypatch.setenv("DITLAB_HOME", str(home))
    for var in ("DITLAB_MIRROR", "DITLAB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def batch_invariant_cpu(monkeypatch):
    """The native convolution instead of oneDNN's, which picks its algorithm by batch size: a
    precondition of a bitwise comparison across batch sizes (which must still probe the kernels)."""
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
