"""extract-latents and the latent cache: contents, resume, broken files, torchrun, sampling."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ditlab.data.extract as extract_module
from ditlab.cli import main
from ditlab.data import LatentCacheDataset, center_crop_arr, is_latent_cache, sample_latents
from ditlab.data.codecs import load_codec
from ditlab.data.extract import extract_latents
from ditlab.data.images import to_tensor

diffusers = pytest.importorskip("diffusers")

SIZE = 16  # image size; the tiny VAE downsamples by 2
FILES = ["cat/0.png", "cat/1.jpg", "cat/2.png", "cat/3.jpeg", "dog/0.jpg", "dog/1.png", "dog/2.png",
         "dog/3.jpg", "dog/4.JPG", "fox/0.png"]  # fmt: skip
BROKEN = "dog/2.png"


def make_images(root, broken=None):
    """FILES as JPEG/PNG images of assorted sizes; `broken` is "truncated" or "garbage" for BROKEN."""
    rng = np.random.default_rng(0)
    for rel in FILES:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (rng.integers(12, 60), rng.integers(12, 60), 3), dtype=np.uint8)
        Image.fromarray(arr).save(path, format="PNG" if rel.endswith(".png") else "JPEG")
    if broken == "truncated":
        data = (root / BROKEN).read_bytes()
        (root / BROKEN).write_bytes(data[: len(data) // 2])
    elif broken == "garbage":
        (root / BROKEN).write_bytes(b"this is not a png")
    return str(root)


def cache_arrays(root):
    ds = LatentCacheDataset(str(root))
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([m for m, _, _ in items]), torch.stack([s for _, s, _ in items]), [y for _, _, y in items]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cache_holds_the_codec_encoding_of_crop_and_flip(tmp_path, vae_dir, dtype):
    data = make_images(tmp_path / "img")
    out = tmp_path / "cache"
    summary = extract_latents(data, str(out), image_size=SIZE, vae=vae_dir, batch_size=4, shard_size=3,
                              num_workers=0, dtype=dtype, progress=False, log=lambda s: None)
    assert summary["encoded"] == summary["num_samples"] == len(FILES) and is_latent_cache(str(out))
    ds = LatentCacheDataset(str(out))
    assert ds.classes == ["cat", "dog", "fox"] and ds.num_classes == 3 and len(ds) == len(FILES)
    assert ds.latent_shape == (4, 8, 8) and ds.image_size == SIZE and ds.codec == vae_dir and ds.dtype == dtype
    assert len(ds.index["shards"]) == 4 and [s["count"] for s in ds.index["shards"]] == [3, 3, 3, 1]
    codec = load_codec(vae_dir)
    tol = {"float32": dict(rtol=0, atol=1e-5), "float16": dict(rtol=2**-10, atol=1e-5)}[dtype]
    for i, rel in enumerate(FILES):
        mean, std, label = ds[i]
        assert ds.source(i) == rel and label == ["cat", "dog", "fox"].index(rel.split("/")[0])
        assert mean.shape == std.shape == (2, 4, 8, 8) and mean.dtype == std.dtype == torch.float32
        crop = to_tensor(center_crop_arr(Image.open(tmp_path / "img" / rel).convert("RGB"), SIZE))
        for flip, image in enumerate([crop, torch.flip(crop, dims=[2])]):  # (3, H, W), then mirrored left-right
            want_mean, want_std = codec.encode(image[None])
            torch.testing.assert_close(mean[flip], want_mean[0], **tol)
            torch.testing.assert_close(std[flip], want_std[0], **tol)
    raw = np.load(out / "shard-000000.npy", mmap_mode="r")
    assert raw.dtype == np.dtype(dtype) and raw.shape == (3, 2, 2, 4, 8, 8)


def test_pixel_cache_and_loader_workers(tmp_path):
    data = make_images(tmp_path / "img")
    assert main(["extract-latents", "--data", data, "--out", str(tmp_path / "c"), "--image-size", "8",
                 "--vae", "pixel", "--num-workers", "0", "--dtype", "float32"]) == 0
    ds = LatentCacheDataset(str(tmp_path / "c"))
    assert ds.latent_shape == (3, 8, 8)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)  # memory maps reopen in workers
    mean, std, labels = (torch.cat(t) for t in zip(*loader))
    crop = to_tensor(center_crop_arr(Image.open(tmp_path / "img" / FILES[4]).convert("RGB"), 8))
    assert torch.equal(mean[4, 0], crop) and torch.equal(mean[4, 1], crop.flip(-1))
    assert torch.equal(std, torch.zeros_like(std)) and labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2]


def test_resume_after_interruption(tmp_path, vae_dir, monkeypatch):
    data = make_images(tmp_path / "img")
    kw = dict(image_size=SIZE, vae=vae_dir, batch_size=2, shard_size=3, num_workers=0, progress=False,
              log=lambda s: None)
    extract_latents(data, str(tmp_path / "whole"), **kw)

    out = tmp_path / "cache"
    real_write, calls = extract_module.write_shard, []

    def write_then_die(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while encoding the third shard
        calls.append(args[1])
        real_write(*args)

    monkeypatch.setattr(extract_module, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        extract_latents(data, str(out), **kw)
    monkeypatch.undo()
    assert calls == [0, 1] and not is_latent_cache(str(out))
    (out / "shard-000002.npy.tmp999").write_bytes(b"half a file")  # a write cut short
    (out / "shard-000003.npy").write_bytes(b"data without its .json")  # a shard cut before its meta
    kept = {k: os.stat(out / f"shard-00000{k}.npy") for k in (0, 1)}
    summary = extract_latents(data, str(out), **kw)
    assert summary["encoded"] == 4  # shards 2 and 3 only
    for k, st in kept.items():
        assert os.stat(out / f"shard-00000{k}.npy").st_mtime_ns == st.st_mtime_ns  # finished shards kept
    for got, want in zip(cache_arrays(out), cache_arrays(tmp_path / "whole")):
        assert got == want if isinstance(got, list) else torch.equal(got, want)

    with pytest.raises(ValueError, match=r"shard-000000.json was made with other settings: image_size 16 \(now 32\)"):
        extract_latents(data, str(out), **{**kw, "image_size": 32})
    with pytest.raises(ValueError, match="shard_size 3 \\(now 4\\)"):
        extract_latents(data, str(out), **{**kw, "shard_size": 4})
    Image.new("RGB", (20, 20)).save(tmp_path / "img" / "cat" / "00.png")  # shifts every file by one
    with pytest.raises(ValueError, match="shard-000000.json was made from other files"):
        extract_latents(data, str(out), **kw)


@pytest.mark.parametrize("broken", ["truncated", "garbage"])
def test_broken_file_stops_before_its_shard(tmp_path, vae_dir, broken, capsys):
    data = make_images(tmp_path / "img", broken)
    out = tmp_path / "cache"
    args = ["extract-latents", "--data", data, "--out", str(out), "--image-size", str(SIZE), "--vae", vae_dir,
            "--shard-size", "3", "--batch-size", "4", "--num-workers", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # tqdm's bar precedes it on stderr
    assert err.startswith("ditlab extract-latents: error: cannot read image") and str(tmp_path / "img" / BROKEN) in err
    written = ["shard-000000.json", "shard-000000.npy", "shard-000001.json", "shard-000001.npy"]
    # BROKEN is file 6: shard 2 is not written, 0 and 1 are kept
    assert sorted(set(os.listdir(out)) - {".ditlab.lock"}) == written

    assert main(args + ["--skip-bad-files"]) == 0
    stdout = capsys.readouterr().out
    assert f"skipped 1 unreadable file(s):\n  {BROKEN}: cannot read image" in stdout
    ds = LatentCacheDataset(str(out))
    assert len(ds) == len(FILES) - 1 and [s["path"] for s in ds.index["skipped"]] == [BROKEN]
    assert [ds.source(i) for i in range(len(ds))] == [f for f in FILES if f != BROKEN]
    assert [s["count"] for s in ds.index["shards"]] == [3, 3, 2, 1]
    assert ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2]


def test_bad_flags_are_one_line_errors(tmp_path, vae_dir, capsys):
    data = make_images(tmp_path / "img")
    for flags, needle in ((["--image-size", "9", "--vae", vae_dir], "--image-size 9 is not a multiple of 2"),
                          (["--batch-size", "0"], "--batch-size 0 must be positive")):
        assert main(["extract-latents", "--data", data, "--out", str(tmp_path / "c"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ditlab extract-latents: error") and needle in err
    assert main(["extract-latents", "--data", str(tmp_path / "no"), "--out", str(tmp_path / "c")]) == 2
    assert "--data" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_under_torchrun_match_one_process(tmp_path):
    data = make_images(tmp_path / "img", "garbage")
    common = ["extract-latents", "--data", data, "--image-size", "8", "--vae", "pixel", "--shard-size", "3",
              "--num-workers", "0", "--skip-bad-files"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ditlab",
           *common, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("one", "two"))
    assert one == two
    for k in range(4):
        meta = json.loads((tmp_path / "two" / f"shard-00000{k}.json").read_text())
        assert meta == json.loads((tmp_path / "one" / f"shard-00000{k}.json").read_text())
        assert np.array_equal(np.load(tmp_path / "two" / f"shard-00000{k}.npy"),
                              np.load(tmp_path / "one" / f"shard-00000{k}.npy"))


def test_sample_latents_draws_flip_then_noise_from_the_generator():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(6, 2, 4, 3, 3, generator=g)
    std = torch.rand(6, 2, 4, 3, 3, generator=g)
    out = sample_latents(mean, std, torch.Generator().manual_seed(7))
    assert out.shape == (6, 4, 3, 3)
    ref = torch.Generator().manual_seed(7)
    flips = torch.randint(0, 2, (6,), generator=ref)
    eps = torch.randn(6, 4, 3, 3, generator=ref)
    for i in range(6):
        f = int(flips[i])
        torch.testing.assert_close(out[i], mean[i, f] + std[i, f] * eps[i], rtol=0, atol=0)
    assert torch.equal(out, sample_latents(mean, std, torch.Generator().manual_seed(7)))  # reproducible


def test_sample_latents_statistics():
    n = 4000
    mean = torch.stack([torch.zeros(n, 1, 2, 2), torch.full((n, 1, 2, 2), 10.0)], dim=1)  # (n, 2, 1, 2, 2)
    std = torch.stack([torch.full((n, 1, 2, 2), 0.5), torch.full((n, 1, 2, 2), 2.0)], dim=1)
    out = sample_latents(mean, std, torch.Generator().manual_seed(0))  # (n, 1, 2, 2)
    flipped = out.mean(dim=(1, 2, 3)) > 5
    assert abs(flipped.float().mean().item() - 0.5) < 0.03  # both sides, half the time each
    assert abs(out[~flipped].std().item() - 0.5) < 0.03 and abs(out[flipped].std().item() - 2.0) < 0.1
    assert abs(out[flipped].mean().item() - 10.0) < 0.1 and abs(out[~flipped].mean().item()) < 0.03
