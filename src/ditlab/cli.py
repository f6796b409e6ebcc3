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


SUBCOMMANDS = [_add_flops, _add_demo]


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
