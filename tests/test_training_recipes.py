"""Gradient accumulation and learning-rate schedules, on the bundled digits, on CPU."""

import json
import math

import pytest
import torch
from test_training import run_cfg, weights

import ditlab
from ditlab.diffusion import Diffusion
from ditlab.training import TrainConfig, train
from ditlab.training.accumulate import accumulate_gradients
from ditlab.training.ema import make_ema
from ditlab.training.lr_schedule import lr_at
from ditlab.training.step import TrainStep


def _grads_of(micro_batches: int, drop: bool) -> tuple[dict, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = ditlab.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                       num_classes=10)
    with torch.no_grad():  # leave the zero init, so that every parameter has a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = TrainStep(model, make_ema(model), opt, Diffusion(), None, torch.device("cpu"), 0.9)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 8, 8, generator=g)
    t, y = torch.randint(0, 1000, (16,), generator=g), torch.randint(0, 10, (16,), generator=g)
    mask = torch.rand(16, generator=g) < 0.3 if drop else None
    terms = accumulate_gradients(step, x0, t, y, noise, mask, micro_batches)
    return terms, [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("drop", [False, True])
def test_accumulated_gradients_equal_the_whole_batch_gradient(drop):
    terms1, grads1 = _grads_of(1, drop)
    terms4, grads4 = _grads_of(4, drop)
    for k in ("loss", "mse", "vb"):  # the same examples, labels and draws, in the same order
        assert terms4[k].shape == (16,)
        assert torch.allclose(terms1[k], terms4[k], rtol=1e-5, atol=1e-7), k
    norm1 = torch.stack([g.norm() for g in grads1]).norm()
    for a, b in zip(grads1, grads4):  # the batch mean's gradient: a loss scaled 4x off would fail here
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * norm1), (a - b).abs().max()
    _, grads2 = _grads_of(2, drop)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6 * norm1) for a, b in zip(grads1, grads2))


def test_grad_accum_4_equals_1_after_20_steps_and_resumes_bit_for_bit(tmp_path):
    kw = dict(max_steps=20, ckpt_every=10, lr=1e-4)  # the paper's learning rate
    train(run_cfg(tmp_path / "k1", **kw), device="cpu")
    train(run_cfg(tmp_path / "k4", grad_accum=4, **kw), device="cpu")
    a, b = weights(tmp_path / "k1"), weights(tmp_path / "k4")
    moved = max((a["model"][k] - b["model"][k]).abs().max() for k in a["model"])
    for part in ("model", "ema"):  # 20 AdamW steps at lr 1e-4 move a weight by up to 2e-3
        for k in a[part]:
            assert torch.allclose(a[part][k], b[part][k], rtol=0, atol=5e-5), (part, k)
    assert moved > 0  # the two summation orders do differ in the last bits
    rows = [[json.loads(line) for line in (tmp_path / m / "metrics.jsonl").read_text().splitlines()]
            for m in ("k1", "k4")]
    for r, q in zip(*rows, strict=True):  # the same loss and gradient norm, step by step
        assert abs(r["loss"] - q["loss"]) < 1e-5 * r["loss"] and abs(r["grad_norm"] - q["grad_norm"]) < 1e-4 * r[
            "grad_norm"]
    # K = 4 stopped at step 10 and resumed is bit for bit the K = 4 run that never stopped.
    train(run_cfg(tmp_path / "r4", grad_accum=4, **{**kw, "max_steps": 10}), device="cpu")
    train(run_cfg(tmp_path / "r4", grad_accum=4, **kw), device="cpu")
    c = weights(tmp_path / "r4")
    for part in ("model", "ema"):
        assert all(torch.equal(b[part][k], c[part][k]) for k in b[part]), part


def test_grad_accum_that_does_not_split_the_batch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--grad-accum 3 must be at least 1 and divide --global-batch-size 16"):
        run_cfg(tmp_path, grad_accum=3)
    with pytest.raises(ValueError, match="--grad-accum 0"):
        run_cfg(tmp_path, grad_accum=0)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(data="digits", results="r", **{"max_steps": 100, "lr": 1e-3, **kw})


def test_lr_schedules_by_hand():
    assert all(lr_at(_cfg(), s, 10) == 1e-3 for s in (0, 50, 99, 500))  # the paper's: the lr itself
    warm = _cfg(lr_warmup=10)
    assert [lr_at(warm, s, 10) for s in (0, 4, 9, 10, 99)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    cos = _cfg(lr_warmup=10, lr_schedule="cosine", lr_min=1e-5)
    assert lr_at(cos, 10, 10) == pytest.approx(1e-3)
    assert lr_at(cos, 55, 10) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(cos, 100, 10) == pytest.approx(1e-5) and lr_at(cos, 1000, 10) == pytest.approx(1e-5)
    lin = _cfg(lr_schedule="linear", lr_decay_steps=50)
    assert [lr_at(lin, s, 10) for s in (0, 25, 50, 80)] == pytest.approx([1e-3, 5e-4, 0.0, 0.0])
    ep = _cfg(max_steps=None, epochs=2, lr_schedule="linear")  # the run's end: 2 epochs of 10 steps
    assert lr_at(ep, 10, 10) == pytest.approx(5e-4)
    values = [lr_at(cos, s, 10) for s in range(100)]
    assert all(b <= a for a, b in zip(values[10:], values[11:]))  # decays monotonically


@pytest.mark.parametrize(("kw", "match"), [
    (dict(lr_schedule="step"), "--lr-schedule 'step'"), (dict(lr_warmup=-1), "--lr-warmup -1"),
    (dict(lr_min=1.0), "--lr-min 1.0 must lie in"), (dict(lr_decay_steps=5, lr_warmup=5), "--lr-decay-steps 5"),
])  # fmt: skip
def test_bad_lr_settings_are_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


def test_scheduled_lr_is_logged_and_resumes_exactly(tmp_path):
    kw = dict(max_steps=12, ckpt_every=6, log_every=1, lr_warmup=4, lr_schedule="cosine", lr_min=1e-4)
    train(run_cfg(tmp_path / "a", **kw), device="cpu")
    train(run_cfg(tmp_path / "b", **{**kw, "max_steps": 6}, lr_decay_steps=12), device="cpu")
    train(run_cfg(tmp_path / "b", **kw), device="cpu")  # lr_decay_steps 12 -> None: the same end, allowed
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    cfg = run_cfg(tmp_path / "a", **kw)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [lr_at(cfg, r["step"] - 1, 1500 // 16) for r in rows]
    assert rows[0]["lr"] == pytest.approx(1e-3 / 4) and rows[-1]["lr"] < 2e-4
    # Extending the run would move the end of its cosine: refused, nothing written.
    before = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="decays until step 12, this command until 20"):
        train(run_cfg(tmp_path / "a", **{**kw, "max_steps": 20}), device="cpu")
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == before
