"""The codecs: the SD VAE through diffusers' AutoencoderKL (a tiny random one stands in) and pixels."""

from pathlib import Path

import pytest
import torch

from ditlab.data.codecs import LATENT_SCALE, PixelCodec, VAECodec, load_codec

diffusers = pytest.importorskip("diffusers")



def test_latent_scale_is_the_sd_constant():
    assert LATENT_SCALE == 0.18215


def test_vae_codec_matches_diffusers(vae_dir):
    codec = load_codec(str(vae_dir))
    assert isinstance(codec, VAECodec)
    assert (codec.latent_channels, codec.downsample, codec.image_channels) == (4, 2, 3)
    peer = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, std = codec.encode(x)
    assert mean.shape == std.shape == (3, 4, 8, 8) and mean.dtype == std.dtype == torch.float32
    with torch.no_grad():
        posterior = peer.encode(x).latent_dist
        torch.testing.assert_close(mean, posterior.mean * 0.18215, rtol=0, atol=1e-6)
        torch.testing.assert_close(std, posterior.std * 0.18215, rtol=1e-6, atol=1e-7)
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(codec.decode(z), peer.decode(z / 0.18215).sample, rtol=0, atol=1e-6)
    assert not mean.requires_grad


def test_vae_codec_half_precision_outputs_float32(vae_dir):
    codec = load_codec(str(vae_dir), dtype=torch.bfloat16)
    assert codec.dtype == torch.bfloat16
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, std = codec.encode(x)
    ref_mean, ref_std = load_codec(str(vae_dir)).encode(x)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, ref_mean, rtol=0.05, atol=0.02)
    torch.testing.assert_close(std, ref_std, rtol=0.05, atol=0.02)


def test_pipeline_folder_with_vae_subfolder(vae_dir, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    diffusers.AutoencoderKL.from_pretrained(vae_dir).save_pretrained(tmp_path / "vae")
    assert load_codec(str(tmp_path)).latent_channels == 4


def test_pixel_codec_is_the_identity():
    codec = load_codec("pixel")
    assert isinstance(codec, PixelCodec) and codec.to("cpu") is codec
    assert (codec.latent_channels, codec.downsample, codec.image_channels) == (3, 1, 3)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    mean, std = codec.encode(x)
    assert torch.equal(mean, x) and torch.equal(std, torch.zeros_like(x))
    assert torch.equal(codec.decode(mean), x)


@pytest.mark.parametrize("case", ["missing-folder", "no-config", "broken-weights", "offline-hub-id"])
def test_loading_failure_is_one_line_pointing_at_vae_flag(case, tmp_path, vae_dir):
    spec, kwargs, error = str(tmp_path / "nowhere"), {}, FileNotFoundError
    if case == "no-config":
        spec, error = str(tmp_path), ValueError
    elif case == "broken-weights":
        (tmp_path / "config.json").write_text((Path(vae_dir) / "config.json").read_text())
        (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
        spec, error = str(tmp_path), ValueError
    elif case == "offline-hub-id":  # what a machine without network sees, without waiting for retries
        spec, kwargs, error = "no-such-owner-ditlab/no-such-vae", {"local_files_only": True}, ValueError
    with pytest.raises(error) as e:
        load_codec(spec, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and f"--vae {spec}" in msg
    assert "--local-dir DIR" in msg and msg.endswith("pass --vae DIR")  # says how to point --vae at a local copy
