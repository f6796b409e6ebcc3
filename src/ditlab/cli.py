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


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="FID, sFID, IS, precision, recall of a sample batch, as ADM's evaluator has them")
    p.add_argument("samples", metavar="SAMPLES.npz", help="sample batch: arr_0 uint8 images (N, H, W, 3)")
    p.add_argument("ref", metavar="REF.npz",
                   help="reference batch: arr_0 images, and mu, sigma, mu_s, sigma_s if precomputed (ADM's files)")
    p.add_argument("--inception", metavar="PATH", default=None,
                   help="InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth; default: torch hub's "
                        "checkpoints folder)")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception batch (default 64)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--out", metavar="FILE.json", default=None, help="also write the JSON to this file")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from ditlab.evaluation.evaluate import run_eval

    print(run_eval(args.samples, args.ref, args.inception, args.batch_size, args.device, args.out, sys.stderr.isatty()))
    return 0


SUBCOMMANDS = [_add_flops, _add_demo, _add_eval]


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
