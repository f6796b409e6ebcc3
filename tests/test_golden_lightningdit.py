"""ditlab's modern block options against golden values from LightningDiT's own model code
(hustvl/LightningDiT), stored in tests/data/golden_lightningdit_reference.npz by
scripts/make_golden_lightningdit.py (which does not import ditlab): for each option alone, the
released combination (RMSNorm + SwiGLU + RoPE) and all together, a tiny random LightningDiT's state
dict loads strictly into ditlab.DiT with the matching options and learn_sigma=False, and the
forward pass agrees to 1e-5 of the output's scale."""

import json

import numpy as np
import pytest
import torch
from helpers import read_golden
from test_golden_reference import assert_close

import ditlab
from ditlab.models.rope import rope_tables
from ditlab.models.weights import infer_config

NETWORK_TOL = 1e-5  # of the output's scale


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return read_golden("golden_lightningdit_reference.npz")


@pytest.fixture(scope="module")
def config(golden) -> dict:
    return json.loads(str(golden["config"]))


def options_of(switches: dict[str, bool]) -> dict[str, str]:
    """ditlab's options for LightningDiT's switches (its QK-norm is an RMSNorm exactly when its blocks' is)."""
    rms = switches.get("use_rmsnorm", False)
    return {
        "norm": "rmsnorm" if rms else "layernorm",
        "qk_norm": ("rmsnorm" if rms else "layernorm") if switches.get("use_qknorm") else "none",
        "mlp": "swiglu" if switches.get("use_swiglu") else "gelu",
        "pos": "sincos+rope" if switches.get("use_rope") else "sincos",
    }


def state_of(golden, name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}/"
    return {k[len(prefix):]: torch.from_numpy(golden[k]).float() for k in golden
            if k.startswith(prefix) and k != f"{name}/out"}  # fmt: skip


VARIANTS = ("rmsnorm", "qknorm", "qknorm_rmsnorm", "swiglu", "rope", "released", "all")


def test_fixture_holds_every_variant(config):
    assert tuple(config["variants"]) == VARIANTS
    assert options_of(config["variants"]["released"]) == {"norm": "rmsnorm", "qk_norm": "none", "mlp": "swiglu",
                                                          "pos": "sincos+rope"}


@pytest.mark.parametrize("name", VARIANTS)
def test_lightningdit_state_dict_loads_strictly_and_the_forward_agrees(golden, config, name):
    options = options_of(config["variants"][name])
    model = ditlab.DiT(**config["model"], learn_sigma=False, **options).eval()
    model.load_state_dict(state_of(golden, name), strict=True)
    x, t, y = (torch.from_numpy(golden[k]) for k in ("x", "t", "y"))
    with torch.no_grad():
        out = model(x.float(), t, y.long())
    assert_close(out, torch.from_numpy(golden[f"{name}/out"]), NETWORK_TOL, name)


@pytest.mark.parametrize("name", VARIANTS)
def test_options_read_off_a_lightningdit_state_dict(golden, config, name):
    rope = config["variants"][name].get("use_rope", False)  # a rotary table's width gives the heads
    inferred = infer_config(state_of(golden, name), num_heads=None if rope else config["model"]["num_heads"])
    expected = {**config["model"], "learn_sigma": False, **options_of(config["variants"][name])}
    assert {k: inferred[k] for k in expected} == expected
    assert inferred["mlp_ratio"] == 4.0


def test_rotary_tables_are_the_reference_ones_and_rebuilt_on_load(golden, config):
    m = config["model"]
    cos, sin = rope_tables(m["hidden_size"] // m["num_heads"], m["input_size"] // m["patch_size"])
    assert torch.equal(cos, torch.from_numpy(golden["released/feat_rope.freqs_cos"]))
    assert torch.equal(sin, torch.from_numpy(golden["released/feat_rope.freqs_sin"]))
    state = state_of(golden, "released")
    state["feat_rope.freqs_cos"] = torch.zeros_like(state["feat_rope.freqs_cos"])  # never read
    model = ditlab.DiT(**m, learn_sigma=False, **options_of(config["variants"]["released"]))
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.feat_rope.freqs_cos, cos)
    wrong = dict(state, **{"feat_rope.freqs_sin": torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match="feat_rope.freqs_sin"):
        model.load_state_dict(wrong, strict=True)
