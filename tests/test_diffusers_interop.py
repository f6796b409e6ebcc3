"""Our DiT against diffusers' DiTTransformer2DModel, through the weight conversion."""

import pytest
import torch
from helpers import randomize

import ditlab
from ditlab.models.convert import (
    config_from_diffusers,
    diffusers_config,
    from_diffusers,
    make_diffusers_exact,
    to_diffusers,
)

diffusers = pytest.importorskip("diffusers")

CFG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10)


def random_dit(seed=0, **overrides):
    return randomize(ditlab.DiT(**{**CFG, **overrides}).eval(), seed)


def to_peer(model):
    peer = diffusers.DiTTransformer2DModel(**diffusers_config(model.config)).eval()
    peer.load_state_dict(to_diffusers(model.state_dict()), strict=True)
    return peer


def test_matches_diffusers_exactly_after_conversion():
    model = random_dit()
    peer = make_diffusers_exact(to_peer(model))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 3, 500, 999])
    y = torch.tensor([0, 9, 10, 4])  # 10 is the null label
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = peer(x, timestep=t, class_labels=y).sample
    assert ours.shape == theirs.shape == (4, 8, 8, 8)
    assert (ours - theirs).abs().max().item() < 1e-5 * ours.abs().max().item()


def test_diffusers_default_frequencies_differ():
    """Out of the box diffusers' timestep frequencies are not the reference ones."""
    model = random_dit()
    peer = to_peer(model)
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([10, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y), peer(x, timestep=t, class_labels=y).sample, atol=1e-4)


def test_conversion_round_trip_is_exact():
    model = random_dit(learn_sigma=False)
    peer_sd = to_diffusers(model.state_dict())
    back = from_diffusers(peer_sd, input_size=8, patch_size=2)
    assert set(back) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k
    assert {**config_from_diffusers(diffusers_config(model.config))} == {
        k: v for k, v in model.config.items() if k not in ("mlp_ratio", "class_dropout_prob")}


def test_diffusers_blocks_with_different_embedders_are_refused():
    peer_sd = to_diffusers(random_dit().state_dict())
    peer_sd["transformer_blocks.1.norm1.linear.weight"] += 0  # untouched
    peer_sd["transformer_blocks.2.norm1.emb.timestep_embedder.linear_1.bias"] += 1
    with pytest.raises(ValueError, match="block 2's copy"):
        from_diffusers(peer_sd, input_size=8, patch_size=2)
