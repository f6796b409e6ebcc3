"""`ditlab study run SPEC --out DIR`: train, sample and judge every entry of a study.

Layout of DIR: `study.json` (the parsed spec), and per entry `NAME/entry.json` (its run-defining
settings, parameters and Gflops), `NAME/run/` (an ordinary `ditlab train` results folder),
`NAME/samples/step-NNNNNNN/KEY.npz` and `NAME/evals/step-NNNNNNN/KEY.json` (one per evaluation
setting). The entry trains in segments, to each evaluation point in turn (`--max-steps` grows,
which a run resumes from exactly), so a re-run finds every finished step, sample file and metric
and recomputes none of them. Under torchrun every rank trains and samples; rank 0 judges and writes."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ditlab.checkpoints.state import checkpoint_path, list_checkpoints
from ditlab.data.named import NAMED_DATA
from ditlab.errors import UserError, UserFileNotFoundError
from ditlab.runtime.distributed import DistInfo, barrier, distributed_session
from ditlab.runtime.files import atomic_write_text
from ditlab.sampling.config import check_balanced
from ditlab.study.entry import Entry
from ditlab.study.facts import model_facts
from ditlab.study.spec import EvalSetting, Study, load_spec
from ditlab.training.resume import config_differences

if TYPE_CHECKING:
    from ditlab.evaluation.digits_judge import DigitsJudge
    from ditlab.evaluation.judges import ImageJudge

COLLECTIVE_TIMEOUT = timedelta(hours=4)  # other ranks wait at a barrier while rank 0 judges FID-50K
# ADM's suite, and FD-DINOv2's where [eval] features asks for it
FID_METRICS = ("fid", "sfid", "is", "precision", "recall", "fd_dinov2", "precision_dinov2", "recall_dinov2")


def step_dir(step: int) -> str:
    return f"step-{step:07d}"


def metrics_path(folder: Path, step: int, setting: EvalSetting) -> Path:
    return folder / "evals" / step_dir(step) / f"{setting.key}.json"


def entry_record(entry: Entry, study: Study, folder: Path) -> dict[str, Any]:
    cfg = entry.train_config(folder / "run", max_steps=study.steps_of(entry.name)[-1], progress=False)
    facts = model_facts(entry)
    del facts["image_size"], facts["channels"]
    record = {"name": entry.name, "size": entry.size, "patch_size": entry.patch_size, "block": entry.block,
              "seed": entry.seed, "objective": entry.objective, **entry.model, **entry.options, **facts,
              "global_batch_size": cfg.global_batch_size, "train": cfg.to_dict(),
              "eval_steps": list(study.steps_of(entry.name))}  # fmt: skip
    if study.ablation and entry.name in study.ablation.get("train_gflops_per_image", {}):
        record["train_gflops_per_image"] = study.ablation["train_gflops_per_image"][entry.name]["total"]
    return record


def check_entry(entry: Entry, study: Study, out: Path) -> dict[str, Any]:
    """The entry's record; refuses a folder that holds a run of another spec entry."""
    folder = out / entry.name
    record = entry_record(entry, study, folder)
    stored_path = folder / "entry.json"
    if stored_path.is_file():
        stored = json.loads(stored_path.read_text())
        diffs = config_differences(stored["train"], entry.train_config(folder / "run", 1, False))
        if diffs:
            raise UserError(f"{folder} holds entry {entry.name} of another spec ({'; '.join(diffs)}): "
                             "use a new --out folder or restore the spec")
    return record


class Judge:
    """The spec's metric on a sample file: the digits classifier, a dataset's judge
    (`evaluation.judges`), or ADM's FID suite."""

    def __init__(self, study: Study, device: torch.device, progress: bool = False):
        self.study, self.device, self.progress = study, device, progress
        self._digits: tuple[DigitsJudge, torch.Tensor] | None = None

    def image_judge(self) -> ImageJudge:
        """The judge of the spec's metric (`evaluation.judges.load_judge`: loaded once per process)."""
        from ditlab.evaluation.judges import load_judge

        return load_judge(self.study.eval.metric, self.progress)

    def __call__(self, npz: Path) -> dict[str, float]:
        ev = self.study.eval
        if ev.metric == "fid":
            from ditlab.evaluation import evaluate

            assert ev.ref is not None  # a fid study names its reference batch (spec.py)
            r = evaluate(str(npz), ev.ref, ev.inception, device=str(self.device), progress=self.progress,
                         features=ev.features, dinov2_path=ev.dinov2)
            return {k: float(r[k]) for k in FID_METRICS if k in r}
        if ev.metric != "digits":
            from ditlab.evaluation.judges import read_sample_images

            return self.image_judge().score(*read_sample_images(str(npz)))
        from ditlab.data.npz import read_samples

        judge, real = self.digits()
        pixels, stored = read_samples(npz)
        if stored is None:
            raise UserError(f"{npz}: no labels, so no class accuracy to judge")
        labels = torch.from_numpy(stored)
        images = (torch.from_numpy(pixels[..., :1]).permute(0, 3, 1, 2).float() - 127.5) / 127.5  # (N, 1, H, W)
        return {"frechet_distance": judge.frechet(images, real), "class_accuracy": judge.accuracy(images, labels)}

    def digits(self) -> tuple[DigitsJudge, torch.Tensor]:
        """The demo's classifier (trained once) and the held-out real digits (N, 1, 8, 8)."""
        if self._digits is None:
            from ditlab.data.digits import load_digits_arrays
            from ditlab.evaluation.judges import digits_judge

            self._digits = digits_judge(), load_digits_arrays("test")[0]  # trained once per process
        return self._digits

    def reference(self) -> dict[str, Any] | None:
        """The metric of real training images against the held-out ones (the floor), for a judge."""
        if self.study.eval.metric == "fid":
            return None
        if self.study.eval.metric != "digits":
            first = next(iter(self.study.entries.values())).train
            size = first.get("image_size") or NAMED_DATA[self.study.eval.metric].image_size
            return {**self.image_judge().floor(self.study.eval.num_samples, size), "data": self.study.eval.metric}
        judge, real = self.digits()
        n = min(self.study.eval.num_samples, len(judge.train_images))
        pick = torch.randperm(len(judge.train_images), generator=torch.Generator().manual_seed(0))[:n]
        return {"frechet_distance": judge.frechet(judge.train_images[pick], real), "data": "digits"}


def num_classes(ckpt: Path) -> int:
    """The number of classes of a training checkpoint's model (its weights memory-mapped, not read)."""
    from ditlab.checkpoints.formats import read_checkpoint

    return int(read_checkpoint(ckpt).config["num_classes"])


def say(info: DistInfo, text: str) -> None:
    if info.is_main:
        print(text, flush=True)


def evaluate_point(entry: Entry, study: Study, folder: Path, step: int, setting: EvalSetting, judge: Judge,
                   info: DistInfo, device: str | None, progress: bool) -> bool:
    """Sample (unless the file exists) and judge (unless its metrics exist) one setting; True if work was done."""
    from ditlab.sampling.run import sample_to_files

    metrics = metrics_path(folder, step, setting)
    if metrics.is_file():
        return False
    npz = folder / "samples" / step_dir(step) / f"{setting.key}.npz"
    started = time.time()
    if not npz.is_file():
        ev = study.eval
        ckpt = checkpoint_path(folder / "run" / "checkpoints", step)
        classes = list(range(num_classes(ckpt))) if setting.labels == "balanced" else None
        guide = None if setting.guide_step is None else checkpoint_path(folder / "run" / "checkpoints",
                                                                          setting.guide_step)  # fmt: skip
        if setting.guide_entry is not None:  # another entry's last checkpoint (it ran first: run_study's order)
            guide = checkpoint_path(folder.parent / setting.guide_entry / "run" / "checkpoints",
                                    study.steps_of(setting.guide_entry)[-1])
        if guide is not None and not guide.is_file():
            why = (f"entry {setting.guide_entry} has not finished: run it first (--only {setting.guide_entry})"
                   if setting.guide_entry is not None else "gone (keep_last removed it?)")
            raise UserError(f"{guide}: the guide checkpoint of {setting.key}: {why}")
        interval = None if setting.guidance_interval is None else list(setting.guidance_interval)
        if classes:
            check_balanced(setting.num_samples, len(classes))  # the rule of `ditlab sample --labels balanced`
        sample_to_files(str(ckpt), str(npz),
                        num_samples=setting.num_samples, classes=classes, steps=setting.steps,
                        sampler=setting.sampler, cfg_scale=setting.cfg_scale, seed=setting.seed,
                        guidance_channels=ev.guidance_channels, batch_size=ev.batch_size, device=device,
                        precision=entry.train.get("precision", "auto"), progress=progress,
                        guidance_interval=interval, guide_ckpt=None if guide is None else str(guide))  # fmt: skip
    sample_seconds = time.time() - started
    if info.is_main:
        row = {"entry": entry.name, "step": step, **vars(setting), "guided_steps": guided_steps(entry, setting),
               "metrics": judge(npz), "sample_seconds": sample_seconds,
               "eval_seconds": time.time() - started - sample_seconds}
        atomic_write_text(metrics, json.dumps(row, indent=2) + "\n")
        if not study.eval.keep_samples:
            npz.unlink(missing_ok=True)
    barrier()
    return True


def guided_steps(entry: Entry, setting: EvalSetting) -> int | None:
    """How many of the setting's sampling steps are guided (each costs a second forward pass: of the
    null label, or of the guide, which is the same model at an earlier step); None where the process
    has no respaced steps to count."""
    from ditlab.diffusion.guidance import Guidance
    from ditlab.diffusion.protocol import process_from_record
    from ditlab.diffusion.samplers import step_plan

    process = process_from_record(entry.train)
    if not hasattr(process, "respace"):
        return None
    guidance = Guidance(scale=setting.cfg_scale, interval=setting.guidance_interval)
    return sum(step_plan(process.respace(setting.steps), guidance))


def run_entry(entry: Entry, study: Study, out: Path, record: dict[str, Any], judge: Judge, info: DistInfo,
              device: str | None, progress: bool) -> dict[str, int]:
    """Train to each evaluation point in turn and evaluate there; returns what was done."""
    from ditlab.training import train

    folder = out / entry.name
    if info.is_main and not (folder / "entry.json").is_file():
        atomic_write_text(folder / "entry.json", json.dumps(record, indent=2) + "\n")
    done = {"trained_steps": 0, "evaluations": 0}
    ckpts = folder / "run" / "checkpoints"
    for step in study.steps_of(entry.name):
        pending = [s for s in study.settings(entry.name, step) if not metrics_path(folder, step, s).is_file()]
        if not pending:  # nothing left to do here: its checkpoint is not needed (keep_last may have removed it)
            continue
        if not checkpoint_path(ckpts, step).is_file():
            newest = ([s for s, _ in list_checkpoints(ckpts)] or [0])[-1]
            if newest > step:
                raise UserError(f"{ckpts}: evaluation step {step} has evaluations to do but no checkpoint, and the "
                                 f"run is already at step {newest} (keep_last removed it?); restore it, or remove "
                                 f"the new settings from the spec")
            cfg = entry.train_config(folder / "run", max_steps=step, progress=progress)
            train(cfg, device=device)
            done["trained_steps"] += step - newest
        for setting in pending:
            done["evaluations"] += evaluate_point(entry, study, folder, step, setting, judge, info, device, progress)
    return done


def preflight(study: Study) -> None:
    """The files a study needs, checked before anything is written or trained."""
    data = study.entries[next(iter(study.entries))].train["data"]
    if data not in NAMED_DATA and not Path(data).is_dir():
        raise UserFileNotFoundError(f"{study.path} [data] data = {data!r}: no such folder (an image folder or a latent "
                                "cache, e.g. from `ditlab extract-latents`)")
    ev = study.eval
    if ev.metric == "fid":
        from ditlab.evaluation.inception import default_weights_path

        if ev.ref is None or not Path(ev.ref).is_file():
            raise UserFileNotFoundError(f"{study.path} [eval] ref = {ev.ref!r}: no such reference batch")
        weights = ev.inception or default_weights_path()
        if not Path(weights).is_file():
            raise UserFileNotFoundError(f"{study.path} [eval] inception: no Inception weights at {weights} (see the "
                                    "README's Evaluation for where to get them)")


def run_study(spec: str | Path, out: str | Path, only: str | None = None, device: str | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Run every entry of the spec (or only `only`) into `out`; returns one summary per entry run."""
    study = load_spec(spec)
    if only is not None and only not in study.entries:
        raise UserError(f"--only {only}: not an entry of {spec} (entries: {', '.join(study.entries)})")
    names = [only] if only else list(study.entries)
    guides = set(study.final.guide_entries) if study.final else set()
    names = [n for n in names if n in guides] + [n for n in names if n not in guides]  # a guide trains first
    preflight(study)
    out = Path(out)
    records = {n: check_entry(study.entries[n], study, out) for n in names}  # refuse before writing anything
    summaries = []
    with distributed_session(device, timeout=COLLECTIVE_TIMEOUT) as info:
        text = json.dumps(study.to_dict(), indent=2) + "\n"
        if info.is_main and not ((out / "study.json").is_file() and (out / "study.json").read_text() == text):
            atomic_write_text(out / "study.json", text)
        judge = Judge(study, info.device, progress)
        if info.is_main and not (out / "reference.json").is_file() and study.eval.metric != "fid":
            atomic_write_text(out / "reference.json", json.dumps(judge.reference(), indent=2) + "\n")
        for i, name in enumerate(names, 1):
            r = records[name]
            say(info, f"[{i}/{len(names)}] {name}: {r['params'] / 1e6:.3g}M params, {r['gflops']:.3g} Gflops, "
                      f"{r['tokens']} tokens, {len(study.eval_steps)} evaluation points to step "
                      f"{study.steps_of(name)[-1]}")
            started = time.time()
            done = run_entry(study.entries[name], study, out, r, judge, info, device, progress)
            summaries.append({"entry": name, **done, "seconds": time.time() - started})
            say(info, f"[{i}/{len(names)}] {name}: done in {time.time() - started:.0f}s "
                      f"({done['trained_steps']} steps trained, {done['evaluations']} evaluations computed)")
    return summaries
