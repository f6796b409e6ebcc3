"""REPA in training (training/repa_run.py, the step's alignment term): a run with an encoder given as a
torch module resumes bit for bit, logs the alignment loss and adds lambda times it to the loss; the
projector is saved and dropped for sampling; --repa-encoder takes a DINOv2 weights file in the
official layout; the encoder sees the clean image on the side the latent was drawn from."""

import json

import numpy as np
import torch
from torch import nn

from ditlab.checkpoints.formats import read_checkpoint
from ditlab.cli import main
from ditlab.data.latents import sample_latents, sample_latents_paired
from ditlab.evaluation.dinov2 import DinoConfig, DinoVisionTransformer
from ditlab.models.repa import default_repa_depth
from ditlab.models.repa_encoder import RepaEncoder
from ditlab.training import TrainConfig, train

TINY = dict(data="digits", model="DiT-S/2", depth=3, hidden_size=32, num_heads=2, image_size=8, global_batch_size=16,
            num_workers=0, sample_every=0, log_every=2, progress=False, ema_decay=0.9, lr=1e-3, repa_width=16,
            repa_depth=1)  # fmt: skip


class PatchEncoder(nn.Module):
    """A tiny frozen encoder: 8 x 8 one-channel images -> 4 x 4 patches of 8 features (N, 16, 8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.conv = nn.Conv2d(1, 8, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2)  # (N, 16, 8)


def rows(results):
    return [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]


def test_repa_run_resumes_bit_for_bit_logs_its_term_and_drops_the_projector(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(TrainConfig(results=str(a), max_steps=4, ckpt_every=4, **TINY), device="cpu", repa_encoder=PatchEncoder())
    train(TrainConfig(results=str(b), max_steps=2, ckpt_every=2, **TINY), device="cpu", repa_encoder=PatchEncoder())
    train(TrainConfig(results=str(b), max_steps=4, ckpt_every=2, **TINY), device="cpu", repa_encoder=PatchEncoder())
    sa = torch.load(a / "checkpoints" / "step-0000004.pt", weights_only=True)
    sb = torch.load(b / "checkpoints" / "step-0000004.pt", weights_only=True)
    assert sa["config"]["repa_encoder"] == "module:PatchEncoder"
    assert sa["model_config"]["repa_dim"] == 8 and sa["model_config"]["repa_depth"] == 1
    assert any(k.startswith("projectors.0.") for k in sa["model"])
    for part in ("model", "ema"):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), (part, k)
    oa, ob = sa["opt"]["state"], sb["opt"]["state"]
    assert all(torch.equal(oa[k]["exp_avg"], ob[k]["exp_avg"]) for k in oa)
    ra, rb = rows(a), rows(b)
    for r, q in zip(ra, rb, strict=True):
        assert {k: v for k, v in r.items() if k not in ("images_per_sec", "wall_time")} == \
            {k: v for k, v in q.items() if k not in ("images_per_sec", "wall_time")}
        # the logged loss is the diffusion loss plus lambda (0.5) x the alignment loss, a negative cosine
        assert -1.0 <= r["repa"] <= 1.0
        assert abs(r["loss"] - (r["mse"] + r["vb"] + 0.5 * r["repa"])) < 1e-5 * max(1.0, abs(r["loss"]))
    sampler = read_checkpoint(a / "checkpoints" / "step-0000004.pt")
    assert sampler.config["repa_dim"] == 0 and not any(k.startswith("projectors.") for k in sampler.state_dict)
    # the projector learns: the alignment loss moves from the untrained projector's
    assert ra[0]["repa"] != ra[-1]["repa"]


def tiny_dinov2_file(path) -> DinoVisionTransformer:
    cfg = DinoConfig(64, 1, 1, "mlp", 32, 14, 56, 0, True)  # width 64 (one head), 1 block, patch 14, 4 x 4 grid stored
    torch.manual_seed(0)
    net = DinoVisionTransformer(cfg)
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    torch.save(net.state_dict(), path)
    return net


def test_cli_repa_encoder_reads_a_dinov2_file_and_mistakes_are_one_line(tmp_path, capsys):
    weights = tmp_path / "dino.pth"
    net = tiny_dinov2_file(weights)
    flags = ["train", "--data", "digits", "--model", "DiT-S/2", "--depth", "3", "--hidden-size", "32",
             "--num-heads", "2", "--global-batch-size", "8", "--num-workers", "0", "--sample-every", "0",
             "--max-steps", "1", "--log-every", "1", "--device", "cpu", "--no-progress", "--repa-width", "16"]
    assert main([*flags, "--results", str(tmp_path / "r"), "--repa-encoder", str(weights)]) == 0
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "step-0000001.pt", weights_only=True)
    assert ckpt["model_config"]["repa_dim"] == 64 and ckpt["model_config"]["repa_depth"] == default_repa_depth(3) == 1
    assert "repa" in rows(tmp_path / "r")[0]
    # DINOv2's input: one channel repeated, [0, 1], 224 px, ImageNet's normalisation; 16 x 16 patch tokens
    enc = RepaEncoder(net.eval(), "x", dinov2=True)
    img = torch.rand(2, 1, 8, 8) * 2 - 1
    x = enc.preprocess(img)
    assert x.shape == (2, 3, 224, 224) and torch.equal(x[:, 0] * 0.229 + 0.485, x[:, 0] * 0.229 + 0.485)
    assert torch.allclose(x[:, 1] * 0.224 + 0.456, x[:, 0] * 0.229 + 0.485, atol=1e-5)  # the same grey image
    assert enc(img).shape == (2, 256, 64)
    assert main([*flags, "--results", str(tmp_path / "s"), "--repa-encoder", str(tmp_path / "none.pth")]) == 2
    assert main([*flags, "--results", str(tmp_path / "s"), "--repa-coeff", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "none.pth" in err[-2] and "--repa-coeff -1" in err[-1]


def test_cached_features_follow_the_latents_flip():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(6, 2, 1, 2, 2, generator=g)
    std = torch.zeros_like(mean)  # the latent is the mean of the side drawn
    features = torch.randn(6, 2, 4, 3, generator=g)  # (N, image / flip, S, Dz)
    latents, picked = sample_latents_paired(mean, std, features, torch.Generator().manual_seed(5))
    assert torch.equal(latents, sample_latents(mean, std, torch.Generator().manual_seed(5)))  # the same draws
    sides = [int(torch.equal(latents[i], mean[i, 1])) for i in range(6)]
    assert 0 < sum(sides) < 6
    for i, side in enumerate(sides):
        assert torch.equal(picked[i], features[i, side])


def test_default_repa_depth_is_repas():
    assert default_repa_depth(28) == 8 and default_repa_depth(24) == 8 and default_repa_depth(12) == 4
    assert default_repa_depth(2) == 1


def test_extract_latents_caches_the_encoders_features_of_image_and_flip_and_train_reads_them(tmp_path, capsys):
    from PIL import Image

    from ditlab.data.images import center_crop_arr, to_tensor
    from ditlab.data.latents import LatentCacheDataset

    rng = np.random.default_rng(0)
    for rel in ("a/0.png", "a/1.png", "b/0.png", "b/1.png"):
        (tmp_path / "img" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "img" / rel)
    weights = tmp_path / "dino.pth"
    net = tiny_dinov2_file(weights)
    cache = tmp_path / "cache"
    assert main(["extract-latents", "--data", str(tmp_path / "img"), "--out", str(cache), "--image-size", "8",
                 "--vae", "pixel", "--num-workers", "0", "--dtype", "float32", "--no-progress",
                 "--repa-encoder", str(weights)]) == 0
    ds = LatentCacheDataset(str(cache))
    assert len(ds[0]) == 3 and ds.use_repa_features(str(weights)) == (256, 64)
    mean, _, _, features = ds[2]  # (2, 3, 8, 8), (2, 256, 64): the image and its flip
    crop = to_tensor(center_crop_arr(Image.open(tmp_path / "img" / "b" / "0.png").convert("RGB"), 8))
    assert torch.equal(mean[1], crop.flip(-1))
    encoder = RepaEncoder(net.eval(), "x", dinov2=True)
    want = encoder(torch.stack([crop, crop.flip(-1)]))  # (2, 256, 64)
    assert torch.allclose(features, want, atol=1e-5 * want.abs().max().item())
    assert not torch.allclose(features[0], features[1], atol=1e-3)
    flags = ["train", "--data", str(cache), "--model", "DiT-S/2", "--depth", "2", "--hidden-size", "32",
             "--num-heads", "2", "--global-batch-size", "4", "--num-workers", "0", "--sample-every", "0",
             "--max-steps", "1", "--log-every", "1", "--device", "cpu", "--no-progress", "--repa-width", "16"]
    assert main([*flags, "--results", str(tmp_path / "r"), "--repa-encoder", str(weights)]) == 0
    assert "repa" in rows(tmp_path / "r")[0]
    assert main([*flags, "--results", str(tmp_path / "s"), "--repa-encoder", "dinov2_vitb14"]) == 2
    assert "holds the features of" in capsys.readouterr().err
