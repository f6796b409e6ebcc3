"""The `ditlab` command line: one console script with a subcommand per task.

The flags of train, sample and extract-latents are generated from their config dataclasses
(`TrainConfig`, `SampleConfig`, `ExtractConfig`; see `ditlab.flags`), with the paper's defaults.
Building the parser imports no torch, so `ditlab --help` is instant; a subcommand's work is
imported only when it runs. A user error (`ditlab.errors.UserError`) ends with one line on stderr
and exit 2 (DITLAB_TRACEBACK=1 shows the whole chain); anything else is a bug and shows its
traceback."""

from __future__ import annotations

import argparse
import os
import sys

from ditlab.errors import UserError, UserNotADirectoryError, one_line
from ditlab.flags import add_flags, from_args
from ditlab.options import BLOCKS, DEVICES, FORMATS, WEIGHT_SETS


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (no usage block): `ditlab CMD: error: ... (see --help)`."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _quiet_broken_pipe() -> int:
    """stdout's reader went away (`ditlab flops | head`): drop what is left, exit as SIGPIPE would."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush then goes nowhere
    except (OSError, ValueError):
        pass
    return BROKEN_PIPE_EXIT


BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a writer whose pipe was closed


def _add_flops(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="table of the 12 DiT configs: parameters, tokens, Gflops")
    p.add_argument("--image-size", type=int, default=256, help="image resolution in pixels (default 256)")
    p.add_argument("--latent-factor", type=int, default=8,
                   help="image pixels per latent pixel: 8 for the SD VAE, 1 in pixel space (default 8)")
    p.add_argument("--in-channels", type=int, default=4, help="latent channels (default 4)")
    p.add_argument("--block", default="adaln-zero", choices=BLOCKS, help="block design (default adaln-zero)")

    def run(args: argparse.Namespace) -> int:
        from ditlab.models.flops import flops_table

        print(flops_table(args.image_size, args.block, args.latent_factor, args.in_channels))
        return 0

    p.set_defaults(func=run)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from ditlab.training.config import TrainConfig

    p = sub.add_parser("train", help="train a DiT (the paper's recipe; run again to resume)",
                       description="Train a DiT. Run the same command on the same --results folder to resume; "
                                   "use `torchrun --nproc_per_node=N -m ditlab train ...` for many processes.")
    add_flags(p, TrainConfig)
    p.add_argument("--device", choices=DEVICES, default=None, help="default: cuda when available")

    def run(args: argparse.Namespace) -> int:
        from ditlab.training.loop import train

        summary = train(from_args(TrainConfig, args), device=args.device)
        if summary.get("rank", 0) == 0:
            print(f"trained to step {summary['step']} in {summary['seconds']:.1f}s; results in {summary['results']}")
        return 0

    p.set_defaults(func=run)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small DiT on the bundled digits on CPU, sample and judge it",
                       description="Trains a small DiT on scikit-learn's 8x8 digits (pixel space, CPU, a few "
                       "minutes), samples 200 class-balanced digits with guidance from DDPM-250, DDIM-50 and "
                       "DPM-Solver++(2M)-20, and writes samples.png, samples.npz and report.json.")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out; reruns reuse its training)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: the demo's 1500)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        from ditlab.demo import run_demo, summary_lines

        report = run_demo(args.out, max_steps=args.max_steps, progress=args.progress)
        print("\n".join(summary_lines(report, args.out)))
        return 0

    p.set_defaults(func=run)


def _add_extract_latents(sub: argparse._SubParsersAction) -> None:
    from ditlab.data.config import ExtractConfig

    p = sub.add_parser("extract-latents", help="encode an image folder once into a sharded latent cache",
                       description="Encode every image of an ImageNet-layout folder, and its horizontal flip, to "
                       "the posterior mean and std of the VAE, in shards that training memory-maps. Run the same "
                       "command again to resume; run it under torchrun to split the files across ranks.")
    add_flags(p, ExtractConfig)

    def run(args: argparse.Namespace) -> int:
        from ditlab.data.extract import run_extract

        run_extract(from_args(ExtractConfig, args))
        return 0

    p.set_defaults(func=run)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    from ditlab.sampling.config import SampleConfig

    p = sub.add_parser(
        "sample", help="sample a DiT checkpoint to a PNG grid or ADM's .npz (FID sets; torchrun splits the work)",
        description="Sample a DiT checkpoint: a ditlab checkpoint (its EMA weights by default), the authors' .pt "
        "(a bare state dict; the released DiT-XL-2-256x256.pt / DiT-XL-2-512x512.pt by name are fetched into "
        "$DITLAB_HOME), a diffusers DiT folder or a .safetensors file. "
        "`--classes 207 \"lesser panda\" ... --out grid.png` draws one image per class; `--num-samples 50000 --out "
        "samples.npz` writes ADM's format (arr_0 uint8 NHWC, arr_1 labels) with uniformly random classes, as "
        "the paper's FID-50K (--labels balanced: exactly N / K per class). The settings that made the images "
        "are recorded beside them (FILE.json, and in the .npz). Image i depends only on --seed and i: the "
        "batch size and the number of processes (`torchrun --nproc_per_node=N -m ditlab sample ...`) do not "
        "change it.")
    add_flags(p, SampleConfig)

    def run(args: argparse.Namespace) -> int:
        from ditlab.sampling.run import run_sample

        s = run_sample(from_args(SampleConfig, args))
        if s["rank"] == 0:
            print(f"{s['out']}: {s['images']} images {'x'.join(map(str, s['image_shape']))} in "
                  f"{s['seconds']:.1f}s ({s['images_per_s']:.3g} images/s on {s['processes']} process(es); "
                  f"{s['checkpoint_format']} checkpoint, {s['weights']} weights, vae {s['vae']})")
        return 0

    p.set_defaults(func=run)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a DiT checkpoint between ditlab, the authors', diffusers and "
                                       "safetensors formats",
                       description="Convert a DiT checkpoint (any format `ditlab sample` reads) to another: "
                       "'ditlab' (model_config + weights, what `ditlab sample` reads), 'original' (the authors' bare "
                       "state dict), 'diffusers' (a DiTTransformer2DModel folder) or 'safetensors' (one file, the "
                       "config in its metadata). Weights are copied bit for bit; the write is atomic.")
    p.add_argument("src", help="source checkpoint file or diffusers folder")
    p.add_argument("dst", help="destination file (or folder for --to diffusers)")
    p.add_argument("--to", required=True, choices=FORMATS, help="the format of DST")
    p.add_argument("--weights", default="ema", choices=WEIGHT_SETS,
                   help="which weights of a checkpoint that holds both (default ema)")
    p.add_argument("--model", default=None, help="named config for the authors' state dicts (see ditlab sample)")
    p.add_argument("--force", action="store_true", help="replace an existing DST")

    def run(args: argparse.Namespace) -> int:
        from ditlab.checkpoints.convert import convert

        ckpt = convert(args.src, args.dst, args.to, weights=args.weights, model=args.model, force=args.force)
        c = ckpt.config
        print(f"{args.src} ({ckpt.format}, {ckpt.weights} weights: depth {c['depth']}, hidden {c['hidden_size']}, "
              f"patch {c['patch_size']}, input {c['input_size']}) -> {args.dst} ({args.to})")
        return 0

    p.set_defaults(func=run)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="FID, sFID, IS, precision, recall of a sample batch, as ADM's evaluator has them")
    p.add_argument("samples", metavar="SAMPLES.npz", help="sample batch: arr_0 uint8 images (N, H, W, 3)")
    p.add_argument("ref", metavar="REF.npz",
                   help="reference batch: arr_0 images, and mu, sigma, mu_s, sigma_s if precomputed (ADM's files); "
                        "imagenet256 or imagenet512 fetch ADM's into $DITLAB_HOME; fashion-mnist judges the "
                        "samples with the Fashion-MNIST classifier (Frechet distance in its features, class "
                        "accuracy, precision, recall) against the 10,000 test images")
    p.add_argument("--inception", metavar="PATH", default=None,
                   help="InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth; default: torch hub's "
                        "checkpoints folder if there, else fetched into $DITLAB_HOME)")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception batch (default 64)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--out", metavar="FILE.json", default=None, help="also write the JSON to this file")

    def run(args: argparse.Namespace) -> int:
        import json

        from ditlab.evaluation.evaluate import evaluate
        from ditlab.runtime.files import atomic_write_text

        folder = os.path.dirname(os.path.abspath(args.out)) if args.out else None
        if folder and not os.path.isdir(folder):  # checked before a long evaluation, not after
            raise UserNotADirectoryError(f"--out {args.out}: folder {folder} does not exist")
        result = evaluate(args.samples, args.ref, args.inception, args.batch_size, args.device, sys.stderr.isatty())
        text = json.dumps(result, indent=2, allow_nan=False)  # strict JSON; evaluate refuses non-finite metrics
        print(text)
        for warning in result["warnings"]:
            print(f"ditlab eval: warning: {warning}", file=sys.stderr)
        if args.out:
            atomic_write_text(args.out, text + "\n")
        return 0

    p.set_defaults(func=run)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from ditlab.serve.command import add_serve

    add_serve(sub)


def _add_study(sub: argparse._SubParsersAction) -> None:
    from ditlab.study.cli import add_study

    add_study(sub)


SUBCOMMANDS = [_add_train, _add_extract_latents, _add_sample, _add_eval, _add_convert, _add_demo, _add_flops,
               _add_serve, _add_study]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ditlab", description="Diffusion Transformers: train, sample, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except UserError as e:  # a mistake of the user's: one line; anything else is a bug and shows its traceback
        if os.environ.get("DITLAB_TRACEBACK"):
            raise
        print(f"ditlab {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
