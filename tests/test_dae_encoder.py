"""The named REPA encoders (evaluation/dae_encoder.py): a denoising autoencoder trained deterministically
without labels, cached by recipe and data, a damaged cache refused in one line, patch features of a
fixed grid for any input size, and `train --repa-encoder digits-dae` recording the name and resuming
from the cached weights."""

import json

import pytest
import torch
import torch.nn.functional as F

from ditlab.cli import main
from ditlab.errors import UserError
from ditlab.evaluation import dae_encoder
from ditlab.evaluation.dae_encoder import DIGITS_DAE, DaeEncoder, DaeRecipe, load_dae_encoder, train_dae

TINY = DaeRecipe("digits", 8, widths=(4, 8, 8), epochs=2, batch_size=32, train_limit=128)  # 8 steps


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty $DITLAB_HOME, nothing memoised, and digits-dae trained by the tiny recipe."""
    monkeypatch.setenv("DITLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(dae_encoder, "_LOADED", {})
    monkeypatch.setitem(dae_encoder.RECIPES, DIGITS_DAE, TINY)
    return tmp_path / "home"


def test_training_is_deterministic_learns_and_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a, b = train_dae(TINY), train_dae(TINY)
    assert torch.equal(torch.get_rng_state(), before)
    assert a["encoder"].keys() == b["encoder"].keys()
    assert all(torch.equal(a["encoder"][k], b["encoder"][k]) for k in a["encoder"])
    assert a["epoch_mse"] == b["epoch_mse"] and a["epoch_mse"][1] < a["epoch_mse"][0]
    assert a["heldout_mse"] == b["heldout_mse"] and 0 < a["heldout_mse"] < a["epoch_mse"][0]
    other = train_dae(DaeRecipe(**{**vars(TINY), "seed": 1}))
    assert not torch.equal(other["encoder"]["net.0.weight"], a["encoder"]["net.0.weight"])


def test_the_cache_is_hit_without_training_again_and_keyed_by_the_recipe(home, monkeypatch):
    first = load_dae_encoder(TINY)
    assert load_dae_encoder(TINY) is first  # memoised in the process
    path = dae_encoder.cache_path(TINY)
    assert path.parent == home / "encoders" and path.is_file()
    assert dae_encoder.cache_path(DaeRecipe(**{**vars(TINY), "noise_std": 0.25})) != path
    monkeypatch.setattr(dae_encoder, "_LOADED", {})
    monkeypatch.setattr(dae_encoder, "train_dae", lambda *a, **k: pytest.fail("trained again"))
    again = load_dae_encoder(TINY)
    assert again is not first
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_a_damaged_cache_is_refused_in_one_line_and_left_alone(home, monkeypatch):
    path = dae_encoder.cache_path(TINY)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    with pytest.raises(UserError) as e:
        load_dae_encoder(TINY)
    assert str(path) in str(e.value) and "delete it" in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == b"not a torch file"
    stored = train_dae(TINY)  # a real file of another recipe under this name is refused too
    stored["recipe"]["seed"] = 5
    torch.save(stored, path)
    with pytest.raises(UserError, match="another recipe"):
        load_dae_encoder(TINY)


def test_patch_features_in_row_major_order_on_a_fixed_grid_for_any_input_size():
    torch.manual_seed(0)
    enc = DaeEncoder((4, 8, 6), 32).eval()
    x32 = torch.rand(3, 1, 32, 32) * 2 - 1
    x16 = torch.rand(3, 1, 16, 16) * 2 - 1
    out = enc(x32)
    assert out.shape == (3, 256, 6) and enc(x16).shape == (3, 256, 6)
    fmap = enc.net(x32)  # (3, 6, 16, 16)
    assert torch.equal(out[:, 5 * 16 + 9], fmap[:, :, 5, 9])
    up = F.interpolate(x16, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(enc(x16), enc(up), atol=1e-6)  # smaller images: upsampled to the training size
    small = DaeEncoder((4, 8, 6), 8)
    assert small(x16).shape == (3, 16, 6) and small(x16[:, :, :8, :8]).shape == (3, 16, 6)
    with pytest.raises(UserError, match="one-channel"):
        enc(torch.zeros(1, 3, 32, 32))


def test_train_with_the_named_encoder_records_it_and_resumes_from_the_cache(home, tmp_path, capsys, monkeypatch):
    flags = ["train", "--data", "digits", "--model", "DiT-S/2", "--depth", "2", "--hidden-size", "32",
             "--num-heads", "2", "--global-batch-size", "8", "--num-workers", "0", "--sample-every", "0",
             "--log-every", "1", "--ckpt-every", "1", "--device", "cpu", "--no-progress", "--repa-width", "16",
             "--repa-encoder", DIGITS_DAE]
    assert main([*flags, "--results", str(tmp_path / "a"), "--max-steps", "2"]) == 0
    assert main([*flags, "--results", str(tmp_path / "b"), "--max-steps", "1"]) == 0
    monkeypatch.setattr(dae_encoder, "_LOADED", {})  # the resumed run reads the cached weights again
    monkeypatch.setattr(dae_encoder, "train_dae", lambda *a, **k: pytest.fail("trained again"))
    assert main([*flags, "--results", str(tmp_path / "b"), "--max-steps", "2"]) == 0
    sa, sb = (torch.load(tmp_path / r / "checkpoints" / "step-0000002.pt", weights_only=True) for r in "ab")
    assert sa["config"]["repa_encoder"] == DIGITS_DAE and sa["model_config"]["repa_dim"] == TINY.widths[-1]
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(-1.0 <= r["repa"] <= 1.0 for r in rows)
    capsys.readouterr()
    assert main([*flags[:-1], "fashion-mnist-dae", "--results", str(tmp_path / "c"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fashion-mnist-dae" in err and "--data digits" in err
