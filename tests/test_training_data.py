"""Training reads image folders (encoded online) and latent caches (posterior samples)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ditlab.checkpoints.state import list_checkpoints, load_checkpoint
from ditlab.cli import main
from ditlab.data.extract import extract_latents
from ditlab.training import TrainConfig, train
from ditlab.training.data import open_training_data

SMALL = dict(model="DiT-S/2", depth=1, hidden_size=32, num_heads=2, image_size=16, global_batch_size=4,
             num_workers=0, log_every=1, progress=False, max_steps=2, ckpt_every=2)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir()
        for i in range(4):
            arr = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    return str(root)


def test_train_from_an_image_folder_with_a_local_vae(tmp_path, image_dir, vae_dir):
    summary = train(TrainConfig(data=image_dir, results=str(tmp_path), vae=vae_dir, sample_every=2,
                                sample_steps=3, **SMALL), device="cpu")
    assert summary["step"] == 2
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1][1])
    assert ckpt["model_config"]["in_channels"] == 4 and ckpt["model_config"]["input_size"] == 8
    assert ckpt["model_config"]["num_classes"] == 2
    grid = np.asarray(Image.open(tmp_path / "samples" / "step-0000002.png"))
    assert grid.shape == (2 + 2 * 18, 2 + 8 * 18, 3)  # 2 classes x 8 images of 16x16, 2px padding


def test_train_from_a_latent_cache(tmp_path, image_dir, vae_dir):
    cache = tmp_path / "cache"
    extract_latents(image_dir, str(cache), image_size=16, vae=vae_dir, batch_size=4, progress=False, log=lambda s: None)
    assert main(["train", "--data", str(cache), "--results", str(tmp_path / "run"), "--image-size", "16",
                 "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
                 "--global-batch-size", "4", "--num-workers", "0", "--max-steps", "2", "--ckpt-every", "2",
                 "--sample-every", "2", "--sample-steps", "2", "--log-every", "1", "--device", "cpu",
                 "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "run" / "samples" / "step-0000002.png").is_file()


def test_latent_cache_draws_fresh_flips_and_posterior_samples(tmp_path, image_dir, vae_dir):
    cache = tmp_path / "cache"
    extract_latents(image_dir, str(cache), image_size=16, vae=vae_dir, batch_size=4, progress=False, log=lambda s: None)
    data = open_training_data(str(cache), 16, vae_dir, torch.device("cpu"))
    assert (data.kind, data.channels, data.size, data.num_classes) == ("latents", 4, 8, 2)
    mean, std, label = (torch.stack([torch.as_tensor(data.dataset[i][j]) for i in range(4)]) for j in range(3))
    a, _ = data.to_model_input([mean, std, label], torch.device("cpu"), torch.Generator().manual_seed(0))
    b, _ = data.to_model_input([mean, std, label], torch.device("cpu"), torch.Generator().manual_seed(1))
    assert a.shape == (4, 4, 8, 8) and not torch.equal(a, b)
    with pytest.raises(ValueError, match="holds 16px images"):
        open_training_data(str(cache), 32, vae_dir, torch.device("cpu"))
