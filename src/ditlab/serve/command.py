"""The `ditlab serve` subcommand: its flags (the limits of `requests.Limits`) and its run."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ditlab.errors import UserError
from ditlab.flags import check_fields
from ditlab.serve.requests import Defaults, Limits

LOCALHOST = "127.0.0.1"
MAX_BATCH_WINDOW_MS = 10_000.0  # a request waits at most this long for others to share its batch
DEFAULT_PORT = 7860  # what Gradio demos use, so DiT users find it where they expect
LIMIT_HELP = {"max_steps": "most sampling steps a request may ask for",
              "max_images": "most images in one request, and in one model batch",
              "max_queue": "most requests waiting; past it requests get 503 with Retry-After",
              "max_body_bytes": "largest request body (413 past it)",
              "max_cfg_scale": "largest guidance scale"}


def add_serve(sub: argparse._SubParsersAction) -> None:
    from ditlab.options import PRECISIONS, WEIGHT_SETS

    p = sub.add_parser("serve", help="a sampling page and JSON API for a checkpoint, many users sharing batches",
                       description="Serve a page where one picks classes, guidance, sampler, steps and seed and gets "
                       "a grid, and a JSON API beside it (GET /api/info, POST /api/sample). Requests with the same "
                       "sampler, steps and guidance share model batches; every image is what it would be alone.")
    p.add_argument("--ckpt", required=True, help="checkpoint file or diffusers folder (any that `ditlab sample` reads)")
    p.add_argument("--model", default=None, help="named config for the authors' state dicts (see ditlab sample)")
    p.add_argument("--vae", default=None,
                   help="hub id, local AutoencoderKL folder, or 'pixel' (default: as ditlab sample)")
    p.add_argument("--weights", default="ema", choices=WEIGHT_SETS, help="default ema")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast of the DiT forward: auto = bf16 where the hardware does it well (default auto)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--host", default=LOCALHOST, help=f"address to listen on (default {LOCALHOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--guide-ckpt", default=None, metavar="PATH|NAME",
                   help="a guide model for autoguidance (as ditlab sample's --guide-ckpt); the page offers it")
    p.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="how long the oldest request waits for others to share its batch (default 20)")
    limits, defaults = Limits(), Defaults()
    for f in fields(Limits):
        value = getattr(limits, f.name)
        p.add_argument("--" + f.name.replace("_", "-"), type=type(value), default=value,
                       help=f"{LIMIT_HELP[f.name]} (default {value})")
    for f in fields(Defaults):
        value = getattr(defaults, f.name)
        shown = "the checkpoint's process's first: ddpm, or euler for a flow checkpoint" if value is None else value
        p.add_argument("--default-" + f.name.replace("_", "-"), type=str if value is None else type(value),
                       default=value, help=f"the page's initial {f.name} (default {shown})")
    p.set_defaults(func=run_serve)


def check_flags(args: argparse.Namespace) -> tuple[Limits, Defaults]:
    """The limits and defaults of the flags, or a one-line UserError naming the flag."""
    from ditlab.sampling.config import ALL_SAMPLERS

    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    defaults = Defaults(**{f.name: getattr(args, "default_" + f.name) for f in fields(Defaults)})
    check_fields(limits)  # finite numbers, the fields' bounds
    check_fields(defaults, prefix="--default-")
    for name in ("max_images", "max_queue", "max_body_bytes"):
        if getattr(limits, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(limits, name)} must be positive")
    checks = [(1 <= limits.max_steps <= 1000, f"--max-steps {limits.max_steps} must be between 1 and 1000"),
              (limits.max_cfg_scale >= 1, f"--max-cfg-scale {limits.max_cfg_scale} must be at least 1"),
              (0 <= args.port <= 65535, f"--port {args.port} is not a port number"),
              (0 <= args.batch_window_ms <= MAX_BATCH_WINDOW_MS,  # also false for nan
               f"--batch-window-ms {args.batch_window_ms} must be between 0 and {MAX_BATCH_WINDOW_MS}"),
              (defaults.sampler is None or defaults.sampler in ALL_SAMPLERS,
               f"--default-sampler {defaults.sampler}: choose one of {', '.join(ALL_SAMPLERS)}"),
              (1 <= defaults.steps <= limits.max_steps, f"--default-steps {defaults.steps} must be between 1 and "
               f"--max-steps {limits.max_steps}"),
              (1 <= defaults.per_class <= limits.max_images, f"--default-per-class {defaults.per_class} must be "
               f"between 1 and --max-images {limits.max_images}"),
              (0 <= defaults.cfg_scale <= limits.max_cfg_scale, f"--default-cfg-scale {defaults.cfg_scale} must be "
               f"between 0 and --max-cfg-scale {limits.max_cfg_scale}")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return limits, defaults


def run_serve(args: argparse.Namespace) -> int:
    limits, defaults = check_flags(args)
    try:
        import uvicorn

        from ditlab.serve.app import create_app
    except ImportError as e:
        raise UserError(f"ditlab serve needs the serve extra: pip install 'ditlab[serve]' ({e})") from e
    from ditlab.serve.engine import Engine

    engine = Engine(args.ckpt, vae=args.vae, weights=args.weights, model=args.model, precision=args.precision,
                    device=args.device, guide_ckpt=args.guide_ckpt)
    served = create_app(engine, limits, defaults, window_s=args.batch_window_ms / 1000)
    print(f"ditlab serve: {engine.name} from {args.ckpt} on {engine.device}; http://{args.host}:{args.port}/",
          flush=True)
    uvicorn.run(served.app, host=args.host, port=args.port, log_level="warning")
    return 0
