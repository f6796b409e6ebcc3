"""How a model is run on the hardware: precision, activation checkpointing, compilation, and
data parallelism (DDP, or FSDP2 sharding per block), applied outside the model in that order."""

from __future__ import annotations

import torch
from torch import nn

from ditlab.errors import UserError
from ditlab.models.dit import DiT
from ditlab.runtime.distributed import DistInfo
from ditlab.training.config import TrainConfig

COMPILE_MODES = ("none", "block", "model")


def compile_model(model: DiT, mode: str) -> DiT:
    """torch.compile a DiT in place: "block" compiles each block (one graph serves every block, and
    FSDP can shard between them), "model" the whole forward, "none" nothing. Returns the model."""
    if mode not in COMPILE_MODES:
        raise UserError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if mode == "block":
        for block in model.blocks:
            block.compile()
    elif mode == "model":
        model.compile()
    return model


def apply_parallelism(model: DiT, ema: DiT, cfg: TrainConfig,
                      info: DistInfo) -> tuple[nn.Module, torch.optim.Optimizer]:
    """(model to train, AdamW): checkpointing, compile per block, then DDP, or FSDP2 on the model
    and, in place, on the EMA (sharded alike, so its update stays local)."""
    model.grad_checkpointing = cfg.grad_checkpointing
    if cfg.compile:
        compile_model(model, "block")
    wrapped: nn.Module = model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for m in (model, ema):
            for block in m.blocks:
                fully_shard(block)
            fully_shard(m)
    elif info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return wrapped, make_optimizer(model, cfg.lr, info.device)


def make_optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.AdamW:
    """The paper's AdamW (constant lr, no weight decay) as one fused kernel over all parameters.

    Fused on CUDA and on CPU: for DiT-S/2 on one CPU thread a step of the fused kernel took 42 ms,
    the for-loop and foreach versions 155 ms each."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                             fused=device.type in ("cuda", "cpu"))
