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

from ditlab.errors import UserError, one_line
from ditlab.flags import add_flags, from_args
from ditlab.options import BLOCK_OPTIONS, BLOCKS, DEVICES, FEATURE_SETS, FORMATS, OBJECTIVES, WEIGHT_SETS


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
    for name, choices in BLOCK_OPTIONS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=choices[0], choices=choices,
                       help=f"block option (default {choices[0]}; of these only swiglu changes the count)")

    def run(args: argparse.Namespace) -> int:
        from ditlab.models.flops import flops_table

        options = {k: getattr(args, k) for k, choices in BLOCK_OPTIONS.items() if getattr(args, k) != choices[0]}
        print(flops_table(args.image_size, args.block, args.latent_factor, args.in_channels, **options))
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
                       "DPM-Solver++(2M)-20 (--objective flow: Euler-100, Heun-25, Euler-Maruyama-100), and writes "
                       "samples.png, samples.npz and report.json.")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out; reruns reuse its training)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: the demo's 1500)")
    p.add_argument("--objective", default="ddpm", choices=OBJECTIVES,
                   help="ddpm (the paper's, default) or flow (SiT's flow matching)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        from ditlab.demo import run_demo, summary_lines

        report = run_demo(args.out, max_steps=args.max_steps, progress=args.progress, objective=args.objective)
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
        from ditlab.checkpoints.convert import convert, process_dropped

        ckpt = convert(args.src, args.dst, args.to, weights=args.weights, model=args.model, force=args.force)
        c = ckpt.config
        print(f"{args.src} ({ckpt.format}, {ckpt.weights} weights: depth {c['depth']}, hidden {c['hidden_size']}, "
              f"patch {c['patch_size']}, input {c['input_size']}) -> {args.dst} ({args.to})")
        dropped = process_dropped(ckpt, args.to)
        if dropped:
            print(f"ditlab convert: warning: the {args.to} format cannot record objective {dropped!r}: sample "
                  f"{args.dst} with `ditlab sample --objective {dropped}`", file=sys.stderr)
        return 0

    p.set_defaults(func=run)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="FID, sFID, IS, precision, recall (ADM's evaluator), FD-DINOv2 of a sample batch",
                       description="`ditlab eval SAMPLES.npz REF.npz` computes ADM's five Inception metrics and, with "
                       "--features inception,dinov2, FD-DINOv2 with precision and recall in DINOv2's feature space "
                       "(EDM2's protocol). `ditlab eval --save-ref OUT.npz IMAGES` makes a reference batch once from "
                       "real images (a folder, an .npz, imagenet256/imagenet512), with the statistics of --features.")
    p.add_argument("samples", metavar="SAMPLES.npz", help="sample batch: arr_0 uint8 images (N, H, W, 3); with "
                   "--save-ref, the real images instead: a folder (ImageNet layout), an .npz, imagenet256, imagenet512")
    p.add_argument("ref", metavar="REF.npz", nargs="?", default=None,
                   help="reference batch: arr_0 images, and mu, sigma, mu_s, sigma_s if precomputed (ADM's files) and "
                        "the DINOv2 features of --save-ref; imagenet256 or imagenet512 fetch ADM's into $DITLAB_HOME; "
                        "digits: the digits judge's accuracy and Frechet distance instead; fashion-mnist: the "
                         "Fashion-MNIST classifier's Frechet distance, class accuracy, precision and recall against "
                         "its 10,000 test images")
    p.add_argument("--features", default="inception", metavar="inception,dinov2",
                   help=f"feature spaces, comma-separated, of {', '.join(FEATURE_SETS)} (default inception): "
                        "dinov2 adds fd_dinov2, precision_dinov2, recall_dinov2")
    p.add_argument("--inception", metavar="PATH", default=None,
                   help="InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth; default: torch hub's "
                        "checkpoints folder if there, else fetched into $DITLAB_HOME)")
    p.add_argument("--dinov2", metavar="PATH|NAME", default=None,
                   help="DINOv2 weights in the official layout, any size (default: dinov2_vitl14_pretrain.pth, "
                        "FD-DINOv2's ViT-L/14, fetched into $DITLAB_HOME; other released names: "
                        "dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth)")
    p.add_argument("--save-ref", metavar="OUT.npz", default=None,
                   help="write a reference batch from the images SAMPLES names (never overwritten: an OUT that "
                        "already holds the statistics of --features is used as it is)")
    p.add_argument("--image-size", type=int, default=None,
                   help="with --save-ref from a folder: ADM's center crop to this size (default 256)")
    p.add_argument("--batch-size", type=int, default=64, help="images per network batch (default 64)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--out", metavar="FILE.json", default=None, help="also write the JSON to this file")

    def run(args: argparse.Namespace) -> int:
        import json

        from ditlab.runtime.files import atomic_write_text, check_output_file

        if args.out:  # checked before a long evaluation, not after
            check_output_file(args.out, "--out")
        if args.save_ref:
            if args.ref is not None:
                raise UserError(f"--save-ref takes one IMAGES argument, got {args.samples} and {args.ref}")
            check_output_file(args.save_ref, "--save-ref")
            from ditlab.evaluation.reference import save_ref

            result = save_ref(args.save_ref, args.samples, args.features, args.image_size, args.inception,
                              args.dinov2, args.batch_size, args.device, sys.stderr.isatty())
        else:
            if args.ref is None:
                raise UserError("give SAMPLES.npz and REF.npz (or --save-ref OUT.npz IMAGES)")
            if args.image_size is not None:
                raise UserError("--image-size is for --save-ref from a folder of images")
            from ditlab.evaluation.evaluate import evaluate

            result = evaluate(args.samples, args.ref, args.inception, args.batch_size, args.device,
                              sys.stderr.isatty(), args.features, args.dinov2)
        text = json.dumps(result, indent=2, allow_nan=False)  # strict JSON; evaluate refuses non-finite metrics
        print(text)
        for warning in result.get("warnings", []):
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
