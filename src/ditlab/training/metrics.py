"""Run metrics: metrics.jsonl, the sinks (TensorBoard, Weights & Biases) and a progress bar, on rank 0.

Loss terms are summed on the device every step and read back only at log steps, so the
training step never waits for the host. A checkpoint keeps the sums of the row in progress, so
the first row after a resume is the row the uninterrupted run logs. Steps whose update was
skipped (non-finite loss or gradient norm) are left out of the means and counted as "skipped";
a row whose every step was skipped logs null terms, so the file stays strict JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ditlab.runtime.distributed import DistInfo
from ditlab.training.config import TrainConfig
from ditlab.training.sinks import check_sinks, open_sinks

TERMS = ("loss", "mse", "vb", "repa")
"""the terms logged, those of them the step gives (flow: "loss" alone; "repa": REPA's alignment loss,
before --repa-coeff, when the run aligns)"""


class MetricsLog:
    def __init__(self, results: Path, info: DistInfo, cfg: TrainConfig, resume_step: int, total: float,
                 description: str = ""):
        self.info, self.cfg = info, cfg
        self.path = results / "metrics.jsonl"
        self.sums: torch.Tensor | None = None  # (len(terms) + 2,): the terms, grad norm, finite steps
        self.terms: tuple[str, ...] = ()  # the TERMS the process gives, known at the first step
        self.count = 0
        self.last_step, self.last_time, self.started = resume_step, time.perf_counter(), time.time()
        self.bar, self.sinks = None, []
        check_sinks(cfg)
        if not info.is_main:
            return
        results.mkdir(parents=True, exist_ok=True)
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=None if total == float("inf") else int(total), initial=resume_step,
                            desc="train", dynamic_ncols=True, unit="step")
            if description:
                self.bar.write(description)
        self.sinks = open_sinks(results, cfg)

    def accumulate(self, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor,
                   bad: torch.Tensor | None = None) -> None:  # fmt: skip
        """One step's terms (each (N,)), gradient norm and bad flag (0-dim bool: a skipped step)."""
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.terms = self.terms or tuple(k for k in TERMS if k in terms)
        values = torch.stack([terms[k].detach().float().mean() for k in self.terms] + [grad_norm.detach().float()])
        # a step whose update was skipped (bad, or an fp16 overflow the scaler skipped) is left out
        good = torch.isfinite(values).all() if bad is None else (~bad) & torch.isfinite(values).all()
        good = good.float()
        values = torch.cat([torch.where(good > 0, values, torch.zeros_like(values)), good[None]])
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1

    def pending(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any] | None:
        """What the next row has summed so far (its sums averaged over ranks: a collective, every rank
        calls it), for a checkpoint: a run resumed from it logs the row an uninterrupted run logs."""
        if self.sums is None:
            return None
        return {"sums": reduce(self.sums).detach().cpu(), "count": self.count}

    def restore(self, pending: dict[str, Any] | None) -> None:
        """Continue the row a checkpoint's `pending` began (None: a row starts afresh)."""
        if pending:
            self.sums, self.count = pending["sums"].to(self.info.device), int(pending["count"])

    def write(self, step: int, lr: float, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.sums is None:
            return
        totals = reduce(self.sums / self.count).tolist()  # the only host sync of the interval
        good = totals[-1]
        means = [v / good if good > 0 else None for v in totals[:-1]]
        skipped = round(self.count * (1 - good))
        now = time.perf_counter()
        images_per_sec = (step - self.last_step) * self.cfg.global_batch_size / max(now - self.last_time, 1e-9)
        self.sums, self.count, self.last_step, self.last_time = None, 0, step, now
        if not self.info.is_main:
            return
        row = {"step": step, **dict(zip(self.terms, means)), "grad_norm": means[-1], "lr": lr,
               "images_per_sec": images_per_sec, "wall_time": time.time() - self.started}
        if skipped:
            row["skipped"] = skipped
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for sink in self.sinks:
            sink.scalars({k: v for k, v in row.items() if k != "step" and v is not None}, step)
        if self.bar is not None and row["loss"] is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{images_per_sec:.1f}")

    def evaluation(self, step: int, scores: dict[str, Any]) -> None:
        """An online evaluation's row (`training.online_eval`): {"step": N, "eval": scores} in
        metrics.jsonl, its numbers as eval/NAME to the sinks (rank 0)."""
        if not self.info.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "eval": scores}) + "\n")
        numbers = {f"eval/{k}": v for k, v in scores.items()
                   if isinstance(v, float | int) and not isinstance(v, bool) and k != "seed"}
        for sink in self.sinks:
            sink.scalars(numbers, step)
        if self.bar is not None:
            self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in numbers.items()
                                                        if not k.endswith("seconds")))

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()

    def image(self, path: Path | None, step: int) -> None:
        """Hand the sample grid written at `path` (None: none this step) to the sinks."""
        if path is None:
            return
        for sink in self.sinks:
            sink.image("samples", path, step)
