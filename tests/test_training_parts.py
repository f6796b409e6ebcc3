"""The training engine's parts on their own: EMA, data order, checkpoints, configs."""

import json

import pytest
import torch

import ditlab
from ditlab.checkpoints.state import list_checkpoints, load_checkpoint, save_checkpoint
from ditlab.data.digits import DigitsDataset, load_digits_arrays
from ditlab.training.config import TrainConfig
from ditlab.training.ema import make_ema, update_ema
from ditlab.training.order import RankBatchSampler
from ditlab.training.resume import config_differences


def test_ema_update_against_hand_computation():
    model = ditlab.DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    ema = make_ema(model)
    assert all(not p.requires_grad for p in ema.parameters())
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    update_ema(ema, model, decay=0.9)
    for (name, p), e in zip(model.named_parameters(), ema.parameters()):
        expected = 0.9 * before[name] + 0.1 * p.detach()
        assert torch.allclose(e, expected, atol=1e-6, rtol=0), name
    update_ema(ema, model, decay=0.0)
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), model.parameters()))


def test_rank_batches_partition_each_epoch_and_resume_mid_epoch():
    n, g = 103, 8
    one = [b for b in RankBatchSampler(n, g, 0, 1, seed=3, epoch=2)]
    two = [RankBatchSampler(n, g, r, 2, seed=3, epoch=2) for r in range(2)]
    assert len(one) == n // g
    for b, (a0, a1) in enumerate(zip(*two)):
        assert a0 + a1 == one[b]  # the global batch does not depend on the number of ranks
    flat = [i for b in one for i in b]
    assert len(set(flat)) == len(flat) == (n // g) * g
    assert list(RankBatchSampler(n, g, 0, 1, seed=3, epoch=2, start=5)) == one[5:]
    assert list(RankBatchSampler(n, g, 0, 1, seed=3, epoch=3)) != one
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        RankBatchSampler(n, g, 0, 3, seed=0, epoch=0)


def test_checkpoints_are_atomic_listed_and_pruned(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save_checkpoint(folder, step, {"step": step, "w": torch.full((2,), float(step))}, keep_last=2)
    (folder / ".step-0000040.pt.tmp-123").write_bytes(b"partial")  # an interrupted save
    assert [s for s, _ in list_checkpoints(folder)] == [20, 30]
    ckpt = load_checkpoint(folder / "step-0000030.pt")
    assert ckpt["step"] == 30 and torch.equal(ckpt["w"], torch.full((2,), 30.0))
    (folder / "step-0000050.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*step-0000050.pt"):
        load_checkpoint(folder / "step-0000050.pt")


def test_config_differences_ignore_resumable_settings():
    a = TrainConfig(data="digits", results="r", model="DiT-S/2")
    b = TrainConfig(data="digits", results="r2", model="DiT-S/2", max_steps=5, log_every=7, precision="bf16")
    assert config_differences(json.loads(json.dumps(a.to_dict())), b) == []
    c = TrainConfig(data="digits", results="r", model="DiT-S/4", lr=2e-4)
    assert config_differences(a.to_dict(), c) == ["lr: 0.0001 -> 0.0002", "model: 'DiT-S/2' -> 'DiT-S/4'"]


def test_config_validation_messages():
    with pytest.raises(ValueError, match="--precision 'fp8'"):
        TrainConfig(data="digits", results="r", precision="fp8").validate()
    with pytest.raises(ValueError, match="give --max-steps or --epochs"):
        TrainConfig(data="digits", results="r", max_steps=None).validate()


def test_digits_dataset_split_and_range():
    train, test = DigitsDataset("train"), DigitsDataset("test")
    assert len(train) == 1500 and len(test) == 297
    assert train.images.min() >= -1 and train.images.max() <= 1
    assert set(train.labels.tolist()) == set(range(10))
    everything, _ = load_digits_arrays("all")
    rows = {tuple(x.flatten().tolist()) for x in everything}
    assert len(rows) >= 1790  # nearly all digits are distinct
    assert not ({tuple(x.flatten().tolist()) for x in train.images} & {tuple(x.flatten().tolist()) for x in
                                                                       test.images})
    big, _ = load_digits_arrays("test", 16)
    assert big.shape == (297, 1, 16, 16)
    with pytest.raises(ValueError, match="--image-size 12"):
        load_digits_arrays("train", 12)


def test_a_run_stored_before_a_setting_existed_resumes():
    """Settings added later (lr_warmup, lr_schedule, ...) are missing from older runs' stored
    configs: there they had their defaults, so the resume is not refused."""
    import dataclasses

    from ditlab.training.resume import config_differences

    cfg = TrainConfig(data="digits", results="r", model="DiT-S/2")
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("lr_warmup", "lr_schedule", "lr_min")}
    assert config_differences(old, cfg) == []
    changed = dataclasses.replace(cfg, lr_warmup=10)
    assert config_differences(old, changed) == ["lr_warmup: 0 -> 10"]


def test_the_ema_update_takes_a_device_tensor_decay_without_reading_it():
    """A 0-dim tensor decay (what a skipped step passes) must not be turned into a Python number
    (on CUDA that is a host sync every step). On the meta device reading it raises, so the update
    there proves it is not read; on the CPU it gives what the float decay gives."""
    from ditlab.training.ema import make_ema, update_ema

    meta = torch.nn.Linear(3, 2, device="meta")
    update_ema(make_ema(meta), meta, torch.tensor(0.9, device="meta"))  # raises if the decay is read
    model = torch.nn.Linear(3, 2)
    ema_a, ema_b = make_ema(model), make_ema(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update_ema(ema_a, model, torch.tensor(0.9))
    update_ema(ema_b, model, 0.9)
    assert all(torch.allclose(a, b) for a, b in zip(ema_a.parameters(), ema_b.parameters()))
