"""Fault injection for training, resume and processes: one test per fault (non-finite runs, two
owners of a folder, signals, killed writes, damaged checkpoints and logs, bad values, missing
devices, data defaults, distributed faults). Tiny configs on the bundled digits, on CPU."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import wait_for as poll

from ditlab.checkpoints.state import list_checkpoints, load_checkpoint, save_checkpoint
from ditlab.cli import main
from ditlab.runtime.lock import FolderInUseError, acquire, release
from ditlab.training import TrainConfig, train
from ditlab.training.guard import TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
TINY = dict(model="DiT-S/2", depth=2, hidden_size=32, num_heads=2, global_batch_size=16, num_workers=0,
            sample_every=0, log_every=2, progress=False, ema_decay=0.9, lr=1e-3)
FLAGS = ["--data", "digits", "--model", "DiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
         "--global-batch-size", "16", "--num-workers", "0", "--sample-every", "0", "--log-every", "2",
         "--no-progress", "--device", "cpu"]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def cfg(results, **kw):
    return TrainConfig(data="digits", results=str(results), **{**TINY, **kw})


def temps(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if ".tmp-" in p.name]


def strict_rows(path: Path) -> list[dict]:
    def refuse(name):
        raise AssertionError(f"{path} is not strict JSON: {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def cli_error(capsys, *args) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ---- non-finite training -------------------------------------------------------------------------


def test_a_diverging_run_skips_its_bad_steps_stops_and_keeps_its_finite_checkpoints(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"up to step \d+ .*last good checkpoint: .*step-0000003.pt"):
        train(cfg(tmp_path, lr=1e6, max_steps=40, ckpt_every=3, keep_last=2, max_bad_steps=3), device="cpu")
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in kept] == [3]  # written before the divergence; nothing written from it
    for part in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in load_checkpoint(kept[-1][1])[part].values())
    rows = strict_rows(tmp_path / "metrics.jsonl")  # NaN never reaches the log
    assert sum(r.get("skipped", 0) for r in rows) >= 3


def test_a_non_finite_step_leaves_weights_ema_and_optimizer_untouched():
    from ditlab.diffusion import Diffusion
    from ditlab.models import create_model
    from ditlab.training.ema import make_ema
    from ditlab.training.parallel import make_optimizer
    from ditlab.training.step import TrainStep

    torch.manual_seed(0)
    model = create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32, num_heads=2)
    ema, opt = make_ema(model), make_optimizer(model, 1e-3, torch.device("cpu"))
    step = TrainStep(model, ema, opt, Diffusion(), None, torch.device("cpu"), 0.9)
    g = torch.Generator().manual_seed(0)
    x0, t, y, noise = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([1, 50, 300, 999]), torch.arange(4), \
        torch.randn(4, 1, 8, 8, generator=g)
    assert not step(x0, t, y, noise)[2]  # one good step gives the optimizer a state
    before = [p.clone() for p in [*model.parameters(), *ema.parameters()]]
    trained = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    state = [v.clone() for s in opt.state.values() for v in s.values()]
    x0[0, 0, 0, 0] = float("nan")  # one NaN in the data
    terms, norm, bad = step(x0, t, y, noise)
    assert bad and not torch.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, [*model.parameters(), *ema.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(state, [v for s in opt.state.values() for v in s.values()]))
    x0[0, 0, 0, 0] = 0.0
    assert not step(x0, t, y, noise)[2]
    after = [p for p in model.parameters() if p.requires_grad]
    assert not all(torch.equal(a, b) for a, b in zip(trained, after))  # a good step updates again


@pytest.mark.parametrize("flags, culprit", [
    (["--lr", "inf"], "--lr inf"), (["--lr", "nan"], "--lr nan"), (["--lr", "0"], "--lr 0"),
    (["--lr=-1e-4"], "--lr -0.0001"), (["--grad-clip", "-1"], "--grad-clip -1"),
    (["--grad-clip", "0"], "--grad-clip 0"), (["--max-steps", "0"], "--max-steps 0"),
    (["--max-steps", "-5"], "--max-steps -5"), (["--epochs", "0"], "--epochs 0"),
    (["--max-bad-steps", "0"], "--max-bad-steps 0"), (["--dist-timeout", "0"], "--dist-timeout 0"),
    (["--image-size", "0"], "--image-size 0"), (["--epochs", "0"], "--epochs 0"),
])  # fmt: skip
def test_values_that_cannot_make_a_run_are_refused_and_write_nothing(tmp_path, capsys, flags, culprit):
    err = cli_error(capsys, "train", *FLAGS, "--results", str(tmp_path / "r"), "--max-steps", "2", *flags)
    assert culprit in err
    assert not (tmp_path / "r").exists()


def test_sampling_refuses_a_checkpoint_whose_weights_are_not_finite(tmp_path, capsys):
    train(cfg(tmp_path, max_steps=2, ckpt_every=2), device="cpu")
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "step-0000002.pt")
    next(iter(ckpt["ema"].values())).fill_(float("nan"))
    save_checkpoint(tmp_path / "bad", 2, ckpt)
    out = tmp_path / "s.png"
    err = cli_error(capsys, "sample", "--ckpt", str(tmp_path / "bad" / "step-0000002.pt"), "--classes", "1",
                    "--steps", "2", "--out", str(out), "--device", "cpu", "--no-progress")
    assert "step-0000002.pt" in err and "not finite" in err and not out.exists()


# ---- one owner per folder ------------------------------------------------------------------------


def test_a_locked_results_folder_is_refused_naming_the_holder_and_a_stale_lock_is_not(tmp_path):
    fd = acquire(tmp_path, "--results")
    try:
        with pytest.raises(FolderInUseError, match=f"--results {tmp_path} is in use .*PID {os.getpid()}"):
            train(cfg(tmp_path, max_steps=2, ckpt_every=2), device="cpu")
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
    finally:
        release(fd)
    (tmp_path / ".ditlab.lock").write_text(f"{dead_pid()}\n")  # a crashed owner's file, its lock gone
    assert train(cfg(tmp_path, max_steps=2, ckpt_every=2), device="cpu")["step"] == 2


def test_extract_latents_locks_its_out_folder(tmp_path):
    from ditlab.data.extract import extract_latents

    (tmp_path / "images" / "a").mkdir(parents=True)
    fd = acquire(tmp_path / "cache", "--out")
    try:
        with pytest.raises(FolderInUseError, match=f"--out {tmp_path / 'cache'} is in use .*PID {os.getpid()}"):
            extract_latents(str(tmp_path / "images"), str(tmp_path / "cache"), vae="pixel", progress=False)
    finally:
        release(fd)


@pytest.mark.slow
def test_two_trains_started_together_on_one_folder_one_runs_the_other_is_refused(tmp_path):
    runs = [subprocess.Popen([sys.executable, "-m", "ditlab", "train", *FLAGS, "--results", str(tmp_path),
                              "--max-steps", "4", "--ckpt-every", "2", "--lr", lr], env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for lr in ("1e-3", "2e-3")]
    outs = [p.communicate(timeout=300) for p in runs]
    codes = sorted(p.returncode for p in runs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in runs].index(2)][1].strip()
    assert len(loser.splitlines()) == 1 and "in use by another ditlab process (PID" in loser
    winner_lr = [1e-3, 2e-3][[p.returncode for p in runs].index(0)]
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == winner_lr
    assert load_checkpoint(tmp_path / "checkpoints" / "step-0000004.pt")["config"]["lr"] == winner_lr
    assert [r["step"] for r in strict_rows(tmp_path / "metrics.jsonl")] == [2, 4]  # every step once


# ---- signals and killed writes -------------------------------------------------------------------


def start_training(results: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ditlab", "train", *FLAGS, "--results", str(results),
                             "--ckpt-every", "100000", "--max-steps", "100000", *flags],
                            env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_saves_and_exits_with_one_line(tmp_path, sig, code):
    proc = start_training(tmp_path)
    poll(lambda: (tmp_path / "metrics.jsonl").exists() and (tmp_path / "metrics.jsonl").read_text(), "a log row")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and f"stopped by {sig.name} at step" in err, err
    step = int(err.split("at step ")[1].split(";")[0])
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [step]
    assert load_checkpoint(tmp_path / "checkpoints" / f"step-{step:07d}.pt")["step"] == step
    assert not temps(tmp_path)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_resumes_bit_for_bit_and_leaves_no_temp_file(tmp_path):
    import random

    # The killed run's subprocess has one thread (ENV); so do the runs in this process, for the
    # comparison is bitwise and a BLAS may round differently with another thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _sigkill_and_resume(tmp_path, random.uniform(0.0, 0.3))
    finally:
        torch.set_num_threads(threads)


def _sigkill_and_resume(tmp_path, delay):
    straight = tmp_path / "straight"
    train(cfg(straight, max_steps=12, ckpt_every=2, image_size=8), device="cpu")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ditlab", "train", *FLAGS, "--results", str(killed),
                             "--max-steps", "12", "--ckpt-every", "2", "--lr", "1e-3", "--ema-decay", "0.9"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    poll(lambda: list_checkpoints(killed / "checkpoints") or proc.poll() is not None, "the first checkpoint")
    time.sleep(delay)  # a random moment after the first checkpoint, not a wait for one
    proc.kill()
    proc.wait()
    (killed / "checkpoints" / f".step-0000099.pt.tmp-{dead_pid()}").write_bytes(b"half")  # a killed save
    train(cfg(killed, max_steps=12, ckpt_every=2), device="cpu")
    a = load_checkpoint(straight / "checkpoints" / "step-0000012.pt")
    b = load_checkpoint(killed / "checkpoints" / "step-0000012.pt")
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert [r["step"] for r in strict_rows(killed / "metrics.jsonl")] == list(range(2, 13, 2))
    assert not temps(killed)


def test_a_killed_npz_sample_leaves_no_temp_file_after_the_next_sample(tmp_path):
    from ditlab.sampling.run import sample_to_files

    train(cfg(tmp_path / "run", max_steps=2, ckpt_every=2), device="cpu")
    out = tmp_path / "out" / "s.npz"
    out.parent.mkdir()
    stale = out.parent / f".s.npz.tmp-{dead_pid()}"
    stale.write_bytes(b"half")
    live = out.parent / f".other.npz.tmp-{os.getppid()}"  # another live process's write: kept
    live.write_bytes(b"busy")
    sample_to_files(str(tmp_path / "run" / "checkpoints" / "step-0000002.pt"), str(out), num_samples=2, steps=2,
                    device="cpu", progress=False)
    assert out.exists() and not stale.exists() and live.exists()


# ---- damaged files ---------------------------------------------------------------------------------


def flip_tensor_bytes(path: Path) -> None:
    """Flip 4 bytes in the middle of every tensor record of a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        spans = []
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size >= 8:
                with open(path, "rb") as f:
                    f.seek(info.header_offset + 26)
                    name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
                spans.append((info.header_offset + 30 + name_len + extra_len, info.file_size))
    data = bytearray(path.read_bytes())
    for start, size in spans:
        mid = start + size // 2 - 2
        data[mid:mid + 4] = bytes(b ^ 0xFF for b in data[mid:mid + 4])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_damaged_newest_checkpoint_is_named_moved_aside_and_resume_falls_back(tmp_path, capsys, damage):
    train(cfg(tmp_path / "a", max_steps=6, ckpt_every=2), device="cpu")
    train(cfg(tmp_path / "b", max_steps=4, ckpt_every=2), device="cpu")
    newest = tmp_path / "b" / "checkpoints" / "step-0000004.pt"
    if damage == "flipped":
        flip_tensor_bytes(newest)
    else:
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.raises(ValueError, match="step-0000004.pt") as e:
        load_checkpoint(newest)
    assert "weights_only" not in str(e.value) and len(str(e.value)) < 400
    capsys.readouterr()
    train(cfg(tmp_path / "b", max_steps=6, ckpt_every=2), device="cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-0000004.pt" in err[0] and "resuming from step-0000002.pt" in err[0]
    assert (newest.parent / "step-0000004.pt.damaged").exists()  # kept, never deleted
    a, b = (load_checkpoint(tmp_path / m / "checkpoints" / "step-0000006.pt") for m in "ab")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_flipped_bytes_are_refused_by_sample_and_convert_naming_the_file(tmp_path, capsys):
    train(cfg(tmp_path, max_steps=2, ckpt_every=2), device="cpu")
    path = tmp_path / "checkpoints" / "step-0000002.pt"
    flip_tensor_bytes(path)
    err = cli_error(capsys, "sample", "--ckpt", str(path), "--classes", "1", "--steps", "2", "--out",
                    str(tmp_path / "s.png"), "--device", "cpu", "--no-progress")
    assert str(path) in err and "checksum" in err
    err = cli_error(capsys, "convert", str(path), str(tmp_path / "c.safetensors"), "--to", "safetensors")
    assert str(path) in err and "checksum" in err and not (tmp_path / "c.safetensors").exists()


def test_a_torn_metrics_line_is_dropped_with_a_warning_naming_the_file(tmp_path, capsys):
    train(cfg(tmp_path, max_steps=4, ckpt_every=4), device="cpu")
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 6, "loss": 0.9, "ms')  # a crash mid-line
    capsys.readouterr()
    train(cfg(tmp_path, max_steps=6, ckpt_every=2), device="cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(metrics) in err[0] and "torn" in err[0]
    assert [r["step"] for r in strict_rows(metrics)] == [2, 4, 6]


# ---- devices, launchers, defaults --------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line_for_train_and_sample(tmp_path, capsys):
    err = cli_error(capsys, "train", *FLAGS[:-1], "cuda", "--results", str(tmp_path / "r"), "--max-steps", "2")
    assert "--device cuda" in err and "no CUDA device" in err and "--device cpu" in err
    train(cfg(tmp_path / "run", max_steps=2, ckpt_every=2), device="cpu")
    err = cli_error(capsys, "sample", "--ckpt", str(tmp_path / "run" / "checkpoints" / "step-0000002.pt"),
                    "--classes", "1", "--out", str(tmp_path / "s.png"), "--device", "cuda")
    assert "--device cuda" in err and "no CUDA device" in err


def test_fsdp_without_torchrun_says_how_to_launch(tmp_path, capsys):
    err = cli_error(capsys, "train", *FLAGS, "--results", str(tmp_path / "r"), "--max-steps", "2", "--fsdp")
    assert "--fsdp" in err and "torchrun --nproc_per_node=N -m ditlab train" in err
    assert not (tmp_path / "r").exists()


def test_image_size_defaults_to_the_datas_own(tmp_path):
    from ditlab.data.latents import FORMAT, INDEX_NAME, VERSION
    from ditlab.training.data import native_image_size

    train(cfg(tmp_path, max_steps=2, ckpt_every=2), device="cpu")  # digits, no image_size
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "step-0000002.pt")
    assert ckpt["model_config"]["input_size"] == 8 and ckpt["config"]["image_size"] == 8
    assert train(cfg(tmp_path, max_steps=4, ckpt_every=2), device="cpu")["step"] == 4  # resumes as stored
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / INDEX_NAME).write_text(json.dumps({"format": FORMAT, "version": VERSION, "image_size": 32}))
    assert native_image_size(str(cache)) == 32
    (tmp_path / "folder").mkdir()
    assert native_image_size(str(tmp_path / "folder")) == 256


def test_a_relative_vae_is_stored_absolute_and_samples_from_another_folder(tmp_path, monkeypatch, vae_dir):
    from PIL import Image

    from ditlab.sampling.run import sample_to_files

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(tmp_path / "imgs" / c / f"{i}.png")
    os.symlink(vae_dir, tmp_path / "tinyvae")
    monkeypatch.chdir(tmp_path)
    train(TrainConfig(data="imgs", vae="tinyvae", results="run", **{**TINY, "global_batch_size": 4},
                      image_size=16, max_steps=1, ckpt_every=1), device="cpu")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000001.pt")
    assert ckpt["vae"] == str(tmp_path / "tinyvae") and ckpt["config"]["data"] == str(tmp_path / "imgs")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    s = sample_to_files(str(tmp_path / "run" / "checkpoints" / "step-0000001.pt"), "s.png", classes=[0], steps=2,
                        device="cpu", progress=False)
    assert s["vae"] == str(tmp_path / "tinyvae") and (tmp_path / "elsewhere" / "s.png").exists()


def test_resuming_on_another_number_of_processes_warns_in_one_line(tmp_path, capsys):
    train(cfg(tmp_path, max_steps=2, ckpt_every=2), device="cpu")
    path = tmp_path / "checkpoints" / "step-0000002.pt"
    ckpt = load_checkpoint(path)
    assert ckpt["world_size"] == 1
    save_checkpoint(path.parent, 2, {**ckpt, "world_size": 2})
    capsys.readouterr()
    assert train(cfg(tmp_path, max_steps=4, ckpt_every=2), device="cpu")["step"] == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run of 2 process(es) on 1" in err[0] and "differ" in err[0]


# ---- distributed faults ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_stopped_rank_makes_the_other_fail_within_the_timeout_naming_it(tmp_path):
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "ditlab", "train", *FLAGS, "--results", str(tmp_path / "r"), "--max-steps",
                                 "100000", "--ckpt-every", "100000", "--dist-timeout", "5"],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    try:
        poll(lambda: (tmp_path / "r" / "metrics.jsonl").exists() and (tmp_path / "r" / "metrics.jsonl").read_text(),
             "training to run")
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        rank1 = next(int(c) for c in children if b"RANK=1\0" in Path(f"/proc/{c}/environ").read_bytes())
        os.kill(rank1, signal.SIGSTOP)
        stopped = time.monotonic()
        line = poll(lambda: next((x for x in err_path.read_text().splitlines() if "did not answer" in x), None),
                    "rank 0's error")
        assert time.monotonic() - stopped < 5 + 30 + 30  # the timeout, the question, a generous margin
        assert "rank 1 did not answer within --dist-timeout 5 s" in line and line.startswith("ditlab train: error:")
        os.kill(rank1, signal.SIGKILL)
    finally:
        proc.kill() if proc.poll() is None else None
        proc.wait(timeout=60)
