"""Checkpoint formats: reading each, `ditlab convert` round trips, diffusers' own DiT on our folder,
and one-line errors for files that are not DiTs."""

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlab.checkpoints.convert import convert
from ditlab.checkpoints.formats import FORMATS, build_model, read_checkpoint
from ditlab.cli import main

FAST = ["--steps", "3", "--cfg-scale", "2.0", "--vae", "pixel", "--no-progress", "--device", "cpu"]


def save_ditlab(path, ema, raw, dtype=torch.float32):
    cast = lambda m: {k: v.to(dtype) for k, v in m.state_dict().items()}  # noqa: E731
    torch.save({"model": cast(raw), "ema": cast(ema), "opt": {}, "step": 3, "config": {"data": "digits"},
                "model_config": ema.config}, path)
    return path


def sample(ckpt, out, *extra):
    assert main(["sample", "--ckpt", str(ckpt), "--classes", "0", "3", "7", "--out", str(out), *FAST, *extra]) == 0
    with np.load(out) as f:
        return f["arr_0"], f["arr_1"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("to", FORMATS)
def test_round_trip_is_bit_exact_and_samples_identically(tmp_path, make_dit, to, dtype):
    src = save_ditlab(tmp_path / "run.pt", make_dit(0), make_dit(1), dtype)
    mid, back = tmp_path / f"mid-{to}", tmp_path / "back.pt"
    assert main(["convert", str(src), str(mid), "--to", to]) == 0
    assert main(["convert", str(mid), str(back), "--to", "ditlab"]) == 0
    first, middle, last = read_checkpoint(src), read_checkpoint(mid), read_checkpoint(back)
    assert middle.format == to and last.format == "ditlab"
    assert first.config == middle.config == last.config
    assert set(first.state_dict) == set(middle.state_dict) == set(last.state_dict)
    for k, v in first.state_dict.items():
        for other in (middle, last):
            assert other.state_dict[k].dtype == dtype and torch.equal(other.state_dict[k], v), k
    if dtype == torch.float32:
        images = [sample(p, tmp_path / f"{name}.npz") for name, p in (("src", src), ("mid", mid), ("back", back))]
        assert all(np.array_equal(a[0], images[0][0]) and np.array_equal(a[1], images[0][1]) for a in images)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_raw_weights_round_trip_under_their_own_name(tmp_path, make_dit):
    src = save_ditlab(tmp_path / "run.pt", make_dit(0), make_dit(1))
    convert(src, tmp_path / "raw.pt", "ditlab", weights="model")
    stored = torch.load(tmp_path / "raw.pt", weights_only=True)
    assert sorted(stored) == ["class_names", "model", "model_config", "record_sha256", "step", "tensor_sha256", "vae"]
    assert stored["vae"] == "pixel"
    assert stored["class_names"] == [str(i) for i in range(10)]  # the digits' names go with the weights
    assert all(torch.equal(stored["model"][k], v) for k, v in make_dit(1).state_dict().items())
    with pytest.raises(ValueError, match="without 'ema' weights .* pass --weights model"):
        read_checkpoint(tmp_path / "raw.pt")


def test_diffusers_own_dit_loads_our_folder_and_agrees(tmp_path, make_dit):
    diffusers = pytest.importorskip("diffusers")
    from ditlab.models.convert import make_diffusers_exact

    ours = make_dit(2)
    src = save_ditlab(tmp_path / "run.pt", ours, ours)
    convert(src, tmp_path / "dit-diffusers", "diffusers")
    peer = make_diffusers_exact(diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "dit-diffusers").eval())
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 9, 10, 4])
    with torch.no_grad():
        a, b = ours(x, t, y), peer(x, timestep=t, class_labels=y).sample
    assert a.shape == b.shape == (4, 8, 8, 8)
    assert (a - b).abs().max().item() < 1e-5 * a.abs().max().item()
    # and what diffusers itself saves, we read back to the same weights
    peer.save_pretrained(tmp_path / "saved-by-diffusers")
    again = read_checkpoint(tmp_path / "saved-by-diffusers")
    assert all(torch.equal(again.state_dict[k], v) for k, v in ours.state_dict().items())


def test_diffusers_pipeline_folder_brings_its_vae(tmp_path, make_dit, vae_dir):
    model = make_dit(3)
    torch.save(model.state_dict(), tmp_path / "authors.pt")
    convert(tmp_path / "authors.pt", tmp_path / "pipe" / "transformer", "diffusers")
    shutil.copytree(vae_dir, tmp_path / "pipe" / "vae")
    assert read_checkpoint(tmp_path / "pipe").vae == str(tmp_path / "pipe" / "vae")
    common = ["--classes", "5", "--out", "", "--steps", "3", "--no-progress", "--device", "cpu"]
    for name, ckpt, vae in (("pipe", tmp_path / "pipe", []), ("pt", tmp_path / "authors.pt", ["--vae", vae_dir])):
        common[3] = str(tmp_path / f"{name}.npz")
        assert main(["sample", "--ckpt", str(ckpt), *common, *vae]) == 0
    with np.load(tmp_path / "pipe.npz") as a, np.load(tmp_path / "pt.npz") as b:
        assert a["arr_0"].shape == (1, 16, 16, 3) and np.array_equal(a["arr_0"], b["arr_0"])


def test_authors_training_checkpoint_with_args(tmp_path, make_dit):
    ema, raw = make_dit(0), make_dit(1)
    args = argparse.Namespace(model="DiT-S/2", image_size=64, num_classes=10)
    path = tmp_path / "0400000.pt"
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": args}, path)
    for weights, model in (("ema", ema), ("model", raw)):
        ckpt = read_checkpoint(path, weights=weights)
        assert ckpt.format == "original" and ckpt.config == {**model.config, "class_dropout_prob": 0.1}
        assert all(torch.equal(ckpt.state_dict[k], v) for k, v in model.state_dict().items())
    built = build_model(read_checkpoint(path))
    assert not built.training and all(torch.equal(built.state_dict()[k], v) for k, v in ema.state_dict().items())


def test_convert_refuses_an_existing_destination_unless_forced(tmp_path, make_dit, capsys):
    src = save_ditlab(tmp_path / "run.pt", make_dit(0), make_dit(1))
    dst = tmp_path / "out"
    dst.write_bytes(b"keep me")
    assert main(["convert", str(src), str(dst), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and dst.read_bytes() == b"keep me"
    # --force replaces only what ditlab wrote in that format: not this file (test_faults_data has the rest)
    assert main(["convert", str(src), str(dst), "--to", "diffusers", "--force"]) == 2
    assert "not replaced" in capsys.readouterr().err and dst.read_bytes() == b"keep me"
    dst.unlink()
    assert main(["convert", str(src), str(dst), "--to", "diffusers"]) == 0
    assert main(["convert", str(src), str(dst), "--to", "diffusers", "--force"]) == 0  # its own folder replaced
    assert sorted(os.listdir(dst)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out", "run.pt"]


def test_conversions_a_format_cannot_hold_are_refused(tmp_path, make_dit, capsys):
    cases = [
        (dict(hidden_size=32, num_heads=2), "original", "hidden size 32 matches no named"),
        (dict(hidden_size=384, num_heads=12), "original", "num_heads would read back as 6"),
        (dict(block="adaln"), "original", "adaLN-Zero"),
        (dict(block="adaln"), "diffusers", "adaLN-Zero"),
        (dict(class_dropout_prob=0.0), "diffusers", "null-label"),
        (dict(num_classes=0), "diffusers", "class-conditional only"),
    ]
    for i, (overrides, to, needle) in enumerate(cases):
        model = make_dit(0, **overrides)
        src = save_ditlab(tmp_path / f"run{i}.pt", model, model)
        assert main(["convert", str(src), str(tmp_path / f"dst{i}"), "--to", to]) == 2, overrides
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--to {to}" in err and needle in err, err
        assert main(["convert", str(src), str(tmp_path / f"ok{i}.safetensors"), "--to", "safetensors"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("dst", "."))]


def test_files_that_are_not_dits_are_one_line_errors_naming_them(tmp_path, make_dit, capsys):
    model = make_dit()
    torch.save(model.state_dict(), tmp_path / "good.pt")
    (tmp_path / "noise.bin").write_bytes(os.urandom(300))
    (tmp_path / "half.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:5000])
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"weights": torch.ones(3)}, tmp_path / "dict.pt")
    torch.save({k: v for k, v in model.state_dict().items() if "fc2" not in k}, tmp_path / "partial.pt")
    convert(tmp_path / "good.pt", tmp_path / "good.safetensors", "safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "good.safetensors").read_bytes()[:3000])
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    cases = {"noise.bin": "cannot read it", "half.pt": "cannot read it", "list.pt": "holds a list",
             "dict.pt": "not a DiT checkpoint", "partial.pt": "missing keys", "cut.safetensors": "safetensors",
             "empty": "without config.json", "other": "UNet2DModel", "absent.pt": "no such"}
    for name, needle in cases.items():
        assert main(["convert", str(tmp_path / name), str(tmp_path / "x.pt"), "--to", "ditlab"]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(tmp_path / name) in err and needle in err, err
    assert not (tmp_path / "x.pt").exists()


def test_named_model_is_checked_against_the_weights(tmp_path, make_dit):
    torch.save(make_dit().state_dict(), tmp_path / "s.pt")
    assert read_checkpoint(tmp_path / "s.pt").config["num_heads"] == 6  # from the width, as DiT-S
    with pytest.raises(ValueError, match=r"does not hold a DiT-S/2: depth 1 \(a DiT-S/2 has 12\)"):
        read_checkpoint(tmp_path / "s.pt", model="DiT-S/2")
    with pytest.raises(ValueError, match=r"depth 1 \(a DiT-XL/2 has 28\), hidden_size 384 \(a DiT-XL/2 has 1152\)"):
        read_checkpoint(tmp_path / "s.pt", model="DiT-XL/2")
    with pytest.raises(ValueError, match="unknown model"):
        read_checkpoint(tmp_path / "s.pt", model="DiT-M/2")
    assert Path(tmp_path / "s.pt").is_file()



def test_a_checkpoint_is_read_without_drawing_a_random_init_on_meta(tmp_path, make_dit, monkeypatch):
    # The DiT shell built on the meta device skips its random init: on meta, normal_ is a Python
    # decomposition whose first call imports torch._dynamo (about 1 s of every sample's start-up).
    model = make_dit(0)
    path = tmp_path / "tiny.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "step": 1,
                "config": {"data": "digits"}, "model_config": model.config}, path)  # fmt: skip
    normal_ = torch.Tensor.normal_

    def no_meta_normal(self, *args, **kwargs):
        assert not self.is_meta, "normal_ on a meta tensor (imports torch._dynamo)"
        return normal_(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", no_meta_normal)
    net = build_model(read_checkpoint(str(path)))
    assert net.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in net.state_dict().items())
