"""Online evaluation: the EMA weights of a training run scored every --eval-every steps and at the end,
with the number `ditlab sample` + `ditlab eval` give on the checkpoint of that step.

It is the offline path itself, not a copy of it: the settings become a `SampleConfig` (seed --seed,
random labels, --eval-samples images, the --eval-* sampler, steps, guidance and batch size, the
run's --precision), the EMA a `SamplingPipeline`, and the images are drawn by
`sampling.run.sample_rounds` (each rank its share by image index, per-image seeds, gathered on rank
0 in index order) into a temporary .npz that `evaluation.evaluate.evaluate` scores (a judge, or FID
/ FD-DINOv2 against a reference). Only rank 0 scores; the other ranks wait for it at a barrier, no
longer than the evaluation itself (so --dist-timeout must exceed rank 0's scoring time). The scores
go to metrics.jsonl as a row {"step": N, "eval": {...}} and to the sinks as eval/NAME; a step whose
row exists is not evaluated again on resume, and a checkpointed step whose evaluation never finished
(a crash, a preemption) is evaluated first thing on resume."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ditlab.diffusion.guidance import Guidance
from ditlab.diffusion.protocol import Process
from ditlab.errors import UserError
from ditlab.runtime.distributed import DistInfo, barrier, broadcast_object
from ditlab.runtime.files import temp_path
from ditlab.sampling.config import SampleConfig
from ditlab.training.config import TrainConfig
from ditlab.training.data import TrainingData
from ditlab.training.metrics import MetricsLog

EVAL_KEY = "eval"  # the metrics.jsonl row of an evaluation: {"step": N, "eval": {...}}
SAMPLES_NAME = "online.npz"  # the temporary sample batch's name (SampleConfig wants a .npz --out)


def eval_reference(cfg: TrainConfig) -> str:
    """--eval-ref, or the judge of the run's data (evaluation.judges.DATA_JUDGES)."""
    from ditlab.evaluation.judges import DATA_JUDGES

    if cfg.eval_ref is not None:
        return cfg.eval_ref
    if cfg.data in DATA_JUDGES:
        return DATA_JUDGES[cfg.data]
    raise UserError(f"--eval-every {cfg.eval_every}: give --eval-ref (a reference .npz, imagenet256, imagenet512 or "
                    f"a judge); --data {cfg.data} has no judge to default to")


def sample_config(cfg: TrainConfig, results: Path) -> SampleConfig:
    """The `ditlab sample` settings that draw the images of an online evaluation."""
    return SampleConfig(ckpt=str(results), out=SAMPLES_NAME, num_samples=cfg.eval_samples, labels="random",
                        sampler=cfg.eval_sampler, steps=cfg.eval_steps, cfg_scale=cfg.eval_cfg_scale,
                        guidance_channels=cfg.eval_guidance_channels, seed=cfg.seed, batch_size=cfg.eval_batch_size,
                        precision=cfg.precision, progress=False)


def evaluated_steps(metrics: Path) -> set[int]:
    """The steps whose evaluation row metrics.jsonl holds."""
    if not metrics.exists():
        return set()
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {row["step"] for row in rows if EVAL_KEY in row}


class OnlineEval:
    """The online evaluation of a run: built (and its reference checked) before the first step."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, data: TrainingData, process: Process,
                 class_names: list[str]):  # fmt: skip
        from ditlab.data.codecs import load_codec
        from ditlab.evaluation.judges import is_judge
        from ditlab.runtime.precision import sampling_vae_dtype
        from ditlab.sampling.labels import run_labels

        self.cfg, self.info, self.process, self.class_names = cfg, info, process, class_names
        self.results = Path(cfg.results)
        self.sample_cfg = sample_config(cfg, self.results)
        self.ref = eval_reference(cfg)
        if info.is_main and not (is_judge(self.ref) or os.path.exists(self.ref) or self.ref in _adm_names()):
            raise UserError(f"--eval-ref {self.ref}: no such file, ADM batch name or judge")
        self.labels, _, _ = run_labels(self.sample_cfg, class_names, "the training run")  # (N,) or None
        self.guidance = Guidance(scale=cfg.eval_cfg_scale, channels=cfg.eval_guidance_channels)
        self.vae = data.codec_spec
        self.codec = load_codec(self.vae, device=info.device, dtype=sampling_vae_dtype(cfg.precision),
                                pixel_channels=data.channels)
        done = sorted(evaluated_steps(self.results / "metrics.jsonl")) if info.is_main else None
        self.done: set[int] = set(broadcast_object(done))

    def due(self, step: int, total: float) -> bool:
        """Whether `step` is an evaluation step (every --eval-every, and the last) not yet evaluated."""
        return step > 0 and (step % self.cfg.eval_every == 0 or step == total) and step not in self.done

    @torch.inference_mode()
    def run(self, ema: torch.nn.Module, step: int, log: MetricsLog) -> dict[str, Any] | None:
        """Evaluate `ema` at `step`: every rank samples its share; rank 0 scores, logs and returns the
        row (None elsewhere)."""
        from ditlab.data.npz import NpzWriter
        from ditlab.sampling.pipeline import SamplingPipeline
        from ditlab.sampling.run import sample_rounds

        started = time.perf_counter()
        pipeline = SamplingPipeline.from_model(ema, self.process, vae=self.vae, class_names=self.class_names,
                                               precision=self.cfg.precision, device=self.info.device,
                                               codec=self.codec)
        shape = (self.cfg.eval_samples, pipeline.image_size, pipeline.image_size, pipeline.image_channels)
        row = None
        folder = temp_path(self.results / "eval")  # the next start removes it if this process dies
        try:
            writer = None
            if self.info.is_main:
                folder.mkdir()
                writer = NpzWriter(folder / SAMPLES_NAME, shape)
            for _, _, gathered in sample_rounds(pipeline, self.labels, self.sample_cfg, self.info, self.guidance):
                if writer is not None and gathered is not None:
                    writer.write(gathered)
            if writer is not None:
                writer.close(self.labels.numpy() if self.labels is not None else None)
                sampler, steps = pipeline.sampler_and_steps(self.sample_cfg.sampler, self.sample_cfg.steps)
                row = self._score(str(folder / SAMPLES_NAME), time.perf_counter() - started, sampler, steps)
                log.evaluation(step, row)
        finally:
            if self.info.is_main:
                shutil.rmtree(folder, ignore_errors=True)
        self.done.add(step)
        barrier()  # the ranks leave together: none waits in a training collective for rank 0's scoring
        return row

    def _score(self, samples: str, sampling_seconds: float, sampler: str, steps: int) -> dict[str, Any]:
        from ditlab.evaluation.evaluate import evaluate

        started = time.perf_counter()
        result = evaluate(samples, self.ref, self.cfg.eval_inception, device=str(self.info.device),
                          features=self.cfg.eval_features.split(","), dinov2_path=self.cfg.eval_dinov2)
        scores = {k: v for k, v in result.items() if isinstance(v, float | int) and not isinstance(v, bool)}
        return {**scores, "ref": self.ref, "sampler": sampler, "steps": steps,
                "cfg_scale": self.cfg.eval_cfg_scale, "guidance_channels": self.cfg.eval_guidance_channels,
                "seed": self.cfg.seed, "sampling_seconds": sampling_seconds,
                "scoring_seconds": time.perf_counter() - started}


def _adm_names() -> tuple[str, ...]:
    from ditlab.hub import REFERENCE_BATCHES

    return tuple(REFERENCE_BATCHES)
