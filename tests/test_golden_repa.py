"""REPA's projector and alignment loss against golden values from REPA's own code (sihyun-yu/REPA:
models/sit.py's SiT with its projector, loss.py's SILoss), stored in tests/data/golden_repa_reference.npz
by scripts/make_golden_repa.py (which does not import ditlab): a tiny REPA SiT's state dict, projector
included, loads strictly into ditlab.DiT, its forward and the projection of block K's tokens agree to
1e-5 of their scale, and the loss to 1e-6. Also: area resizing of the encoder's grid, the projector
dropped where a checkpoint is read for sampling, and the errors."""

import json

import numpy as np
import pytest
import torch
from helpers import golden_tensor, read_golden
from test_golden_reference import assert_close

import ditlab
from ditlab.checkpoints.formats import DiTCheckpoint, build_model, read_checkpoint, write_ditlab
from ditlab.training.repa import projection_loss, resize_features

NETWORK_TOL = 1e-5  # of the output's scale
LOSS_TOL = 1e-6


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return read_golden("golden_repa_reference.npz")


def dit_config(golden, variant: str) -> dict:
    cfg = json.loads(str(golden["config"]))
    m = cfg["model"]
    return dict(input_size=m["input_size"], patch_size=m["patch_size"], in_channels=m["in_channels"],
                hidden_size=m["hidden_size"], depth=m["depth"], num_heads=m["num_heads"], num_classes=m["num_classes"],
                learn_sigma=False, qk_norm="layernorm" if cfg["variants"][variant]["qk_norm"] else "none",
                repa_dim=m["z_dims"][0], repa_depth=m["encoder_depth"], repa_width=m["projector_dim"])  # fmt: skip


tensor = golden_tensor


def repa_model(golden, variant: str) -> ditlab.DiT:
    model = ditlab.DiT(**dit_config(golden, variant)).eval()
    prefix = f"{variant}/"
    state = {k[len(prefix):]: tensor(golden, k) for k in golden if k.startswith(prefix)
             and k[len(prefix):] not in ("out", "zs", "proj_loss", "proj_loss_each")}  # fmt: skip
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("variant", ["plain", "qknorm"])
def test_repa_sit_loads_strictly_and_forward_and_projection_agree(golden, variant):
    model = repa_model(golden, variant)
    x, t, y = tensor(golden, "x"), tensor(golden, "t"), tensor(golden, "y")
    calls = []
    model.projectors.register_forward_hook(lambda *args: calls.append(1))
    model.projectors[0].register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        out, projection = model(x, t, y, return_projection=True)
        assert len(calls) == 1
        plain = model(x, t, y)  # the normal forward does not run the projector
    assert len(calls) == 1 and torch.equal(plain, out)
    assert_close(out, tensor(golden, f"{variant}/out"), NETWORK_TOL, "velocity")
    assert_close(projection, tensor(golden, f"{variant}/zs"), NETWORK_TOL, "projection")


@pytest.mark.parametrize("variant", ["plain", "qknorm"])
def test_alignment_loss_is_repas(golden, variant):
    zs, z = tensor(golden, f"{variant}/zs"), tensor(golden, "z")
    each = projection_loss(zs, z)  # (N,)
    assert torch.allclose(each, tensor(golden, f"{variant}/proj_loss_each"), atol=LOSS_TOL, rtol=0)
    assert abs(each.mean().item() - golden[f"{variant}/proj_loss"].item()) <= LOSS_TOL


def test_the_loss_is_minus_one_when_aligned_and_plus_one_when_opposed():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 16, 8, generator=g)
    scale = torch.rand(2, 16, 1, generator=g) + 0.5  # cosine ignores each token's length
    assert torch.allclose(projection_loss(features * scale, features), torch.full((2,), -1.0), atol=1e-6)
    assert torch.allclose(projection_loss(-features, features), torch.full((2,), 1.0), atol=1e-6)


def test_encoder_grid_is_area_resized_to_the_token_grid():
    g = torch.Generator().manual_seed(0)
    fine = torch.randn(2, 16, 3, generator=g)  # a 4 x 4 encoder grid, row-major
    coarse = resize_features(fine, 2)  # (2, 4, 3)
    grid = fine.reshape(2, 4, 4, 3)  # (N, rows, cols, Dz)
    for r in range(2):
        for c in range(2):
            block_mean = grid[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean(dim=(1, 2))  # (N, Dz)
            assert torch.allclose(coarse[:, 2 * r + c], block_mean, atol=1e-6)
    assert resize_features(fine, 4) is fine
    finer = resize_features(coarse, 4)  # upsampling: each cell repeats its source cell
    assert torch.equal(finer.reshape(2, 4, 4, 3)[:, 1, 3], coarse[:, 1])
    tokens_16 = torch.randn(2, 4, 3, generator=g)  # a DiT with a 2 x 2 grid against 4 x 4 encoder features
    assert torch.allclose(projection_loss(tokens_16, fine), projection_loss(tokens_16, coarse), atol=1e-6)


def test_projector_is_saved_with_the_model_and_dropped_for_sampling(golden, tmp_path):
    model = repa_model(golden, "plain")
    assert any(k.startswith("projectors.0.") for k in model.state_dict())
    path = tmp_path / "repa.pt"
    write_ditlab(DiTCheckpoint(model.state_dict(), model.config, "ditlab", str(path)), path)
    ckpt = read_checkpoint(path)
    assert ckpt.config["repa_dim"] == 0 and not any(k.startswith("projectors.") for k in ckpt.state_dict)
    sampler = build_model(ckpt)
    assert sampler.projectors is None
    x, t, y = tensor(golden, "x"), tensor(golden, "t"), tensor(golden, "y")
    with torch.no_grad():
        assert torch.equal(sampler(x, t, y), model(x, t, y))


def test_repa_mistakes_are_one_line_errors(golden):
    cfg = dit_config(golden, "plain")
    with pytest.raises(ValueError, match="--repa-depth 4"):
        ditlab.DiT(**{**cfg, "repa_depth": 4})
    with pytest.raises(ValueError, match="no REPA projector"):
        ditlab.DiT(**{**cfg, "repa_dim": 0})(tensor(golden, "x"), tensor(golden, "t"), tensor(golden, "y"),
                                             return_projection=True)
    with pytest.raises(ValueError, match="predicts 24 features per token, the encoder gives 8"):
        projection_loss(torch.randn(1, 16, 24), torch.randn(1, 16, 8))
    with pytest.raises(ValueError, match="15 tokens do not form a square grid"):
        projection_loss(torch.randn(1, 16, 8), torch.randn(1, 15, 8))
