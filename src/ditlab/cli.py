"""The `ditlab` command line: one console script with a subcommand per task.

Each subcommand's flags live here, with the paper's defaults; its work is imported only when
it runs, so `ditlab --help` is instant. A user error ends with one line on stderr and exit 2
(set DITLAB_TRACEBACK=1 to see the traceback)."""

from __future__ import annotations

import argparse
import os
import sys


def _add_flops(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="table of the 12 DiT configs: parameters, tokens, Gflops")
    p.add_argument("--image-size", type=int, default=256, help="image resolution in pixels (default 256)")
    p.add_argument("--latent-factor", type=int, default=8,
                   help="image pixels per latent pixel: 8 for the SD VAE, 1 in pixel space (default 8)")
    p.add_argument("--in-channels", type=int, default=4, help="latent channels (default 4)")
    p.add_argument("--block", default="adaln-zero", help="block design (default adaln-zero)")
    p.set_defaults(func=_run_flops)


def _run_flops(args: argparse.Namespace) -> int:
    from ditlab.models.report import flops_table

    print(flops_table(args.image_size, args.block, args.latent_factor, args.in_channels))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the quick start's demo")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from ditlab.models.report import flops_table

    print(flops_table(256, "adaln-zero", 8, 4))
    return 0


def _add_extract_latents(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract-latents", help="encode an image folder once into a sharded latent cache",
                       description="Encode every image of an ImageNet-layout folder, and its horizontal flip, to "
                       "the posterior mean and std of the VAE, in shards that training memory-maps. Run the same "
                       "command again to resume; run it under torchrun to split the files across ranks.")
    p.add_argument("--data", required=True, help="image folder in the ImageNet layout: DATA/<class>/<image>")
    p.add_argument("--out", required=True, help="latent cache folder (created; an interrupted run resumes into it)")
    p.add_argument("--image-size", type=int, default=256, help="ADM center crop size in pixels (default 256)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="hub id, local folder (AutoencoderKL.save_pretrained), or 'pixel' (default "
                        "stabilityai/sd-vae-ft-ema)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per VAE call, each encoded with its flip (default 32)")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="skip unreadable images and list them at the end (default: stop at the first one)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard file (default 1000)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="image decoding processes per rank (default min(8, CPUs / ranks))")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="VAE compute precision; auto is fp16 on CUDA, fp32 on CPU (default auto)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="storage dtype of mean and std (default float16)")

    def run(args: argparse.Namespace) -> int:
        from ditlab.data.extract import run_extract_latents

        return run_extract_latents(args)

    p.set_defaults(func=run)


SUBCOMMANDS = [_add_flops, _add_demo, _add_extract_latents]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditlab", description="Diffusion Transformers: train, sample, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError) as e:
        if os.environ.get("DITLAB_TRACEBACK"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"ditlab {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
