"""The modern block options (norm, qk_norm, mlp, pos) on every design: the compute count against a
count by hand, the rotary embedding's relative-position property, the config, checkpoints without
the fields, `train` flags, a study grid, and LightningDiT-layout files through `sample` and `convert`.
Exactness to LightningDiT's code: test_golden_lightningdit.py."""

import math

import numpy as np
import pytest
import torch
from helpers import randomize
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ditlab
from ditlab.checkpoints.formats import DiTCheckpoint, build_model, read_checkpoint, write_ditlab
from ditlab.cli import build_parser, main
from ditlab.flags import from_args
from ditlab.models.layers import mlp_hidden, timestep_features
from ditlab.models.rope import apply_rope, rope_tables
from ditlab.training.config import TrainConfig

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
ALL_ON = dict(norm="rmsnorm", qk_norm="layernorm", mlp="swiglu", pos="sincos+rope")


def test_gflops_of_swiglu_by_hand():
    """DiT-T/2 at 8x8x4 (T = 16 tokens, D = 32, depth 2, 10 classes, learned sigma), SwiGLU hidden
    int(2/3 x 128) = 85: every matmul of the forward pass written out."""
    T, D, p, C, depth, H = 16, 32, 2, 4, 2, 85
    per_block = (T * D * 3 * D  # qkv
                 + 2 * T * T * D  # QK^T and AV
                 + T * D * D  # attention output
                 + T * D * 2 * H + T * H * D  # w12 (two hidden halves) and w3
                 + D * 6 * D)  # adaLN-Zero modulation from c
    macs = (T * p * p * C * D  # patch embedding
            + 256 * D + D * D  # timestep MLP
            + depth * per_block
            + D * 2 * D + T * D * p * p * 2 * C)  # final modulation and decoder
    model = ditlab.DiT(**TINY, **ALL_ON)
    assert ditlab.models.count_macs(model) == macs
    for others in ({"norm": "rmsnorm"}, {"qk_norm": "rmsnorm"}, {"pos": "rope"}, {"pos": "sincos+rope"}):
        # norms and RoPE are elementwise: the count is the paper's block's
        assert ditlab.models.count_macs(ditlab.DiT(**TINY, **others)) == ditlab.models.count_macs(ditlab.DiT(**TINY))


@pytest.mark.parametrize("block", list(ditlab.BLOCKS))
def test_gflops_with_every_option_match_torch_flop_counter(block):
    model = ditlab.DiT(**TINY, block=block, **{**ALL_ON, "qk_norm": "rmsnorm"})
    x, t, y = torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([3])
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, t, y)
    assert counter.get_total_flops() == 2 * ditlab.models.count_macs(model)


def test_swiglu_at_xl2_has_the_gelu_macs_and_the_flops_table_counts_it(capsys):
    assert mlp_hidden("swiglu", 1152, 4.0) == 3072  # int(2/3 x 4608), LightningDiT's width: 3 x 3072 = 2 x 4608
    assert main(["flops", "--mlp", "swiglu", "--norm", "rmsnorm", "--pos", "sincos+rope"]) == 0
    out = capsys.readouterr().out
    assert "norm rmsnorm, mlp swiglu, pos sincos+rope" in out
    xl2 = next(line for line in out.splitlines() if line.startswith("DiT-XL/2 "))
    assert xl2.split()[-1] == "118.62"  # the GELU block's count (the paper's 118.6)


@pytest.mark.parametrize("block", list(ditlab.BLOCKS))
def test_every_design_with_every_option_trains_every_parameter(block):
    model = ditlab.DiT(**TINY, block=block, **ALL_ON)
    randomize(model)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10])
    model(x, t, y).square().mean().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "blocks.0.attn.q_norm.weight" in trainable and "blocks.0.mlp.w12.weight" in trainable
    assert all(model.get_parameter(n).grad is not None and model.get_parameter(n).grad.abs().sum() > 0
               for n in trainable), [n for n in trainable if model.get_parameter(n).grad is None]


def test_rope_only_has_no_table_and_depends_on_positions_only_relatively():
    model = ditlab.DiT(**TINY, pos="rope")
    assert model.pos_embed is None and "pos_embed" not in model.state_dict()
    cos, sin = rope_tables(8, 4)  # head dim 8 on a 4 x 4 grid
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g).double(), torch.randn(8, generator=g).double()
    rotated_q = apply_rope(q.expand(1, 1, 16, 8), cos.double(), sin.double())[0, 0]  # (16, 8): q at every token
    rotated_k = apply_rope(k.expand(1, 1, 16, 8), cos.double(), sin.double())[0, 0]
    logits = rotated_q @ rotated_k.T  # (16, 16): token i's query against token j's key

    def at(r, c):
        return 4 * r + c

    # the same offset (1 row, 2 columns) from different places gives the same logit
    assert torch.allclose(logits[at(0, 0), at(1, 2)], logits[at(2, 1), at(3, 3)], atol=1e-12)
    assert not torch.allclose(logits[at(0, 0), at(1, 2)], logits[at(0, 0), at(2, 1)], atol=1e-3)


def test_in_context_rotates_only_the_image_tokens():
    cos, sin = rope_tables(8, 2)  # 4 image tokens
    x = torch.randn(1, 1, 6, 8)  # 4 image tokens, then 2 conditioning tokens
    out = apply_rope(x, cos, sin)
    assert torch.equal(out[..., 4:, :], x[..., 4:, :])
    assert torch.equal(out[..., :4, :], apply_rope(x[..., :4, :], cos, sin))


def test_the_model_takes_float_time_as_given():
    t = torch.tensor([0.0, 0.25, 1.0])
    k = torch.arange(128, dtype=torch.float64)
    args = t[:, None].double() * torch.exp(-math.log(10000) * k / 128)
    features = timestep_features(t, 256)
    assert torch.allclose(features.double(), torch.cat([torch.cos(args), torch.sin(args)], 1), atol=1e-6)
    model = randomize(ditlab.DiT(**TINY, **ALL_ON)).eval()
    x, y = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1), torch.tensor([3, 3])
    out = model(x, torch.tensor([0.25, 0.26]), y)
    assert not torch.allclose(out[0], out[1], atol=1e-4)  # nearby float times are not rounded together


@pytest.mark.parametrize("kwargs,message", [
    ({"norm": "batchnorm"}, "--norm 'batchnorm'"),
    ({"qk_norm": "yes"}, "--qk-norm 'yes'"),
    ({"mlp": "relu"}, "--mlp 'relu'"),
    ({"pos": "learned"}, "--pos 'learned'"),
    ({"pos": "rope", "hidden_size": 36, "num_heads": 6}, "multiple of 4"),
])  # fmt: skip
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        ditlab.DiT(**{**TINY, **kwargs})
    assert "\n" not in str(e.value)


def test_a_checkpoint_without_the_fields_reads_as_the_paper(tmp_path):
    model = randomize(ditlab.DiT(**TINY)).eval()
    old_config = {k: v for k, v in model.config.items() if k not in ("norm", "qk_norm", "mlp", "pos")}
    path = tmp_path / "old.pt"
    write_ditlab(DiTCheckpoint(model.state_dict(), old_config, "ditlab", str(path)), path)
    rebuilt = build_model(read_checkpoint(path))
    assert rebuilt.config == model.config
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
    assert torch.equal(rebuilt(x, t, y), model(x, t, y))


def test_train_flags_and_the_config_hold_the_options():
    args = build_parser().parse_args(["train", "--data", "digits", "--results", "r", "--norm", "rmsnorm",
                                      "--qk-norm", "layernorm", "--mlp", "swiglu", "--pos", "sincos+rope"])
    cfg = from_args(TrainConfig, args)
    assert cfg.block_options() == ALL_ON
    assert ditlab.create_model("DiT-S/2", input_size=8, depth=1, **cfg.block_options()).config["mlp"] == "swiglu"
    default = from_args(TrainConfig, build_parser().parse_args(["train", "--data", "digits", "--results", "r"]))
    assert default.block_options() == {"norm": "layernorm", "qk_norm": "none", "mlp": "gelu", "pos": "sincos"}
    with pytest.raises(ValueError, match="--pos 'rotary'"):
        TrainConfig(data="digits", results="r", pos="rotary")


def test_study_grid_keys_of_the_options(tmp_path):
    from ditlab.study.spec import load_spec

    spec = tmp_path / "s.toml"
    spec.write_text('name = "o"\n[data]\ndata = "digits"\n[train]\neval_steps = [2]\n'
                    '[sizes]\nT = { depth = 1, hidden_size = 32, num_heads = 2 }\n'
                    '[[grid]]\nsizes = ["T"]\npatch_sizes = [2]\nnorms = ["layernorm", "rmsnorm"]\n'
                    'mlps = ["swiglu"]\n[[grid]]\nsizes = ["T"]\npatch_sizes = [2]\npositions = ["sincos+rope"]\n'
                    'qk_norms = ["rmsnorm"]\n[eval]\nmetric = "digits"\nnum_samples = 10\n')
    entries = load_spec(spec).entries
    assert set(entries) == {"DiT-T-2-swiglu", "DiT-T-2-rmsnorm-swiglu", "DiT-T-2-qk-rmsnorm-sincos+rope"}
    cfg = entries["DiT-T-2-rmsnorm-swiglu"].train_config(tmp_path / "run", 2, False)
    assert cfg.block_options() == {"norm": "rmsnorm", "qk_norm": "none", "mlp": "swiglu", "pos": "sincos"}
    spec.write_text(spec.read_text().replace('mlps = ["swiglu"]', 'mlps = ["geglu"]'))
    with pytest.raises(ValueError, match="mlps"):
        load_spec(spec)


def test_lightningdit_checkpoint_samples_and_converts(tmp_path, capsys):
    """A LightningDiT training checkpoint ({"model", "ema", "opt", "config"}, its parameter and rotary
    buffer names, no learned sigma; S width so that the heads follow from it): the options are read
    off its keys, `sample` draws from it and `convert` writes it with its config."""
    options = {"norm": "rmsnorm", "qk_norm": "none", "mlp": "swiglu", "pos": "sincos+rope"}
    model = randomize(ditlab.DiT(input_size=4, patch_size=2, in_channels=3, hidden_size=384, depth=1, num_heads=6,
                                 num_classes=10, learn_sigma=False, **options), std=0.02).eval()
    path = tmp_path / "lightningdit.pt"
    sd = model.state_dict()
    torch.save({"model": sd, "ema": sd, "opt": {}, "config": {"model": {"model_type": "LightningDiT-S/2"}}}, path)
    ckpt = read_checkpoint(path)
    assert {k: ckpt.config[k] for k in options} == options and ckpt.config["num_heads"] == 6
    assert main(["sample", "--ckpt", str(path), "--vae", "pixel", "--classes", "1", "2", "--steps", "2",
                 "--no-progress", "--device", "cpu", "--precision", "fp32", "--out", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (2, 4, 4, 3)
    assert main(["convert", str(path), str(tmp_path / "c.safetensors"), "--to", "safetensors"]) == 0
    converted = build_model(read_checkpoint(tmp_path / "c.safetensors"))
    assert converted.config == model.config
    x, t, y = torch.randn(2, 3, 4, 4), torch.rand(2), torch.tensor([1, 2])
    assert torch.equal(converted(x, t, y), model(x, t, y))
    assert main(["convert", str(path), str(tmp_path / "d"), "--to", "diffusers"]) != 0
    assert "diffusers' DiT has the paper's block only" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
