"""`ditlab sample`: per-image determinism, torchrun, the authors' format through a local VAE,
ditlab checkpoints to grids and .npz, ADM's format, failures that leave nothing behind."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ditlab
from ditlab.cli import main
from ditlab.runtime.files import NpzWriter
from ditlab.runtime.seeds import IMAGE_LABELS
from ditlab.sampling.generate import image_seed

REPO = Path(__file__).resolve().parents[1]
FAST = ["--steps", "4", "--cfg-scale", "1.5", "--no-progress", "--device", "cpu"]


def save_ditlab(path, ema, raw=None, data="digits"):
    """A checkpoint laid out as `ditlab train` writes it."""
    torch.save({"model": (raw or ema).state_dict(), "ema": ema.state_dict(), "opt": {}, "step": 7,
                "config": {"data": data, "vae": "stabilityai/sd-vae-ft-ema"}, "model_config": ema.config}, path)
    return str(path)


def load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def no_leftovers(folder):
    return not [p.name for p in Path(folder).rglob(".*")]


@pytest.mark.parametrize("cfg_scale", ["1.0", "1.5"])
def test_bulk_images_do_not_depend_on_batch_size(tmp_path, make_dit, cfg_scale):
    model = make_dit(in_channels=3)
    ckpt = save_ditlab(tmp_path / "run.pt", model)
    runs = {}
    for name, n, batch, seed in [("b1", 9, 1, 5), ("b7", 9, 7, 5), ("prefix", 4, 3, 5), ("other", 4, 4, 6)]:
        out = tmp_path / f"{name}.npz"
        assert main(["sample", "--ckpt", ckpt, "--num-samples", str(n), "--batch-size", str(batch), "--seed",
                     str(seed), "--out", str(out), *FAST, "--cfg-scale", cfg_scale]) == 0
        runs[name] = load(out)
    b1, b7 = runs["b1"], runs["b7"]
    assert sorted(b1) == ["arr_0", "arr_1", "protocol"]  # ADM's two arrays and the record of the settings
    assert b1["arr_0"].shape == (9, 8, 8, 3) and b1["arr_0"].dtype == np.uint8
    # labels are ditlab's own draws: bitwise. Pixels go through the network, whose rows may round
    # differently in other batch sizes on some BLAS builds: within one level of 255 everywhere.
    assert np.array_equal(b1["arr_1"], b7["arr_1"]) and np.array_equal(runs["prefix"]["arr_1"], b1["arr_1"][:4])
    assert levels_apart(b1["arr_0"], b7["arr_0"]) <= 1 and levels_apart(runs["prefix"]["arr_0"], b1["arr_0"][:4]) <= 1
    assert levels_apart(runs["other"]["arr_0"], b1["arr_0"][:4]) > 16  # another seed: other images
    assert len({im.tobytes() for im in b1["arr_0"]}) == 9  # every image its own noise
    # random labels: uniform over the 10 classes, from the stream keyed by (seed, index)
    expected = [np.random.default_rng([IMAGE_LABELS, 5, i]).integers(10) for i in range(9)]
    assert b1["arr_1"].tolist() == expected and b1["arr_1"].dtype == np.int64


def levels_apart(a, b):
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_image_noise_and_labels_are_bitwise_functions_of_seed_and_index():
    """What per-image seeding guarantees exactly, on any machine: image i's initial noise and random
    label depend on (seed, i) alone, whatever the batch size or the number of ranks."""
    from ditlab.sampling.generate import image_generators, initial_noise, random_labels
    from ditlab.sampling.run import rank_indices

    n, shape = 11, (4, 8, 8)
    alone = torch.cat([initial_noise(shape, image_generators(3, [i], "cpu"), "cpu") for i in range(n)])
    labels = torch.cat([random_labels(3, [i], 1000) for i in range(n)])
    assert len({row.sum().item() for row in alone}) == n and len(set(labels.tolist())) > 5
    for world in (1, 2, 3):
        for batch in (1, 4, 7):
            parts = [rank_indices(n, batch, r, world, k) for k in range(-(-n // (world * batch))) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))
            for p in filter(len, parts):
                assert torch.equal(initial_noise(shape, image_generators(3, p, "cpu"), "cpu"), alone[p.start:p.stop])
                assert torch.equal(random_labels(3, p, 1000), labels[p.start:p.stop])
    assert not torch.equal(initial_noise(shape, image_generators(4, [0], "cpu"), "cpu"), alone[:1])


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_step_noise_of_each_image_is_bitwise_independent_of_the_batch(monkeypatch, make_dit, sampler, eta):
    """The noise every ancestral (or eta > 0 DDIM) step adds to image i, recorded inside real sampling
    runs, is the same bits in a batch of 7 as alone: it comes from image i's own generator."""
    from ditlab.diffusion import samplers
    from ditlab.sampling.generate import generate

    recorded = []
    step = {"ddpm": samplers.ddpm_step, "ddim": samplers.ddim_step}[sampler]

    def record(*args):
        noise = args[-1]
        recorded.append(None if noise is None else noise.clone())
        return step(*args)

    monkeypatch.setattr(samplers, f"{sampler}_step", record)
    model, diffusion, labels = make_dit(), ditlab.Diffusion(), torch.tensor([3, 1, 4, 1, 5, 9, 2])
    kw = dict(latent_shape=(4, 8, 8), steps=5, sampler=sampler, eta=eta, cfg_scale=1.5)
    generate(model, diffusion, labels, 11, range(7), **kw)
    together, recorded[:] = list(recorded), []
    for i in range(7):
        generate(model, diffusion, labels[i:i + 1], 11, [i], **kw)
    alone = [recorded[s::5] for s in range(5)]  # step s of images 0..6
    assert together[-1] is None and len(together) == 5  # no noise at the last step
    for s in range(4):
        assert torch.equal(together[s], torch.cat(alone[s])), s


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_generated_latents_agree_in_batches_of_1_and_7(make_dit, cfg_scale):
    """The float latents through the network: equal to floating-point rounding relative to their
    scale (the network's rows may round differently in other batch sizes on some BLAS builds)."""
    from helpers import NearlyExact

    from ditlab.sampling.generate import generate

    model, diffusion, labels = NearlyExact(make_dit()), ditlab.Diffusion(), torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    kw = dict(latent_shape=(4, 8, 8), steps=4, cfg_scale=cfg_scale)
    ones = torch.cat([generate(model, diffusion, labels[i:i + 1], 11, [i], **kw) for i in range(8)])
    sevens = torch.cat([generate(model, diffusion, labels[:7], 11, range(7), **kw),
                        generate(model, diffusion, labels[7:], 11, [7], **kw)])
    scale = ones.abs().max().item()
    assert 0.5 < scale < 10 and ones.std() > 0.1  # O(1) samples, so that the tolerance means something
    assert (ones - sevens).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_generated_latents_are_bitwise_equal_where_the_kernels_are_batch_invariant(make_dit, batch_invariant_cpu,
                                                                                   cfg_scale):
    """Bitwise, but only once this machine's kernels are shown to give each row of the network the
    same bits in every batch size the run uses (true of MKL's strict mode on the Intel CPUs we
    measured; not of an AMD EPYC Zen 4 machine, where this test skips)."""
    from helpers import skip_unless_rows_batch_invariant

    from ditlab.sampling.generate import generate

    model, diffusion, labels = make_dit(), ditlab.Diffusion(), torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    skip_unless_rows_batch_invariant(model, (4, 8, 8), sizes=(1, 2, 7, 14), num_classes=10)
    kw = dict(latent_shape=(4, 8, 8), steps=4, cfg_scale=cfg_scale)
    ones = torch.cat([generate(model, diffusion, labels[i:i + 1], 11, [i], **kw) for i in range(8)])
    sevens = torch.cat([generate(model, diffusion, labels[:7], 11, range(7), **kw),
                        generate(model, diffusion, labels[7:], 11, [7], **kw)])
    assert torch.equal(ones, sevens) and ones.std() > 0.1


@pytest.mark.slow
def test_torchrun_two_processes_write_what_one_writes(tmp_path, make_dit):
    ckpt = save_ditlab(tmp_path / "run.pt", make_dit(in_channels=3))
    common = ["sample", "--ckpt", ckpt, "--num-samples", "5", "--batch-size", "2", "--seed", "3", *FAST]
    assert main([*common, "--out", str(tmp_path / "one.npz")]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ditlab",
           *common, "--out", str(tmp_path / "two.npz"), "--png-dir", str(tmp_path / "pngs")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = load(tmp_path / "one.npz"), load(tmp_path / "two.npz")
    # labels bitwise; pixels within a level (this process and the ranks may run other thread counts)
    assert np.array_equal(one["arr_1"], two["arr_1"]) and levels_apart(one["arr_0"], two["arr_0"]) <= 1
    pngs = sorted(os.listdir(tmp_path / "pngs"))
    assert pngs == [f"{i:06d}.png" for i in range(5)]  # rank 0 wrote 0, 1, 4; rank 1 wrote 2, 3
    for i, name in enumerate(pngs):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "pngs" / name)), two["arr_0"][i])
    assert proc.stdout.count("5 images 8x8x3") == 1 and no_leftovers(tmp_path)


@pytest.mark.slow
def test_a_failing_rank_leaves_no_npz_and_no_temporary_file(tmp_path, make_dit):
    ckpt = save_ditlab(tmp_path / "run.pt", make_dit(in_channels=3))
    (tmp_path / "pngs" / "000002.png").mkdir(parents=True)  # rank 1 cannot write image 2; rank 0 can write its own
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ditlab",
           "sample", "--ckpt", ckpt, "--num-samples", "6", "--batch-size", "2", *FAST, "--out",
           str(tmp_path / "samples.npz"), "--png-dir", str(tmp_path / "pngs")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "ditlab sample: error: --png-dir" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["pngs", "run.pt"] and no_leftovers(tmp_path)


@pytest.mark.slow
def test_sigterm_under_torchrun_removes_the_temporary_file(tmp_path, make_dit):
    """torchrun's agent SIGTERMs the other ranks when one fails: they leave no temporary .npz."""
    import signal
    import time

    ckpt = save_ditlab(tmp_path / "run.pt", make_dit(in_channels=3))
    # A one-rank process group whose store takes any free port (port 0: no port picked and released
    # beforehand); a run of a million images, which cannot end before the signal however fast the CPU.
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    cmd = [sys.executable, "-m", "ditlab", "sample", "--ckpt", ckpt, "--classes", "3", "--num-samples", "1000000",
           "--batch-size", "1", "--steps", "50", "--no-progress", "--device", "cpu",
           "--out", str(tmp_path / "samples.npz")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".samples.npz.tmp-*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob(".samples.npz.tmp-*")), proc.stderr.read() if proc.poll() is not None else "timeout"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert sorted(os.listdir(tmp_path)) == ["run.pt"]


def test_authors_pt_samples_through_a_local_vae(tmp_path, vae_dir, make_dit):
    diffusers = pytest.importorskip("diffusers")
    model = make_dit()
    pt = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), pt)  # the authors' release format: a bare state dict
    grid = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(pt), "--vae", vae_dir, "--classes", "3", "1", "4", "--out", str(grid),
                 "--image-size", "16", *FAST]) == 0
    assert np.asarray(Image.open(grid)).shape == (2 + 16 + 2, 3 * (16 + 2) + 2, 3)  # 3 images 16x16, padding 2

    npz = tmp_path / "samples.npz"
    assert main(["sample", "--ckpt", str(pt), "--vae", vae_dir, "--num-samples", "5", "--seed", "3", "--out",
                 str(npz), "--png-dir", str(tmp_path / "pngs"), *FAST]) == 0
    arrays = load(npz)
    images, labels = arrays["arr_0"], arrays["arr_1"]
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [np.random.default_rng([IMAGE_LABELS, 3, i]).integers(10) for i in range(5)]
    # image 2 computed independently, alone (the run sampled it in a batch of 5): its own generator,
    # diffusers' VAE, ADM's quantisation; within a level of 255 (the network's rows may round
    # differently in another batch size on some BLAS builds)
    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    g = torch.Generator().manual_seed(image_seed(3, 2))
    noise = torch.randn(1, 4, 8, 8, generator=g)
    z = ditlab.Diffusion().sample(model, noise, y=torch.tensor(labels[2:3]), steps=4, cfg_scale=1.5, generator=[g])
    with torch.no_grad():
        x = vae.decode(z / 0.18215).sample[0].permute(1, 2, 0).numpy()  # (16, 16, 3)
    expected = np.clip(127.5 * x + 128, 0, 255).astype(np.uint8)
    assert 0 < expected.std() and levels_apart(images[2], expected) <= 1
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pngs" / "000002.png")), images[2])


def test_ditlab_checkpoint_to_grid_and_npz(tmp_path, make_dit):
    ema, raw = make_dit(0, in_channels=1), make_dit(1, in_channels=1)
    ckpt = save_ditlab(tmp_path / "step-0000007.pt", ema, raw)  # trained on digits: pixel space, no VAE
    classes = ["0", "1", "2", "3", "9"]
    assert main(["sample", "--ckpt", ckpt, "--classes", *classes, "--nrow", "3", "--out", str(tmp_path / "g.png"),
                 *FAST]) == 0
    assert main(["sample", "--ckpt", ckpt, "--classes", *classes, "--num-samples", "7", "--out",
                 str(tmp_path / "b.npz"), *FAST]) == 0
    assert main(["sample", "--ckpt", ckpt, "--classes", *classes, "--out", str(tmp_path / "raw.npz"),
                 "--weights", "model", *FAST]) == 0
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    bulk, raw_out = load(tmp_path / "b.npz"), load(tmp_path / "raw.npz")
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2)  # 2 rows of 3 cells of 8 pixels + 2 padding; grayscale
    assert bulk["arr_0"].shape == (7, 8, 8, 1) and bulk["arr_1"].tolist() == [0, 1, 2, 3, 9, 0, 1]
    for i in range(5):  # grid cell i is image i of a bulk run over the same classes
        r, q = divmod(i, 3)
        assert np.array_equal(grid[2 + 10 * r:10 + 10 * r, 2 + 10 * q:10 + 10 * q], bulk["arr_0"][i, :, :, 0])
    assert not np.array_equal(raw_out["arr_0"], bulk["arr_0"][:5])  # --weights model: the raw weights


def test_failed_run_leaves_nothing_and_keeps_the_old_file(tmp_path, make_dit, monkeypatch):
    from ditlab.sampling import generate as generation

    ckpt = save_ditlab(tmp_path / "run.pt", make_dit(in_channels=3))
    out = tmp_path / "samples.npz"
    out.write_bytes(b"an earlier result")
    real, calls = generation.generate, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["sample", "--ckpt", ckpt, "--num-samples", "4", "--batch-size", "2", "--out", str(out), *FAST])
    assert out.read_bytes() == b"an earlier result" and sorted(os.listdir(tmp_path)) == ["run.pt", "samples.npz"]


def test_npz_writer_writes_what_savez_writes(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 4, 5, 3), dtype=np.uint8), rng.integers(0, 1000, 7)
    np.savez(tmp_path / "ref.npz", images, labels)
    with NpzWriter(tmp_path / "ours.npz", images.shape) as w:
        w.write(images[:3])
        w.write(images[3:])
        w.close(labels)
    ours, ref = load(tmp_path / "ours.npz"), load(tmp_path / "ref.npz")
    assert sorted(ours) == sorted(ref) == ["arr_0", "arr_1"]
    assert all(np.array_equal(ours[k], ref[k]) and ours[k].dtype == ref[k].dtype for k in ours)
    from ditlab.evaluation.batches import NpzImages  # what `ditlab eval` reads streams back in order

    batches = NpzImages(str(tmp_path / "ours.npz"))
    assert batches.num_images == 7 and np.array_equal(np.concatenate(list(batches.batches(3))), images)
    with NpzWriter(tmp_path / "uncond.npz", (2, 4, 5, 3)) as w:
        w.write(images[:2])
        w.close(None)
    assert zipfile.ZipFile(tmp_path / "uncond.npz").namelist() == ["arr_0.npy"]
    with pytest.raises(ValueError, match="3 of 7 images"), NpzWriter(tmp_path / "short.npz", images.shape) as w:
        w.write(images[:3])
        w.close(labels)
    with pytest.raises(ValueError, match="uint8"), NpzWriter(tmp_path / "bad.npz", images.shape) as w:
        w.write(images.astype(np.float32))
    assert sorted(os.listdir(tmp_path)) == ["ours.npz", "ref.npz", "uncond.npz"]


def test_bad_requests_are_one_line_errors(tmp_path, make_dit, capsys):
    pt = tmp_path / "tiny.pt"
    torch.save(make_dit().state_dict(), pt)
    base = ["sample", "--ckpt", str(pt), "--vae", "pixel", "--no-progress"]
    cases = [
        ([*base, "--classes", "1", "--out", str(tmp_path / "x.jpg")], "--out"),
        ([*base, "--out", str(tmp_path / "x.npz")], "--classes"),
        ([*base, "--classes", "10", "--out", str(tmp_path / "x.png")], "--classes 10"),
        ([*base, "--classes", "1", "--image-size", "256", "--out", str(tmp_path / "x.png")], "--image-size 256"),
        ([*base, "--classes", "1", "--model", "DiT-B/2", "--out", str(tmp_path / "x.png")], "DiT-B/2"),
        ([*base, "--num-samples", "2000", "--out", str(tmp_path / "x.png")], "2000"),
        ([*base, "--classes", "1", "--weights", "model", "--out", str(tmp_path / "x.png")], "one set of weights"),
        (["sample", "--ckpt", str(tmp_path / "missing.pt"), "--classes", "1", "--out", str(tmp_path / "x.png")],
         "missing.pt"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ditlab sample: error") and needle in err, err
    assert sorted(os.listdir(tmp_path)) == ["tiny.pt"]


def test_bf16_autocast_samples_close_to_fp32(tmp_path, make_dit):
    """--precision bf16 runs the DiT forward under autocast (bf16 matmuls; the maths stay float32)."""
    ckpt = save_ditlab(tmp_path / "run.pt", make_dit(in_channels=3))
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.npz"
        assert main(["sample", "--ckpt", ckpt, "--num-samples", "3", "--precision", precision, "--out", str(out),
                     *FAST]) == 0
        runs[precision] = load(out)["arr_0"].astype(int)
    diff = np.abs(runs["fp32"] - runs["bf16"])
    assert 0 < diff.max() and diff.mean() < 3  # bf16 really ran, and stays near the fp32 images
