"""The seams the coming objectives and guidance methods plug into: the process protocol and its
registry, guidance as a value, and the one pipeline from a checkpoint to images."""

import numpy as np
import pytest
import torch
from test_sample import load, save_ditlab

import ditlab
from ditlab.cli import main
from ditlab.diffusion import samplers
from ditlab.diffusion.guidance import Guidance
from ditlab.diffusion.protocol import PROCESSES, Process, process_from_record
from ditlab.errors import UserError
from ditlab.sampling.generate import quantize
from ditlab.sampling.pipeline import SamplingPipeline


def test_a_record_without_objective_is_the_papers_diffusion_and_records_round_trip():
    for record in (None, {}, {"learn_sigma": True}, {"objective": "ddpm"}):
        p = process_from_record(record)
        assert isinstance(p, ditlab.Diffusion) and p.objective == "ddpm" and p.learn_sigma
        assert (p.num_timesteps, p.schedule) == (1000, "linear")
    fixed = process_from_record({"learn_sigma": False, "fixed_variance": "small", "num_timesteps": 100})
    again = process_from_record(fixed.to_record())
    assert fixed.to_record() == again.to_record() == {"objective": "ddpm", "num_timesteps": 100, "schedule": "linear",
                                                      "learn_sigma": False, "fixed_variance": "small"}
    assert torch.equal(fixed.betas, again.betas) and not again.learn_sigma
    assert set(PROCESSES) >= {"ddpm"}
    assert all(hasattr(process_from_record(None), name) for name in Process.__annotations__) and all(
        callable(getattr(process_from_record(None), name)) for name in
        ("sample_timesteps", "training_losses", "generate", "to_record"))
    assert process_from_record(None).sampler_names[0] == "ddpm" and process_from_record(None).default_steps == 250
    with pytest.raises(UserError, match="objective 'nope'"):
        process_from_record({"objective": "nope"})


def test_guidance_is_one_value_and_sample_is_generate(make_dit):
    assert samplers.Guidance is Guidance  # its old home still names it
    model, diffusion = make_dit(), ditlab.Diffusion()
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3])
    kw = dict(steps=3, generator=torch.Generator().manual_seed(1))
    by_keywords = diffusion.sample(model, noise, y, cfg_scale=2.0, guidance_channels=3, **kw)
    kw["generator"] = torch.Generator().manual_seed(1)
    by_value = diffusion.generate(model, noise, y, sampler="ddpm", guidance=Guidance(scale=2.0, channels=3), **kw)
    assert torch.equal(by_keywords, by_value)  # the null label comes from the model when the value has none
    kw["generator"] = torch.Generator().manual_seed(1)
    plain = diffusion.generate(model, noise, y, sampler="ddpm", guidance=Guidance(), **kw)
    assert not torch.equal(plain, by_value)
    with pytest.raises(UserError, match="guidance_channels must be between 1 and 4"):
        diffusion.generate(model, noise, y, steps=3, sampler="ddpm", guidance=Guidance(scale=2.0, channels=5))


def test_the_pipeline_draws_what_ditlab_sample_draws(tmp_path, make_dit):
    """Its `images` for (labels, seed, indices, guidance) are the images of `ditlab sample` with the
    same settings; what it read is in its record fields, the checkpoint read once."""
    ckpt = save_ditlab(tmp_path / "run.pt", make_dit(in_channels=3))
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", ckpt, "--classes", "3", "1", "4", "--seed", "5", "--steps", "3", "--cfg-scale",
                 "2.0", "--vae", "pixel", "--precision", "fp32", "--device", "cpu", "--no-progress",
                 "--out", str(out)]) == 0
    pipe = SamplingPipeline.from_checkpoint(ckpt, vae="pixel", precision="fp32", device="cpu")
    assert pipe.class_names == [str(i) for i in range(10)] and pipe.pixel and pipe.image_size == 8
    assert isinstance(pipe.process, ditlab.Diffusion) and pipe.latent_shape == (3, 8, 8)
    fields = pipe.record_fields
    assert (fields["checkpoint_format"], fields["weights"], fields["vae"], fields["autocast"]) == \
        ("ditlab", "ema", "pixel", "fp32")
    with torch.inference_mode():
        images = pipe.images(torch.tensor([3, 1, 4]), 5, range(3), guidance=Guidance(scale=2.0), sampler="ddpm",
                             steps=3)
    assert np.array_equal(quantize(images).numpy(), load(out)["arr_0"])
    steps = []
    with torch.inference_mode():
        pipe.images(torch.tensor([3]), 5, [0], guidance=Guidance(scale=2.0), steps=3, on_step=lambda: steps.append(1))
    assert len(steps) == 3  # one guided forward per step, the default sampler


def test_names_are_checked_before_the_codec_loads(tmp_path, make_dit):
    ckpt = save_ditlab(tmp_path / "run.pt", make_dit(in_channels=3))
    seen = []

    def refuse(names, source):
        seen.append((len(names), source))
        raise UserError("no such class")

    with pytest.raises(UserError, match="no such class"):  # a VAE that does not exist was never asked for
        SamplingPipeline.from_checkpoint(ckpt, vae=str(tmp_path / "no-such-vae"), precision="fp32", device="cpu",
                                         check_names=refuse)
    assert seen == [(10, ckpt)]
