import math

import numpy as np
import pytest
import torch
from helpers import randomize
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ditlab
from ditlab.models.layers import timestep_features
from ditlab.models.weights import infer_config, load_weights

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)


def inputs(n=3, c=4, size=8, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g) if num_classes else None
    return x, t, y


@pytest.mark.parametrize("block", list(ditlab.BLOCKS))
@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("num_classes", [10, 0])
def test_shapes_and_dtypes(block, learn_sigma, num_classes):
    model = ditlab.DiT(**{**TINY, "num_classes": num_classes}, learn_sigma=learn_sigma, block=block)
    x, t, y = inputs(num_classes=num_classes)
    out = model(x, t, y)
    assert out.shape == (3, 8 if learn_sigma else 4, 8, 8)
    assert out.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x, t, y).dtype == torch.bfloat16


def numpy_sincos_2d(dim, grid):
    """MAE / DiT position table written independently with NumPy (float64)."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)


@pytest.mark.parametrize("dim,grid", [(32, 4), (384, 16), (1152, 2)])
def test_sincos_positions_against_numpy(dim, grid):
    model = ditlab.DiT(input_size=grid * 2, patch_size=2, hidden_size=dim, depth=1, num_heads=4)
    expected = torch.from_numpy(numpy_sincos_2d(dim, grid)).float()
    assert torch.equal(model.pos_embed[0], expected)
    assert not model.pos_embed.requires_grad


def test_timestep_features_formula():
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_features(t, 256)
    k = torch.arange(128, dtype=torch.float64)
    args = t[:, None].double() * torch.exp(-math.log(10000) * k / 128)
    assert torch.allclose(emb.double(), torch.cat([torch.cos(args), torch.sin(args)], 1), atol=1e-4)


def test_adaln_zero_blocks_are_identity_and_output_zero_at_init():
    model = ditlab.DiT(**TINY)
    x, t, y = inputs()
    tokens = torch.randn(3, 16, 32)
    c = torch.randn(3, 32)
    for block in model.blocks:
        assert torch.equal(block(tokens, c, c[:, None]), tokens)
    assert torch.equal(model(x, t, y), torch.zeros(3, 8, 8, 8))


@pytest.mark.parametrize("block", list(ditlab.BLOCKS))
def test_forward_backward_reaches_every_parameter(block):
    model = randomize(ditlab.DiT(**TINY, block=block))
    x, t, y = inputs()
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_in_context_and_cross_attention_depend_on_conditioning():
    for block in ("in-context", "cross-attn", "adaln"):
        model = randomize(ditlab.DiT(**TINY, block=block)).eval()
        x, t, y = inputs()
        base = model(x, t, y)
        assert not torch.allclose(base, model(x, t + 1, y))
        assert not torch.allclose(base, model(x, t, (y + 1) % 10))


def test_label_dropout_and_null_label():
    model = ditlab.DiT(**TINY)
    assert model.null_class == 10 and model.y_embedder.embedding_table.num_embeddings == 11
    emb = model.y_embedder
    labels = torch.zeros(20_000, dtype=torch.long)
    torch.manual_seed(0)
    dropped = (emb(labels, train=True) == emb.embedding_table.weight[10]).all(1).float().mean()
    assert abs(dropped.item() - 0.1) < 0.01
    assert torch.equal(emb(labels, train=False), emb.embedding_table.weight[labels])
    assert ditlab.DiT(**TINY, class_dropout_prob=0.0).null_class is None
    assert ditlab.DiT(**{**TINY, "num_classes": 0}).null_class is None


def test_eval_mode_is_deterministic_train_mode_drops_labels():
    model = randomize(ditlab.DiT(**TINY))
    x, t, y = inputs(n=64)
    model.eval()
    assert torch.equal(model(x, t, y), model(x, t, y))
    model.train()
    torch.manual_seed(0)
    a = model(x, t, y)
    torch.manual_seed(1)
    assert not torch.equal(a, model(x, t, y))


def authors_keys(depth):
    """The key names of the authors' checkpoints (DESIGN.md section 1), written out."""
    keys = {"x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed", "y_embedder.embedding_table.weight",
            "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
    for i in (0, 2):
        keys |= {f"t_embedder.mlp.{i}.weight", f"t_embedder.mlp.{i}.bias"}
    for b in range(depth):
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{b}.{m}.weight", f"blocks.{b}.{m}.bias"}
    return keys


def test_parameter_names_are_the_authors():
    with torch.device("meta"):
        model = ditlab.create_model("DiT-XL/2", input_size=32)
    assert set(model.state_dict()) == authors_keys(28)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


def test_state_dict_round_trip_and_strict_load(tmp_path):
    model = randomize(ditlab.DiT(**TINY)).eval()
    path = tmp_path / "dit.pt"
    torch.save(model.state_dict(), path)
    other = ditlab.DiT(**TINY).eval()
    other.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), other(x, t, y))


def test_infer_config_of_named_configs():
    for name in ("DiT-XL/2", "DiT-S/8", "DiT-B/4"):
        with torch.device("meta"):
            model = ditlab.create_model(name, input_size=32)
        assert infer_config(model.state_dict()) == model.config


def test_state_dict_of_another_config_is_a_one_line_error():
    model = ditlab.DiT(**TINY)
    wider = ditlab.DiT(**{**TINY, "hidden_size": 48})
    with pytest.raises(ValueError, match="shape mismatch") as e:
        load_weights(model, wider.state_dict())
    assert "\n" not in str(e.value)
    deeper = ditlab.DiT(**{**TINY, "depth": 3})
    with pytest.raises(ValueError, match="unexpected keys") as e:
        load_weights(model, deeper.state_dict())
    assert "\n" not in str(e.value)


def test_bad_names_and_sizes():
    with pytest.raises(ValueError, match="unknown model 'DiT-M/2'"):
        ditlab.create_model("DiT-M/2")
    with pytest.raises(ValueError, match="patch size 4 does not divide the input size 10"):
        ditlab.create_model("DiT-S/4", input_size=10)
    with pytest.raises(ValueError, match="unknown block design"):
        ditlab.DiT(**TINY, block="adaln-one")
    model = ditlab.DiT(**TINY)
    with pytest.raises(ValueError, match="expects input of shape"):
        model(torch.zeros(1, 4, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="pass labels y"):
        model(torch.zeros(1, 4, 8, 8), torch.zeros(1))


def test_model_configs_table():
    assert len(ditlab.MODEL_CONFIGS) == 12
    assert ditlab.MODEL_CONFIGS["DiT-XL/2"] == {"depth": 28, "hidden_size": 1152, "patch_size": 2, "num_heads": 16}
    model = ditlab.create_model("DiT-S/8", input_size=16, depth=1, num_classes=0)
    assert model.config["depth"] == 1 and model.config["hidden_size"] == 384 and model.y_embedder is None


@pytest.mark.parametrize("block", list(ditlab.BLOCKS))
@pytest.mark.parametrize("num_classes,learn_sigma", [(10, True), (0, False)])
def test_gflops_match_torch_flop_counter(block, num_classes, learn_sigma):
    """The math SDPA backend exposes the attention matmuls to torch's counter."""
    model = ditlab.DiT(**{**TINY, "num_classes": num_classes}, learn_sigma=learn_sigma, block=block)
    x, t, y = inputs(n=1, num_classes=num_classes)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, t, y)
    assert counter.get_total_flops() == 2 * ditlab.models.count_macs(model)


PAPER_GFLOPS_256 = {
    "DiT-XL/2": 118.6, "DiT-XL/4": 29.0, "DiT-XL/8": 7.4, "DiT-L/2": 80.7, "DiT-L/4": 19.7, "DiT-L/8": 5.0,
    "DiT-B/2": 23.0, "DiT-B/4": 5.6, "DiT-B/8": 1.4, "DiT-S/2": 6.1, "DiT-S/4": 1.4, "DiT-S/8": 0.4,
}
PAPER_BLOCKS_XL2 = {"in-context": 119.4, "cross-attn": 137.6, "adaln": 118.6, "adaln-zero": 118.6}


def close_to_paper(ours, paper):
    """The paper prints one decimal: ours must round to it, and be within 0.5% where 0.05 is finer."""
    return abs(ours - paper) <= 0.05 + 1e-9 or abs(ours - paper) / paper < 0.005


def test_gflops_match_the_paper():
    for name, paper in PAPER_GFLOPS_256.items():
        with torch.device("meta"):
            model = ditlab.create_model(name, input_size=32)
        assert close_to_paper(ditlab.count_gflops(model), paper), name
    for block, paper in PAPER_BLOCKS_XL2.items():
        with torch.device("meta"):
            model = ditlab.create_model("DiT-XL/2", input_size=32, block=block)
        assert abs(ditlab.count_gflops(model) - paper) / paper < 0.005, block
    with torch.device("meta"):
        model = ditlab.create_model("DiT-XL/2", input_size=64)
    assert abs(ditlab.count_gflops(model) - 524.6) / 524.6 < 0.005
