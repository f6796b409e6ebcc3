import os

# Some virtual machines (this project's CI among them) advertise Intel AMX but fault on its
# instructions; oneDNN would then crash bf16 matmuls on CPU with SIGILL. Cap oneDNN below AMX
# for the test process (it reads the variable once, when torch first uses it).
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")


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
