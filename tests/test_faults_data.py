"""Fault injection on the data, evaluation and convert side: damaged and truncated latent shards,
high-bit-depth images, symlink loops, a full disk, invalid statistics, bad sizes, a closed pipe.
Each test is one row of the reliability table; tiny data, seconds each.

A full disk is real: the temporary file an atomic write builds is made a symlink to /dev/full, so
every write to it fails with ENOSPC inside the real writer (torch.save, np.save, zipfile)."""

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditlab.cli import main
from ditlab.data.images import load_rgb, scan_image_folder
from ditlab.data.latents import LatentCacheDataset
from ditlab.errors import UserError, UserWriteError
from ditlab.evaluation.batches import NpzImages, load_stats
from ditlab.runtime.files import NpzWriter, atomic_write, temp_path

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


def _images(root: Path, per_class: int = 3, classes: tuple[str, ...] = ("a", "b")) -> str:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return str(root)


def _extract(data: str, out: Path, capsys=None) -> int:
    return main(["extract-latents", "--data", data, "--out", str(out), "--image-size", "8", "--vae", "pixel",
                 "--shard-size", "2", "--num-workers", "0", "--no-progress", "--dtype", "float32"])


def _one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for name in names:
        assert name in err, (name, err)
    return err


@pytest.fixture
def cache(tmp_path, capsys):
    out = tmp_path / "cache"
    assert _extract(_images(tmp_path / "img"), out) == 0
    capsys.readouterr()
    return out


# ---- latent shards: checksums, truncation, repair --------------------------------------------------------------


def test_shard_checksum_is_the_files_own_and_made_while_writing(cache):
    index = json.loads((cache / "index.json").read_text())
    for shard in index["shards"]:
        data = (cache / (shard["name"] + ".npy")).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    labels = (cache / "labels.npy").read_bytes()
    assert index["labels_file"]["sha256"] == hashlib.sha256(labels).hexdigest()


def test_flipped_bytes_in_a_shard_are_named_on_open_and_reextracted(cache, capsys, tmp_path):
    shard = cache / "shard-000001.npy"
    good = shard.read_bytes()
    damaged = bytearray(good)
    damaged[-20:-16] = bytes(b ^ 0xFF for b in damaged[-20:-16])  # 4 bytes inside the tensor data
    shard.write_bytes(bytes(damaged))
    with pytest.raises(UserError, match="shard-000001.npy: damaged") as e:
        LatentCacheDataset(str(cache))
    assert "\n" not in str(e.value) and "extract-latents" in str(e.value)
    # training refuses it at the start, in one line naming the file
    assert main(["train", "--data", str(cache), "--results", str(tmp_path / "r"), "--image-size", "8",
                 "--model", "DiT-S/8", "--max-steps", "1", "--no-progress"]) == 2
    _one_line_error(capsys, "shard-000001.npy")
    # extract-latents again re-extracts that shard, and only that one
    others = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.npy") if p != shard}
    assert _extract(str(tmp_path / "img"), cache) == 0
    assert "shard-000001.npy: damaged" in capsys.readouterr().out
    assert shard.read_bytes() == good
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.npy") if p != shard} == others
    assert len(LatentCacheDataset(str(cache))) == 6


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_missing_shard_is_named_on_open_and_reextracted(cache, capsys, tmp_path, damage):
    shard = cache / "shard-000002.npy"
    good = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(good[: len(good) - 100])
    else:
        shard.unlink()
    with pytest.raises(UserError) as e:
        LatentCacheDataset(str(cache))
    assert "shard-000002.npy" in str(e.value) and "\n" not in str(e.value)
    assert ("truncated" if damage == "truncate" else "No such file") in str(e.value)
    assert _extract(str(tmp_path / "img"), cache) == 0
    assert shard.read_bytes() == good
    LatentCacheDataset(str(cache))


def test_out_of_range_label_in_a_cache_is_refused_on_open(cache, capsys, tmp_path):
    index = json.loads((cache / "index.json").read_text())
    index["classes"] = index["classes"][:1]  # labels 1 now name no class
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="label 1 .* out of range for the 1 classes"):
        LatentCacheDataset(str(cache))
    assert main(["train", "--data", str(cache), "--results", str(tmp_path / "r"), "--image-size", "8",
                 "--model", "DiT-S/8", "--max-steps", "1", "--no-progress"]) == 2
    _one_line_error(capsys, "labels.npy", "out of range")
    assert not (tmp_path / "r").exists()


def test_num_classes_below_the_datas_labels_is_refused_at_start(tmp_path, capsys):
    argv = ["train", "--data", "digits", "--results", str(tmp_path / "r"), "--image-size", "8", "--model",
            "DiT-S/8", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--max-steps", "3",
            "--global-batch-size", "4", "--num-workers", "0", "--no-progress", "--sample-every", "0"]
    assert main([*argv, "--num-classes", "5"]) == 2
    _one_line_error(capsys, "--num-classes 5", "10 classes")
    assert not (tmp_path / "r" / "checkpoints").exists()


# ---- images -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, value, dtype", [("I;16", 0.46 * 65535, np.uint16), ("F", 0.46, np.float32)])
def test_high_bit_depth_grey_keeps_its_grey(tmp_path, mode, value, dtype):
    path = tmp_path / ("g.png" if mode == "I;16" else "g.tif")
    Image.fromarray(np.full((8, 8), value, dtype=dtype)).save(path)
    assert Image.open(path).mode == mode
    rgb = np.asarray(load_rgb(str(path)))  # (8, 8, 3)
    assert rgb.shape == (8, 8, 3) and np.all(rgb == 117)  # round(0.46 * 255); Pillow's convert() gave 255


def test_symlink_loop_in_a_class_folder_is_an_error_naming_it(tmp_path):
    root = Path(_images(tmp_path / "img"))
    (root / "a" / "loop").symlink_to(root / "a")
    with pytest.raises(UserError, match=r"a/loop is a symlink loop") as e:
        scan_image_folder(str(root))
    assert "\n" not in str(e.value)
    (root / "a" / "loop").unlink()
    (root / "a" / "up").symlink_to(root)  # a parent loop: would relabel class b's images as a
    with pytest.raises(UserError, match=r"a/up is a symlink loop"):
        scan_image_folder(str(root))


def test_symlinked_files_are_read_once_and_never_relabelled(tmp_path):
    root = Path(_images(tmp_path / "img"))
    (root / "a" / "again.png").symlink_to(root / "a" / "0.png")
    classes, samples = scan_image_folder(str(root))
    assert [p for p, _ in samples].count("a/0.png") + [p for p, _ in samples].count("a/again.png") == 1
    assert len(samples) == 6
    (root / "b" / "stolen.png").symlink_to(root / "a" / "1.png")  # one file in two classes
    with pytest.raises(UserError, match="same file .* in two classes"):
        scan_image_folder(str(root))


# ---- convert --force ------------------------------------------------------------------------------------------


def _ditlab_ckpt(path: Path, make_dit) -> str:
    model = make_dit(in_channels=1)
    torch.save({"model_config": model.config, "ema": model.state_dict(), "vae": "pixel"}, path)
    return str(path)


def test_convert_force_replaces_only_what_ditlab_wrote(tmp_path, capsys, make_dit):
    src = _ditlab_ckpt(tmp_path / "run.pt", make_dit)
    results = tmp_path / "results"
    (results / "checkpoints").mkdir(parents=True)
    (results / "config.json").write_text("{}")
    (results / "metrics.jsonl").write_text("{}\n")
    for to in ("safetensors", "diffusers", "ditlab"):
        assert main(["convert", src, str(results), "--to", to, "--force"]) == 2
        _one_line_error(capsys, str(results), "not replaced")
        assert sorted(p.name for p in results.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl"]
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    assert main(["convert", src, str(notes), "--to", "safetensors", "--force"]) == 2
    _one_line_error(capsys, "notes.safetensors")
    assert notes.read_text() == "my notes"
    # what ditlab wrote in that format is replaced
    for to, dst in (("safetensors", tmp_path / "m.safetensors"), ("diffusers", tmp_path / "m-diffusers"),
                    ("ditlab", tmp_path / "m.pt")):
        if to == "diffusers":
            pytest.importorskip("diffusers")
        assert main(["convert", src, str(dst), "--to", to]) == 0
        assert main(["convert", src, str(dst), "--to", to, "--force"]) == 0
    assert main(["convert", src, str(tmp_path / "m.pt"), "--to", "safetensors", "--force"]) == 2  # not that format
    _one_line_error(capsys, "m.pt")


# ---- a full disk, an unwritable folder ----------------------------------------------------------------------------


def _full_disk_at(dst: Path) -> None:
    """The next atomic write of `dst` in this process writes into /dev/full (ENOSPC)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    temp_path(dst).symlink_to("/dev/full")


@needs_dev_full
def test_disk_full_in_the_atomic_writers_is_one_line_naming_the_file(tmp_path):
    dst = tmp_path / "x.pt"
    _full_disk_at(dst)
    with pytest.raises(UserWriteError, match=f"^no space left on device writing {dst}$"):
        atomic_write(dst, lambda f: torch.save({"w": torch.zeros(100_000)}, f))  # torch's own error is a RuntimeError
    assert not dst.exists() and not os.path.lexists(temp_path(dst))
    npz = tmp_path / "s.npz"
    _full_disk_at(npz)
    with pytest.raises(UserWriteError, match="no space left on device writing .*s.npz"):
        with NpzWriter(npz, (4, 64, 64, 3)) as w:
            for _ in range(4):
                w.write(np.zeros((1, 64, 64, 3), np.uint8))
            w.close(None)
    assert not npz.exists() and not os.path.lexists(temp_path(npz))


@needs_dev_full
def test_disk_full_in_convert_and_extract_latents_is_one_line(tmp_path, capsys, make_dit):
    src = _ditlab_ckpt(tmp_path / "run.pt", make_dit)
    dst = tmp_path / "out.safetensors"
    _full_disk_at(dst)
    assert main(["convert", src, str(dst), "--to", "ditlab"]) == 2
    _one_line_error(capsys, f"no space left on device writing {dst}")
    out = tmp_path / "cache"
    _full_disk_at(out / "shard-000000.npy")
    assert _extract(_images(tmp_path / "img"), out) == 2
    _one_line_error(capsys, "no space left on device writing", "shard-000000.npy")


@needs_dev_full
def test_disk_full_in_train_results_is_one_line(tmp_path, capsys):
    results = tmp_path / "r"
    _full_disk_at(results / "checkpoints" / "step-0000001.pt")
    argv = ["train", "--data", "digits", "--results", str(results), "--image-size", "8", "--model", "DiT-S/8",
            "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--max-steps", "1", "--global-batch-size",
            "4", "--num-workers", "0", "--no-progress", "--sample-every", "0"]
    assert main(argv) == 2
    _one_line_error(capsys, "no space left on device writing", "step-0000001.pt")


def test_unwritable_folder_is_one_line(tmp_path):
    """Root ignores file modes, so the refusal is injected: the writer raises EACCES as open() would."""
    def write(f):
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(UserWriteError, match=f"^permission denied writing {tmp_path / 'x.bin'}$"):
        atomic_write(tmp_path / "x.bin", write)
    with pytest.raises(UserWriteError, match="read-only file system writing"):
        atomic_write(tmp_path / "y.bin", lambda f: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only")))


# ---- evaluation ---------------------------------------------------------------------------------------------------


def _ref_with(tmp_path: Path, **override) -> str:
    from ditlab.evaluation.inception import POOL_DIM, SPATIAL_DIM

    rng = np.random.default_rng(0)
    arrays = {"arr_0": rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)}
    for mu_key, sigma_key, d in (("mu", "sigma", POOL_DIM), ("mu_s", "sigma_s", SPATIAL_DIM)):
        a = rng.standard_normal((d, 16))
        arrays[mu_key], arrays[sigma_key] = rng.standard_normal(d), a @ a.T / 16
    arrays.update(override)
    path = tmp_path / "ref.npz"
    np.savez(path, **arrays)
    return str(path)


def test_valid_statistics_load(tmp_path):
    assert set(load_stats(_ref_with(tmp_path))) == {"pool", "spatial"}


@pytest.mark.parametrize("case, message", [("nan_mu", "mu holds 1 non-finite"), ("not_psd", "sigma is not positive"),
                                           ("asymmetric", "sigma is not symmetric"), ("inf_sigma", "sigma_s holds")])
def test_eval_refuses_invalid_statistics_in_one_line(tmp_path, capsys, case, message):
    from ditlab.evaluation.inception import POOL_DIM, SPATIAL_DIM

    rng = np.random.default_rng(1)
    mu = rng.standard_normal(POOL_DIM)
    sigma = np.eye(POOL_DIM)
    override = {
        "nan_mu": {"mu": np.where(np.arange(POOL_DIM) == 3, np.nan, mu)},
        "not_psd": {"sigma": -2048 * np.eye(POOL_DIM) / POOL_DIM + sigma * 0.5},  # FID -2048 before
        "asymmetric": {"sigma": sigma + np.triu(np.ones((POOL_DIM, POOL_DIM)), 1)},
        "inf_sigma": {"sigma_s": np.where(np.eye(SPATIAL_DIM, dtype=bool), np.inf, 0.0)},
    }[case]
    ref = _ref_with(tmp_path, **override)
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    assert main(["eval", str(samples), ref, "--inception", str(tmp_path / "none.pth")]) == 2  # before Inception
    _one_line_error(capsys, "ref.npz", message)


def test_one_channel_batch_that_sample_writes_is_read_as_rgb(tmp_path, make_dit):
    ckpt = _ditlab_ckpt(tmp_path / "run.pt", make_dit)
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", ckpt, "--num-samples", "4", "--out", str(out), "--steps", "2",
                 "--device", "cpu", "--no-progress"]) == 0
    gray = np.load(out)["arr_0"]
    assert gray.shape[-1] == 1
    images = NpzImages(str(out))
    assert images.shape == (*gray.shape[1:3], 3)
    batches = np.concatenate(list(images.batches(3)))  # (4, H, W, 3)
    np.testing.assert_array_equal(batches, np.repeat(gray, 3, axis=3))


# ---- sizes, hints, pipes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, culprit", [
    (["--image-size", "-8"], "--image-size -8"), (["--image-size", "100000000"], "--image-size 100000000"),
    (["--in-channels", "0"], "--in-channels 0"), (["--in-channels", "99999999"], "--in-channels 99999999"),
    (["--latent-factor", "0"], "--latent-factor 0"), (["--latent-factor", "512"], "--latent-factor 512"),
])
def test_flops_bad_sizes_are_one_line(capsys, argv, culprit):
    assert main(["flops", *argv]) == 2
    _one_line_error(capsys, culprit)


@pytest.mark.parametrize("flag", ["--num-heads", "--patch-size", "--depth", "--hidden-size"])
def test_model_sizes_of_zero_are_one_line(tmp_path, capsys, flag):
    assert main(["train", "--data", "digits", "--results", str(tmp_path / "r"), "--image-size", "8",
                 "--max-steps", "1", "--no-progress", flag, "0"]) == 2
    _one_line_error(capsys, f"{flag} 0")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_no_hint_names_a_flag_that_does_not_exist(tmp_path, capsys, make_dit):
    model = make_dit(in_channels=1, hidden_size=32, num_heads=2)  # a width of no named config
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    assert main(["convert", str(path), str(tmp_path / "o.pt"), "--to", "ditlab"]) == 2
    msg = _one_line_error(capsys, "bare.pt")
    assert "explicitly" not in msg and "num_heads" not in msg and "--model" not in msg
    assert "number of heads" in msg and "--to ditlab" in msg


def test_closed_stdout_pipe_exits_quietly(tmp_path):
    read, write = os.pipe()
    os.close(read)  # `ditlab flops | head` after head has gone
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ditlab", "flops"], stdout=write, stderr=subprocess.PIPE,
                          env=env, text=True, timeout=120)
    os.close(write)
    assert proc.stderr == "" and proc.returncode == 141


def test_a_verified_cache_is_not_hashed_again_unless_a_shard_changes(cache, monkeypatch):
    import ditlab.data.latents as latents

    LatentCacheDataset(str(cache))  # hashes every shard, then records them as verified
    hashed = []
    real = latents.file_problem
    monkeypatch.setattr(latents, "file_problem", lambda path, record: hashed.append(path) or real(path, record))
    LatentCacheDataset(str(cache))
    assert [p for p in hashed if p.endswith(".npy") and "shard-" in p] == []
    shard = cache / "shard-000001.npy"
    data = bytearray(shard.read_bytes())
    data[-20:-16] = bytes(b ^ 0xFF for b in data[-20:-16])
    shard.write_bytes(bytes(data))  # a new mtime: hashed again, and refused
    with pytest.raises(UserError, match="shard-000001.npy: damaged"):
        LatentCacheDataset(str(cache))
