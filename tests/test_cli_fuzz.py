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
    (["convert", "run.pt", "run.pt", "--to", "ditlab"], "run.pt exists"),
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
]


@pytest.fixture
def workdir(tmp_path, monkeypatch, make_dit):
    """An empty working folder but for the inputs the cases name (a checkpoint, junk, batches)."""
    import torch
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    model = make_dit(in_channels=1)
    torch.save({"model_config": model.config, "ema": model.state_dict(), "vae": "pixel"}, "run.pt")
    Path("junk.pt").write_bytes(b"\x00not a checkpoint or an archive")
    for name in ("a", "b"):
        os.makedirs(f"img/{name}")
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f"img/{name}/0.png")
    np.savez("s.npz", arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    np.savez("ref.npz", arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    np.savez("nanref.npz", arr_0=np.zeros((5, 8, 8, 3), np.uint8), mu=np.full(2048, np.nan), sigma=np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
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
