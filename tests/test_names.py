"""Names: ImageNet class names and a checkpoint's own for --classes, --labels balanced, the
released checkpoint and reference batch by name through a mirror on 127.0.0.1, and the
protocol record that `ditlab sample` writes and `ditlab eval` prints."""

import hashlib
import json
import shutil
import time

import numpy as np
import pytest
import torch
from helpers import unpin
from hub_server import FileServer
from PIL import Image
from test_hub import CKPT, REF, npz_bytes, tiny_released_dit, torch_bytes

import ditlab
from ditlab import hub
from ditlab.cli import main
from ditlab.data.classes import class_id, imagenet_names
from ditlab.errors import UserError
from ditlab.runtime.precision import resolve_precision
from ditlab.sampling.generate import balanced_labels
from ditlab.sampling.record import read_record

FAST = ["--steps", "2", "--no-progress", "--device", "cpu", "--vae", "pixel"]


def test_imagenet_names_resolve_to_dits_labels():
    names = imagenet_names()
    assert len(names) == 1000 and names[207] == "golden retriever" and names[88] == "macaw"
    assert class_id("golden retriever", names) == 207 and class_id("Golden Retriever ", names) == 207
    assert class_id("lesser panda", names) == 387 and class_id("red panda", names) == 387  # a lemma
    assert class_id("lesser pan", names) == 387 and class_id("207", names) == 207  # a prefix; an id
    with pytest.raises(UserError) as e:
        class_id("panda", names)  # the lesser and the giant panda
    assert "387" in str(e.value) and "388" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError) as e:
        class_id("golden retreiver", names)
    assert "no such class" in str(e.value) and "'golden retriever' (207)" in str(e.value)
    with pytest.raises(UserError, match="--classes 1000: not a class id"):
        class_id("1000", names)


def test_balanced_labels_give_exactly_n_over_k_of_each_class_in_a_fixed_shuffle():
    labels = balanced_labels(0, 50000, list(range(1000)))
    assert labels.dtype == torch.long and labels.shape == (50000,)
    assert torch.bincount(labels, minlength=1000).tolist() == [50] * 1000
    assert torch.equal(labels, balanced_labels(0, 50000, list(range(1000))))  # fixed for (seed, N)
    assert not torch.equal(labels, balanced_labels(1, 50000, list(range(1000))))
    assert not torch.equal(labels[:1000], torch.arange(1000))  # shuffled, not class after class
    with pytest.raises(UserError, match="multiple of the 1000 classes; the nearest is 50000$"):
        balanced_labels(0, 50001, list(range(1000)))
    with pytest.raises(UserError, match="the nearest is 1000 or 2000$"):
        balanced_labels(0, 1500, list(range(1000)))
    assert sorted(balanced_labels(3, 6, [4, 9]).tolist()) == [4, 4, 4, 9, 9, 9]


def documented_sha256(sd: dict[str, torch.Tensor]) -> str:
    """docs/downloads.md's definition, written out: sorted keys; name, dtype and shape; bytes."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key]
        h.update(f"{key}\n{t.dtype} {tuple(t.shape)}\n".encode() + t.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DITLAB_HOME", str(home))
    monkeypatch.delenv("DITLAB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)  # no local file of the released name
    sd = tiny_released_dit()
    srv = FileServer({CKPT: torch_bytes(sd)})
    monkeypatch.setenv("DITLAB_MIRROR", srv.url)
    unpin(monkeypatch, CKPT, REF)  # tiny stand-ins served under the released names
    yield srv, home, sd
    srv.close()


def test_sample_by_released_name_and_class_names_with_its_record(mirror, tmp_path, capsys):
    server, home, sd = mirror
    out = tmp_path / "samples.npz"
    argv = ["sample", "--ckpt", CKPT, "--classes", "golden retriever", "88", "--out", str(out), "--seed", "3", *FAST]
    assert main(argv) == 0
    with np.load(out) as f:
        assert f["arr_1"].tolist() == [207, 88] and f["arr_0"].shape == (2, 4, 4, 3)
    record = read_record(out)
    assert record == json.loads(out.with_suffix(".json").read_text())  # the sidecar holds the same record
    assert record["checkpoint"] == CKPT and record["checkpoint_file"] == str((home / CKPT).resolve())
    assert record["weights_sha256"] == documented_sha256(sd) and record["weights"] == "ema"
    assert record["model_config"]["num_heads"] == 16  # the name implies DiT-XL/2's heads
    assert (record["label_mode"], record["classes"], record["seed"], record["steps"]) == ("classes", [207, 88], 3, 2)
    assert (record["sampler"], record["cfg_scale"], record["guidance_channels"]) == ("ddpm", 1.0, None)
    # auto resolves by this CPU's measured bf16 speed: the record names what it chose
    auto = {None: "fp32", torch.bfloat16: "bf16"}[resolve_precision("auto", torch.device("cpu"))]
    assert (record["precision"], record["autocast"], record["vae"], record["image_size"]) == ("auto", auto, "pixel", 4)
    assert (record["num_images"], record["batch_size"], record["world_size"]) == (2, 32, 1)
    assert (record["ditlab"], record["torch"]) == (ditlab.__version__, torch.__version__)
    assert main(argv) == 0 and server.requests[CKPT] == 1  # the second run reads the cache
    # the name says DiT-XL/2: a --model check still compares it with the weights
    capsys.readouterr()
    assert main([*argv, "--model", "DiT-XL/2"]) == 2
    assert "does not hold a DiT-XL/2" in capsys.readouterr().err


def test_balanced_grid_with_captions_and_the_record_in_the_png(mirror, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", CKPT, "--classes", "tench", "goldfish", "--num-samples", "4", "--labels",
                 "balanced", "--captions", "--out", str(out), *FAST]) == 0
    record = json.loads(Image.open(out).text["ditlab"])
    assert record["label_mode"] == "balanced" and record == json.loads(out.with_suffix(".json").read_text())
    assert Image.open(out).size == (2 + 4 * 6, 2 + 1 * (4 + 14 + 2))  # 4 images of 4x4 over a 14px caption strip
    capsys.readouterr()
    assert main(["sample", "--ckpt", CKPT, "--num-samples", "1001", "--labels", "balanced", "--out",
                 str(tmp_path / "s.npz"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--num-samples 1001" in err and "nearest is 1000" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.json").exists()


def test_a_model_trained_on_an_image_folder_takes_its_folder_names(tmp_path):
    data = tmp_path / "pets"
    for k, name in enumerate(("cat", "dog")):
        (data / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (40 * i, 200 * k, 90)).save(data / name / f"{i}.png")
    assert main(["train", "--data", str(data), "--results", str(tmp_path / "run"), "--image-size", "8",
                 "--vae", "pixel", "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
                 "--global-batch-size", "4", "--num-workers", "0", "--max-steps", "1", "--ckpt-every", "1",
                 "--sample-every", "0", "--device", "cpu", "--no-progress"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000001.pt"
    assert torch.load(ckpt, weights_only=True)["class_names"] == ["cat", "dog"]
    shutil.rmtree(data)  # the names come from the checkpoint, not from the data
    out = tmp_path / "pets.npz"
    assert main(["sample", "--ckpt", str(ckpt), "--classes", "dog", "cat", "dog", "--out", str(out), *FAST]) == 0
    with np.load(out) as f:
        assert f["arr_1"].tolist() == [1, 0, 1]


@pytest.mark.slow
def test_eval_by_name_fetches_the_reference_and_inception_once(mirror, tmp_path, monkeypatch, capsys):
    from ditlab.evaluation.inception import InceptionV3

    server, home, _ = mirror
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no torch-hub copy of the weights
    torch.manual_seed(0)
    weights = torch_bytes(InceptionV3().state_dict())  # random weights in the real layout
    server.files[hub.INCEPTION_NAME] = weights
    prefix = hashlib.sha256(weights).hexdigest()[:8]  # the pin is checked: here the served file's prefix
    entry = hub.RELEASED[hub.INCEPTION_NAME]
    monkeypatch.setitem(hub.RELEASED, hub.INCEPTION_NAME, hub.Released(entry.url, entry.kind, prefix))
    refs = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    server.files[REF] = npz_bytes(refs, tmp_path / "ref-src.npz")
    samples = tmp_path / "samples.npz"
    assert main(["sample", "--ckpt", CKPT, "--num-samples", "5", "--out", str(samples), *FAST]) == 0
    capsys.readouterr()
    argv = ["eval", str(samples), "imagenet256", "--batch-size", "6", "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["protocol"] == read_record(samples) and result["protocol"]["label_mode"] == "random"
    assert result["num_ref"] == 6 and result["ref"] == str(home / REF) and np.isfinite(result["fid"])
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2 and "4x4 images" in warnings[0] and "8x8" in warnings[0]
    assert "5 images, not the protocol's 50000" in warnings[1]
    # the next eval reads the cache (what `evaluate` asks the hub for, without its seconds of linear algebra)
    from ditlab.evaluation.evaluate import inception_weights, reference_path

    assert reference_path("imagenet256") == str(home / REF) and inception_weights(None).startswith(str(home))
    assert server.requests[REF] == server.requests[hub.INCEPTION_NAME] == 1
    # without the mirror and without network: one line, fast, naming the URL and the path
    monkeypatch.setenv("DITLAB_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("DITLAB_OFFLINE", "1")
    monkeypatch.delenv("DITLAB_MIRROR")
    capsys.readouterr()
    started = time.monotonic()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - started < 2.0 and len(err.strip().splitlines()) == 1
    assert hub.RELEASED[REF].url in err and str(tmp_path / "empty" / REF) in err
