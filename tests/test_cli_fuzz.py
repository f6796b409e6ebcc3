"""Every subcommand with a few dozen bad invocations, in-process through `ditlab.cli.main`, in an
empty working folder: each must exit 2 with one line on stderr that names the culprit (the flag,
file or value), and write nothing. Serve never gets as far as starting a server (its start is
replaced by a failure, so a case that slipped through would fail, not hang)."""

import os
from pathlib import Path

import numpy as np
import pytest

from ditlab.cli import main

GOOD_TRAIN = ["--data", "digits", "--results", "r", "--image-size", "8", "--max-steps", "1", "--no-progress"]
GOOD_EXTRACT = ["--data", "img", "--out", "cache", "--image-size", "8", "--vae", "pixel", "--num-workers", "0"]
GOOD_SAMPLE = ["--ckpt", "run.pt", "--out", "s.npz", "--num-samples", "2", "--steps", "2", "--no-progress"]

CASES = [
    # (argv, culprit named on the line)
    ([], "COMMAND"),
    (["nope"], "nope"),
    (["train"], "--data"),
    (["train", "--data", "digits"], "--results"),
    (["train", *GOOD_TRAIN, "--lr", "abc"], "--lr"),
    (["train", *GOOD_TRAIN, "--max-steps", "1.5"], "--max-steps"),
    (["train", *GOOD_TRAIN, "--block", "mlp"], "--block"),
    (["train", *GOOD_TRAIN, "--precision", "fp8"], "--precision"),
    (["train", *GOOD_TRAIN, "--global-batch-size", "0"], "--global-batch-size 0"),
    (["train", *GOOD_TRAIN, "--ema-decay", "2"], "--ema-decay 2"),
    (["train", *GOOD_TRAIN, "--class-dropout-prob", "1"], "--class-dropout-prob 1"),
    (["train", *GOOD_TRAIN, "--ckpt-every", "0"], "--ckpt-every"),
    (["train", *GOOD_TRAIN, "--log-every", "-1"], "--log-every"),
    (["train", *GOOD_TRAIN, "--model", "DiT-Q/2"], "DiT-Q/2"),
    (["train", *GOOD_TRAIN, "--num-heads", "0"], "--num-heads 0"),
    (["train", *GOOD_TRAIN, "--patch-size", "0"], "--patch-size 0"),
    (["train", *GOOD_TRAIN, "--depth", "-1"], "--depth -1"),
    (["train", *GOOD_TRAIN, "--num-classes", "-3"], "--num-classes -3"),
    (["train", *GOOD_TRAIN, "--num-classes", "4"], "--num-classes 4"),
    (["train", *GOOD_TRAIN, "--data", "no-such-folder"], "no-such-folder"),
    (["train", *GOOD_TRAIN, "--bogus-flag"], "--bogus-flag"),
    (["extract-latents"], "--data"),
    (["extract-latents", *GOOD_EXTRACT, "--batch-size", "0"], "--batch-size 0"),
    (["extract-latents", *GOOD_EXTRACT, "--shard-size", "-1"], "--shard-size -1"),
    (["extract-latents", *GOOD_EXTRACT, "--image-size", "0"], "--image-size 0"),
    (["extract-latents", *GOOD_EXTRACT, "--num-workers", "-2"], "--num-workers -2"),
    (["extract-latents", *GOOD_EXTRACT, "--dtype", "int8"], "--dtype"),
    (["extract-latents", *GOOD_EXTRACT, "--precision", "fp64"], "--precision"),
    (["extract-latents", *GOOD_EXTRACT[:-4], "--data", "missing", "--num-workers", "0"], "missing"),
    (["extract-latents", "--data", "missing", "--out", "cache"], "missing"),  # before the VAE (its hub) is asked
    (["sample"], "--ckpt"),
    (["sample", *GOOD_SAMPLE, "--out", "s.jpg"], "s.jpg"),
    (["sample", *GOOD_SAMPLE, "--steps", "x"], "--steps"),
    (["sample", *GOOD_SAMPLE, "--sampler", "euler-x"], "--sampler"),
    (["sample", *GOOD_SAMPLE, "--weights", "best"], "--weights"),
    (["sample", *GOOD_SAMPLE, "--ckpt", "nothing.pt"], "nothing.pt"),
    (["sample", *GOOD_SAMPLE, "--ckpt", "junk.pt"], "junk.pt"),
    (["eval"], "SAMPLES.npz"),
    (["eval", "missing.npz", "ref.npz"], "missing.npz"),
    (["eval", "junk.pt", "ref.npz"], "junk.pt"),
    (["eval", "s.npz", "nanref.npz"], "nanref.npz"),
    (["eval", "s.npz", "ref.npz", "--batch-size", "zero"], "--batch-size"),
    (["eval", "s.npz", "ref.npz", "--out", "no/dir/m.json"], "--out"),
    (["convert"], "src"),
    (["convert", "run.pt", "o.pt"], "--to"),
    (["convert", "run.pt", "o.pt", "--to", "onnx"], "--to"),
    (["convert", "nothing.pt", "o.pt", "--to", "ditlab"], "nothing.pt"),
    (["convert", "junk.pt", "o.pt", "--to", "ditlab"], "junk.pt"),
    (["convert", "run.pt", "img", "--to", "safetensors", "--force"], "img"),
    (["convert", "run.pt", "run.pt", "--to", "ditlab"], "run.pt is the source"),
    (["convert", "run.pt", "o.pt", "--to", "ditlab", "--weights", "best"], "--weights"),
    (["flops", "--image-size", "-1"], "--image-size -1"),
    (["flops", "--image-size", "1000000000"], "--image-size 1000000000"),
    (["flops", "--image-size", "250"], "--image-size 250"),
    (["flops", "--in-channels", "0"], "--in-channels 0"),
    (["flops", "--block", "mlp"], "--block"),
    (["flops", "--latent-factor", "x"], "--latent-factor"),
    (["study"], "ACTION"),
    (["study", "run"], "SPEC"),
    (["study", "run", "missing.toml", "--out", "st"], "missing.toml"),
    (["study", "run", "junk.pt", "--out", "st"], "junk.pt"),
    (["study", "report", "missing-folder"], "missing-folder"),
    (["serve"], "--ckpt"),
    (["serve", "--ckpt", "run.pt", "--port", "99999"], "--port 99999"),
    (["serve", "--ckpt", "run.pt", "--port", "http"], "--port"),
    (["serve", "--ckpt", "run.pt", "--max-steps", "0"], "--max-steps 0"),
    (["serve", "--ckpt", "run.pt", "--batch-window-ms", "-5"], "--batch-window-ms -5"),
    (["serve", "--ckpt", "run.pt", "--default-sampler", "nope"], "--default-sampler nope"),
    (["serve", "--ckpt", "nothing.pt"], "nothing.pt"),
    # round 2 (issue 28): every float flag refuses non-finite and absurd values; every value is
    # checked before anything is written; training checkpoints and the source are never a destination
    (["train", *GOOD_TRAIN, "--num-workers", "-1"], "--num-workers -1"),
    (["train", *GOOD_TRAIN, "--results", ""], "--results ''"),
    (["train", *GOOD_TRAIN, "--seed", "-5"], "--seed -5"),
    (["train", *GOOD_TRAIN, "--keep-last", "-1"], "--keep-last -1"),
    (["train", *GOOD_TRAIN, "--sample-every", "1", "--sample-steps", "0"], "--sample-steps 0"),
    (["train", *GOOD_TRAIN, "--dist-timeout", "1e30"], "--dist-timeout 1e+30"),
    (["train", *GOOD_TRAIN, "--ema-decay", "nan"], "--ema-decay nan"),
    (["train", *GOOD_TRAIN, "--class-dropout-prob", "inf"], "--class-dropout-prob inf"),
    (["train", *GOOD_TRAIN, "--lr-min", "nan"], "--lr-min nan"),
    (["train", *GOOD_TRAIN, "--wandb", "proj"], "--wandb proj"),
    (["sample", *GOOD_SAMPLE, "--cfg-scale", "nan"], "--cfg-scale nan"),
    (["sample", *GOOD_SAMPLE, "--cfg-scale", "inf"], "--cfg-scale inf"),
    (["sample", *GOOD_SAMPLE, "--cfg-scale", "1e30"], "--cfg-scale 1e+30"),
    (["sample", *GOOD_SAMPLE, "--cfg-scale", "-1"], "--cfg-scale -1"),
    (["sample", *GOOD_SAMPLE, "--guidance-channels", "0"], "--guidance-channels 0"),
    (["sample", *GOOD_SAMPLE, "--out", "folder.npz"], "folder.npz"),
    (["eval", "s.npz", "ref.npz", "--out", "img"], "--out img"),
    (["eval", "s.npz", "crcref.npz"], "crcref.npz: damaged"),
    (["convert", "run.pt", "./run.pt", "--to", "ditlab", "--force"], "is the source"),
    (["convert", "run.pt", "link.pt", "--to", "ditlab", "--force"], "is the source"),
    (["convert", "run.pt", "train.pt", "--to", "ditlab", "--force"], "training checkpoint"),
    (["convert", "run.pt", "r/checkpoints/step-0000060.pt", "--to", "ditlab"], "training checkpoint"),
    (["demo", "--max-steps", "0"], "--max-steps 0"),
    (["study", "list", "img"], "img"),
    (["study", "list", "env.toml"], "${}"),
    (["study", "list", "typed.toml"], "--global-batch-size '16'"),
    (["study", "list", "balanced.toml"], "num_samples 45"),
    (["serve", "--ckpt", "run.pt", "--max-cfg-scale", "nan"], "--max-cfg-scale nan"),
    (["serve", "--ckpt", "run.pt", "--default-cfg-scale", "inf"], "--default-cfg-scale inf"),
    (["serve", "--ckpt", "run.pt", "--batch-window-ms", "1e30"], "--batch-window-ms 1e+30"),
]

SPEC = """
[data]
data = "digits"
[train]
eval_steps = [2]
global_batch_size = {batch}
[[grid]]
sizes = ["S"]
patch_sizes = [2]
[eval]
metric = "digits"
num_samples = {n}
labels = "balanced"
steps = 2
"""


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """The inputs the cases name (a checkpoint, junk, batches, specs), made once; each case's folder links them."""
    import torch
    from conftest import TINY_DIT
    from helpers import randomize
    from PIL import Image

    import ditlab

    folder = tmp_path_factory.mktemp("fuzz-inputs")
    model = randomize(ditlab.DiT(**{**TINY_DIT, "in_channels": 1}).eval(), 0, std=0.05)
    torch.save({"model_config": model.config, "ema": model.state_dict(), "vae": "pixel"}, folder / "run.pt")
    torch.save({"model_config": model.config, "ema": model.state_dict(), "model": model.state_dict(), "opt": {},
                "step": 60}, folder / "train.pt")  # what `ditlab train` writes (and resumes from)
    (folder / "junk.pt").write_bytes(b"\x00not a checkpoint or an archive")
    for name in ("a", "b"):
        os.makedirs(folder / "img" / name)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "img" / name / "0.png")
    images = np.zeros((5, 8, 8, 3), np.uint8)
    np.savez(folder / "s.npz", arr_0=images)
    np.savez(folder / "ref.npz", arr_0=images)
    np.savez(folder / "nanref.npz", arr_0=images, mu=np.full(2048, np.nan), sigma=np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    np.savez(folder / "crcref.npz", arr_0=images, mu=np.full(2048, 0.5), sigma=np.eye(1), mu_s=np.zeros(1),
             sigma_s=np.eye(1))
    data = bytearray((folder / "crcref.npz").read_bytes())
    data[data.index(np.full(8, 0.5).tobytes()) + 3] ^= 1  # one flipped bit in mu: the archive's CRC-32 fails
    (folder / "crcref.npz").write_bytes(bytes(data))
    (folder / "env.toml").write_text(SPEC.format(batch=16, n=20).replace('"digits"\n[train]', '"${}"\n[train]', 1))
    (folder / "typed.toml").write_text(SPEC.format(batch='"16"', n=20))
    (folder / "balanced.toml").write_text(SPEC.format(batch=16, n=45))
    return folder


@pytest.fixture
def workdir(inputs, tmp_path, monkeypatch):
    """An empty working folder but for the inputs the cases name (hard links: a case that replaced one
    would replace its link, never the shared file)."""
    monkeypatch.chdir(tmp_path)
    for src in sorted(inputs.rglob("*")):
        dst = tmp_path / src.relative_to(inputs)
        if src.is_dir():
            dst.mkdir()
        else:
            os.link(src, dst)
    os.makedirs("folder.npz")
    os.symlink("run.pt", "link.pt")
    for var in ("WANDB_API_KEY", "WANDB_MODE"):  # no W&B account here
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    import ditlab.serve.app

    def no_server(*args, **kwargs):
        raise AssertionError("serve got past its argument checks")

    monkeypatch.setattr(ditlab.serve.app, "create_app", no_server, raising=False)
    return tmp_path


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


@pytest.mark.parametrize("argv, culprit", CASES, ids=[" ".join(a)[:60] or "empty" for a, _ in CASES])
def test_bad_invocation_is_exit_2_one_line_nothing_written(workdir, capsys, argv, culprit):
    before = _tree(workdir)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, (code, out.err[-2000:])
    assert len(lines) == 1, out.err
    assert culprit in lines[0], (culprit, lines[0])
    assert _tree(workdir) == before
