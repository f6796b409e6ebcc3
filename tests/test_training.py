"""The training engine end to end on the bundled digits, on CPU."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ditlab
from ditlab.checkpoints.state import list_checkpoints, load_checkpoint
from ditlab.cli import main
from ditlab.training import TrainConfig, train

TINY = dict(model="DiT-S/2", depth=2, hidden_size=32, num_heads=2, image_size=8, global_batch_size=16,
            num_workers=0, sample_every=0, log_every=5, progress=False, ema_decay=0.9, lr=1e-3)
REPO = Path(__file__).resolve().parents[1]


def run_cfg(results, **kw):
    return TrainConfig(data="digits", results=str(results), **{**TINY, **kw})


def test_overfitting_one_batch_drives_the_loss_down():
    torch.manual_seed(0)
    model = ditlab.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4,
                       num_classes=10)
    from ditlab.diffusion import Diffusion

    diffusion = Diffusion()
    from ditlab.data.digits import load_digits_arrays

    x0, y = (a[:8] for a in load_digits_arrays("train"))
    g = torch.Generator().manual_seed(0)
    t = diffusion.sample_timesteps(8, "cpu", generator=g)
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    losses = []
    for _ in range(150):
        loss = diffusion.training_losses(model, x0, t, y=y, noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def weights(results):
    ckpt = load_checkpoint(list_checkpoints(Path(results) / "checkpoints")[-1][1])
    return ckpt


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight = train(run_cfg(tmp_path / "a", max_steps=20, ckpt_every=10), device="cpu")
    assert straight["step"] == 20
    train(run_cfg(tmp_path / "b", max_steps=10, ckpt_every=10), device="cpu")
    train(run_cfg(tmp_path / "b", max_steps=20, ckpt_every=10), device="cpu")  # the same command, extended
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a["step"] == b["step"] == 20
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(line).items() if k not in ("images_per_sec", "wall_time")} for line in la]
    assert strip == [{k: v for k, v in json.loads(line).items() if k not in ("images_per_sec", "wall_time")}
                     for line in lb]
    assert [json.loads(line)["step"] for line in la] == [5, 10, 15, 20]
    # The EMA moved away from the weights, and the weights away from their initialisation.
    assert not torch.equal(a["ema"]["final_layer.linear.weight"], a["model"]["final_layer.linear.weight"])
    assert a["model"]["final_layer.linear.weight"].abs().sum() > 0


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    train(run_cfg(tmp_path, max_steps=4, ckpt_every=2, keep_last=1), device="cpu")
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [4]
    ckpt = torch.load(tmp_path / "checkpoints" / "step-0000004.pt", weights_only=True)
    assert {"model", "ema", "opt", "step", "epoch", "batch_in_epoch", "config", "model_config"} <= set(ckpt)
    assert ckpt["epoch"] == 0 and ckpt["batch_in_epoch"] == 4
    model = ditlab.DiT(**ckpt["model_config"])
    model.load_state_dict(ckpt["ema"], strict=True)
    assert json.loads((tmp_path / "config.json").read_text())["model"] == "DiT-S/2"


def test_a_folder_with_another_run_is_refused_and_untouched(tmp_path, capsys):
    train(run_cfg(tmp_path, max_steps=2, ckpt_every=2), device="cpu")
    path = tmp_path / "checkpoints" / "step-0000002.pt"
    before = path.read_bytes()
    args = ["train", "--data", "digits", "--results", str(tmp_path), "--model", "DiT-S/2", "--depth", "2",
            "--hidden-size", "32", "--num-heads", "2", "--image-size", "8", "--global-batch-size", "16",
            "--num-workers", "0", "--sample-every", "0", "--max-steps", "4", "--lr", "3e-4", "--device", "cpu",
            "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "another config" in err and "lr: 0.001 -> 0.0003" in err
    assert path.read_bytes() == before and len(list_checkpoints(tmp_path / "checkpoints")) == 1


def test_bad_batch_and_data_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="exceeds the 1500 training images"):
        train(run_cfg(tmp_path / "x", global_batch_size=4096, max_steps=1), device="cpu")
    with pytest.raises(FileNotFoundError, match="--data /nonexistent"):
        train(TrainConfig(data="/nonexistent", results=str(tmp_path / "y"), max_steps=1), device="cpu")


def torchrun(results, *flags, max_steps=4):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ditlab",
           "train", "--data", "digits", "--results", str(results), "--model", "DiT-S/2", "--depth", "2",
           "--hidden-size", "32", "--num-heads", "2", "--image-size", "8", "--global-batch-size", "16",
           "--num-workers", "0", "--sample-every", "0", "--max-steps", str(max_steps), "--ckpt-every", "2",
           "--log-every", "2", "--device", "cpu", "--no-progress", *flags]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def seed_digits_dae_cache(home: Path) -> None:
    """Put a digits-dae encoder in `home`'s cache without its full training (a few seconds): weights trained
    by a tiny recipe, stored under the default recipe's name. What REPA's alignment is made of is not what
    the multi-process tests check; that the projector shards, syncs and resumes is."""
    from ditlab.evaluation import dae_encoder

    default = dae_encoder.RECIPES[dae_encoder.DIGITS_DAE]
    tiny = dataclasses.replace(default, epochs=1, train_limit=128, batch_size=64)
    stored = {**dae_encoder.train_dae(tiny), "recipe": dataclasses.asdict(default)}
    path = dae_encoder.cache_path(default)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stored, path)


REPA_FLAGS = ("--repa-encoder", "digits-dae", "--repa-width", "16")


@pytest.mark.slow
@pytest.mark.parametrize("objective", [(), ("--objective", "flow", "--time-sampling", "logit-normal", *REPA_FLAGS)],
                         ids=["ddpm", "flow-repa"])
def test_torchrun_two_processes_ddp_and_fsdp_on_cpu(tmp_path, objective, monkeypatch):
    """DDP, then FSDP stopped and resumed, compute the same run; with REPA, its projector (part of the model)
    too, its encoder a named one resolved in every process."""
    if "--repa-encoder" in objective:
        monkeypatch.setenv("DITLAB_HOME", str(tmp_path / "home"))
        seed_digits_dae_cache(tmp_path / "home")
    out = torchrun(tmp_path / "ddp", *objective)
    assert out.stdout.count("trained to step 4") == 1  # rank 0 alone reports
    assert [s for s, _ in list_checkpoints(tmp_path / "ddp" / "checkpoints")] == [2, 4]
    assert not [p for p in (tmp_path / "ddp" / "checkpoints").iterdir() if p.name.startswith(".")]
    rows = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in rows] == [2, 4]
    # FSDP2 (sharded over the 2 ranks), stopped at step 2 and resumed, computes what DDP computed.
    torchrun(tmp_path / "fsdp", "--fsdp", *objective, max_steps=2)
    torchrun(tmp_path / "fsdp", "--fsdp", *objective, max_steps=4)
    # The two reduce gradients in another order (DDP's bucketed all-reduce, FSDP's reduce-scatter of
    # shards), so their float sums differ by rounding, which AdamW normalises: where a gradient is
    # ~0 (rounding alone), a weight moves by up to ~lr a step either way. Measured over repeated runs
    # on gloo: up to ~1e-6 after these 4 steps at lr 1e-4; the bound leaves room, while the logged
    # loss and gradient norm below stay tight.
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "fsdp")
    for part in ("model", "ema"):
        diffs = torch.cat([(a[part][k].float() - b[part][k].float()).abs().flatten() for k in a[part]])
        assert diffs.max() <= 2e-5 and diffs.median() <= 1e-7, (part, diffs.max().item(), diffs.median().item())
    assert set(a["opt"]["state"]) == set(b["opt"]["state"])
    if "--repa-encoder" in objective:
        assert b["config"]["repa_encoder"] == "digits-dae" and any(k.startswith("projectors.0.") for k in b["model"])
        assert len(list((tmp_path / "home" / "encoders").iterdir())) == 1  # the seeded cache, read by every rank
    logged = [[json.loads(line) for line in (tmp_path / m / "metrics.jsonl").read_text().splitlines()]
              for m in ("ddp", "fsdp")]
    for r, q in zip(*logged, strict=True):  # the sharded gradient norm is the global one
        assert r["step"] == q["step"] and abs(r["grad_norm"] - q["grad_norm"]) < 1e-5 * r["grad_norm"]
        assert abs(r["loss"] - q["loss"]) < 1e-6
