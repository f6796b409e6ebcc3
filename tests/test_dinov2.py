"""ditlab's DINOv2 against golden features from the official code (facebookresearch/dinov2), stored
in tests/data/golden_dinov2_reference.npz by scripts/make_golden_dinov2.py (which does not import
ditlab): two tiny ViTs at patch 14, the original kind (GELU MLP, interpolation with the 0.1 offset)
and the register kind (SwiGLU as ViT-g, 4 registers, antialiased interpolation), at input sizes that
interpolate the position embedding and at its own size; and the official state-dict layout of all
eight hub models, which must load strictly and give back their config."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import read_golden

from ditlab.errors import UserError
from ditlab.evaluation.dinov2 import (
    ARCHS,
    DinoVisionTransformer,
    arch_name,
    config_from_state_dict,
    hub_config,
    load_dinov2,
)

TOL = 1e-5  # of the features' scale: float32 on the same float16-exact weights and inputs
OUTPUTS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens")


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return read_golden("golden_dinov2_reference.npz")


def state_dict(golden, name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}/"
    return {k[len(prefix):]: torch.from_numpy(v).float() for k, v in golden.items()
            if k.startswith(prefix) and k.count("/") == 1}  # not the "<name>/<H>x<W>/<output>" features


@pytest.mark.parametrize("name", ["plain", "reg"])
def test_features_match_the_official_code(golden, name):
    config = json.loads(str(golden["config"]))
    sd = state_dict(golden, name)
    cfg = config_from_state_dict(sd, num_heads=config["tiny"]["num_heads"])  # width 64 in 2 heads of 32
    expected = config["models"][name]
    assert cfg.num_register_tokens == expected["num_register_tokens"]
    assert (cfg.ffn == "swiglu") == (expected["ffn_layer"] == "swiglufused")
    assert (cfg.interpolate_antialias, cfg.interpolate_offset) == (expected["interpolate_antialias"],
                                                                   expected["interpolate_offset"])
    model = DinoVisionTransformer(cfg).eval()
    model.load_state_dict(sd, strict=True)
    for h, w in config["sizes"]:
        x = torch.from_numpy(golden[f"input/{h}x{w}"]).float()
        with torch.no_grad():
            out = model.forward_features(x)
        for key in OUTPUTS:
            want = torch.from_numpy(golden[f"{name}/{h}x{w}/{key}"]).double()
            got = out[key].double()
            assert got.shape == want.shape, f"{name} {h}x{w} {key}: {tuple(got.shape)} != {tuple(want.shape)}"
            if want.numel():
                err = (got - want).abs().max().item()
                scale = want.abs().max().item()
                assert err <= TOL * scale, f"{name} {h}x{w} {key}: max difference {err:.3g}, scale {scale:.3g}"
        assert torch.equal(model(x), out["x_norm_clstoken"])
        assert torch.equal(model.patch_tokens(x), out["x_norm_patchtokens"])


def test_offset_interpolation_differs_from_exact_size(golden):
    """The 0.1 offset matters: without it the plain model's features at 42x42 are measurably off,
    so the golden comparison above would catch a missing offset."""
    config = json.loads(str(golden["config"]))
    sd = state_dict(golden, "plain")
    cfg = config_from_state_dict(sd, num_heads=config["tiny"]["num_heads"])
    model = DinoVisionTransformer(dataclasses.replace(cfg, interpolate_offset=0.0)).eval()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        got = model(torch.from_numpy(golden["input/42x42"]).float())
    want = torch.from_numpy(golden["plain/42x42/x_norm_clstoken"])
    assert (got - want).abs().max() > 100 * TOL * want.abs().max()


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("registers", [False, True])
def test_official_layouts_load_strictly(golden, arch, registers):
    """Each hub model's state-dict layout (from the official code) gives back its hub config and
    loads with strict=True; built on the meta device, so ViT-g costs no memory."""
    name = f"dinov2_{arch}" + ("_reg4" if registers else "")
    layout = json.loads(str(golden["hub_layouts"]))[name]
    sd = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    cfg = config_from_state_dict(sd)
    assert cfg == hub_config(arch, registers)
    assert arch_name(cfg) == name
    assert arch_name(dataclasses.replace(cfg, ffn_hidden=cfg.hidden + 8)).startswith("DINOv2 ViT width")
    with torch.device("meta"):
        model = DinoVisionTransformer(cfg)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == layout
    model.load_state_dict(sd, strict=True, assign=True)


def test_load_dinov2_reads_any_size_and_refuses_foreign_files(golden, tmp_path):
    config = json.loads(str(golden["config"]))
    sd = state_dict(golden, "reg")
    path = tmp_path / "tiny.pth"
    torch.save(sd, path)
    model = load_dinov2(str(path))  # dimensions from the file; heads width / 64 = 1
    assert model.cfg.embed_dim == config["tiny"]["embed_dim"] and model.cfg.depth == config["tiny"]["depth"]
    assert model.cfg.num_register_tokens == 4 and not any(p.requires_grad for p in model.parameters())
    x = torch.from_numpy(golden["input/70x70"]).float()
    assert model(x).shape == (x.shape[0], config["tiny"]["embed_dim"])

    del sd["blocks.1.ls2.gamma"]
    torch.save(sd, path)
    with pytest.raises(UserError, match="tiny.pth"):
        load_dinov2(str(path))
    torch.save({"x_embedder.proj.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="not a DINOv2 state dict"):
        load_dinov2(str(path))
    with pytest.raises(UserError, match="not found"):
        load_dinov2(str(tmp_path / "absent.pth"))
