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


def _add_train(sub: argparse._SubParsersAction) -> None:
    from ditlab.training.config import PRECISIONS, TrainConfig

    d = TrainConfig(data="", results="")
    p = sub.add_parser("train", help="train a DiT (the paper's recipe; run again to resume)",
                       description="Train a DiT. Run the same command on the same --results folder to resume; "
                                   "use `torchrun --nproc_per_node=N -m ditlab train ...` for many processes.")
    p.add_argument("--data", required=True,
                   help="'digits' (bundled), an image folder (ImageNet layout) or a latent cache")
    p.add_argument("--results", required=True, help="results folder: checkpoints/, samples/, metrics.jsonl")
    p.add_argument("--model", default=d.model, help=f"named config (default {d.model})")
    for name in ("depth", "hidden_size", "num_heads", "patch_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help="override the named config")
    p.add_argument("--block", default=d.block, help="adaln-zero (default), adaln, cross-attn or in-context")
    p.add_argument("--image-size", type=int, default=d.image_size, help=f"image resolution (default {d.image_size})")
    p.add_argument("--vae", default=d.vae, help=f"VAE for image folders: hub id or local folder (default {d.vae})")
    p.add_argument("--num-classes", type=int, default=None, help="default: the dataset's; 0 = unconditional")
    p.add_argument("--global-batch-size", type=int, default=d.global_batch_size,
                   help=f"summed over processes (default {d.global_batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate, constant (default {d.lr})")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=f"default {d.max_steps}")
    p.add_argument("--epochs", type=int, default=None,
                   help="stop after this many epochs (with --max-steps: whichever comes first)")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help=f"default {d.ckpt_every}")
    p.add_argument("--keep-last", type=int, default=d.keep_last, help="keep the newest K checkpoints (0 = all)")
    p.add_argument("--sample-every", type=int, default=d.sample_every,
                   help=f"write an EMA sample grid every N steps; 0 = never (default {d.sample_every})")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps,
                   help=f"DDPM steps of the grids (default {d.sample_steps})")
    p.add_argument("--log-every", type=int, default=d.log_every, help=f"default {d.log_every}")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto = bf16 autocast where the hardware does it well, else fp32")
    p.add_argument("--num-workers", type=int, default=d.num_workers,
                   help=f"data loader workers (default {d.num_workers})")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help=f"default {d.ema_decay}")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm (default: off, as the paper)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 per block instead of DDP")
    p.add_argument("--no-learn-sigma", dest="learn_sigma", action="store_false", help="epsilon-only model, MSE loss")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from ditlab.training import TrainConfig, train

    fields = {k: v for k, v in vars(args).items() if k not in ("func", "command", "device")}
    summary = train(TrainConfig(**fields), device=args.device)
    if summary.get("rank", 0) == 0:
        print(f"trained to step {summary['step']} in {summary['seconds']:.1f}s; results in {summary['results']}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small DiT on the bundled digits on CPU, sample and judge it",
                       description="Trains a small DiT on scikit-learn's 8x8 digits (pixel space, CPU, a few "
                       "minutes), samples 200 class-balanced digits with guidance from DDPM-250, DDIM-50 and "
                       "DPM-Solver++(2M)-20, and writes samples.png, samples.npz and report.json.")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out; reruns reuse its training)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: the demo's 1500)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from ditlab.demo import run_demo, summary_lines

    report = run_demo(args.out, max_steps=args.max_steps, progress=args.progress)
    print("\n".join(summary_lines(report, args.out)))
    return 0


def _add_extract_latents(sub: argparse._SubParsersAction) -> None:
    from ditlab.training.config import PRECISIONS

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
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="VAE compute precision; auto is fp16 on CUDA, fp32 on CPU (default auto)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="storage dtype of mean and std (default float16)")

    def run(args: argparse.Namespace) -> int:
        from ditlab.data.extract import extract_latents

        extract_latents(args.data, args.out, image_size=args.image_size, vae=args.vae, batch_size=args.batch_size,
                        skip_bad_files=args.skip_bad_files, shard_size=args.shard_size,
                        num_workers=args.num_workers, precision=args.precision, dtype=args.dtype)
        return 0

    p.set_defaults(func=run)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    from ditlab.checkpoints import WEIGHT_SETS
    from ditlab.diffusion.samplers import SAMPLERS
    from ditlab.training.config import PRECISIONS

    p = sub.add_parser(
        "sample", help="sample a DiT checkpoint to a PNG grid or ADM's .npz (FID sets; torchrun splits the work)",
        description="Sample a DiT checkpoint: a ditlab checkpoint (its EMA weights by default), the authors' .pt "
        "(a bare state dict, e.g. DiT-XL-2-256x256.pt), a diffusers DiT folder or a .safetensors file. "
        "`--classes 207 360 ... --out grid.png` draws one image per class; `--num-samples 50000 --out "
        "samples.npz` writes ADM's format (arr_0 uint8 NHWC, arr_1 labels) with uniformly random classes, as "
        "the paper's FID-50K. Image i depends only on --seed and i: the batch size and the number of "
        "processes (`torchrun --nproc_per_node=N -m ditlab sample ...`) do not change it.")
    p.add_argument("--ckpt", required=True, help="checkpoint file or diffusers folder")
    p.add_argument("--model", default=None,
                   help="named config, e.g. DiT-XL/2: gives the authors' state dicts their number of heads; "
                        "checked against the weights")
    p.add_argument("--image-size", type=int, default=None,
                   help="image resolution, checked against the checkpoint (default: the checkpoint's)")
    p.add_argument("--vae", default=None,
                   help="hub id, local AutoencoderKL folder, or 'pixel' (default: the codec a ditlab checkpoint was "
                        "trained with, pixel for digits, else stabilityai/sd-vae-ft-ema)")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class labels: one image each, or with --num-samples cycled through")
    p.add_argument("--num-samples", type=int, default=None, help="number of images (classes uniformly random)")
    p.add_argument("--out", required=True, help="FILE.png (one grid) or FILE.npz (ADM's sample format)")
    p.add_argument("--png-dir", default=None, help="also write every image as PNG_DIR/{index:06d}.png")
    p.add_argument("--steps", type=int, default=250, help="sampling steps, respaced evenly (default 250, the paper's)")
    p.add_argument("--sampler", default="ddpm", choices=list(SAMPLERS),
                   help="ddpm (ancestral, the paper's), ddim, or dpm++2m (20-25 steps) (default ddpm)")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale; 1.0 = none (default). The paper's FID-50K uses 1.5, its "
                        "figures 4.0")
    p.add_argument("--guidance-channels", type=int, default=None,
                   help="guide only the first K latent channels; 3 reproduces the reference code and its "
                        "published FID (default: all)")
    p.add_argument("--seed", type=int, default=0, help="image i is drawn from seed and i alone (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass, per process (default 32)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast of the DiT forward: auto = bf16 on CUDA, fp32 on CPU (default auto); the "
                        "diffusion maths stay fp32, the VAE runs in fp32 unless bf16/fp16 is asked for")
    p.add_argument("--weights", default="ema", choices=WEIGHT_SETS,
                   help="EMA or raw weights, for checkpoints that hold both (default ema)")
    p.add_argument("--nrow", type=int, default=None, help="images per row of a .png grid (default 8)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        from ditlab.sample_run import sample_to_files

        kwargs = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
        summary = sample_to_files(**kwargs)
        if summary["rank"] == 0:
            print(f"{summary['out']}: {summary['images']} images {'x'.join(map(str, summary['image_shape']))} in "
                  f"{summary['seconds']:.1f}s ({summary['images_per_s']:.3g} images/s on {summary['processes']} "
                  f"process(es); {summary['checkpoint_format']} checkpoint, {summary['weights']} weights, "
                  f"vae {summary['vae']})")
        return 0

    p.set_defaults(func=run)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from ditlab.checkpoints import FORMATS, WEIGHT_SETS

    p = sub.add_parser("convert", help="convert a DiT checkpoint between ditlab, the authors', diffusers and "
                                       "safetensors formats",
                       description="Convert a DiT checkpoint (any format `ditlab sample` reads) to another: "
                       "'ditlab' (model_config + weights, what `ditlab sample` reads), 'original' (the authors' bare "
                       "state dict), 'diffusers' (a DiTTransformer2DModel folder) or 'safetensors' (one file, the "
                       "config in its metadata). Weights are copied bit for bit; the write is atomic.")
    p.add_argument("src", help="source checkpoint file or diffusers folder")
    p.add_argument("dst", help="destination file (or folder for --to diffusers)")
    p.add_argument("--to", required=True, choices=FORMATS,
                   help="the format of DST")
    p.add_argument("--weights", default="ema", choices=WEIGHT_SETS,
                   help="which weights of a checkpoint that holds both (default ema)")
    p.add_argument("--model", default=None, help="named config for the authors' state dicts (see ditlab sample)")
    p.add_argument("--force", action="store_true", help="replace an existing DST")

    def run(args: argparse.Namespace) -> int:
        from ditlab.checkpoint_writers import convert

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
                   help="reference batch: arr_0 images, and mu, sigma, mu_s, sigma_s if precomputed (ADM's files)")
    p.add_argument("--inception", metavar="PATH", default=None,
                   help="InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth; default: torch hub's "
                        "checkpoints folder)")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception batch (default 64)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--out", metavar="FILE.json", default=None, help="also write the JSON to this file")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json
    import os

    from ditlab.atomic import atomic_write_text
    from ditlab.evaluation.evaluate import evaluate

    folder = os.path.dirname(os.path.abspath(args.out)) if args.out else None
    if folder and not os.path.isdir(folder):  # checked before a long evaluation, not after
        raise NotADirectoryError(f"--out {args.out}: folder {folder} does not exist")
    result = evaluate(args.samples, args.ref, args.inception, args.batch_size, args.device, sys.stderr.isatty())
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


def _add_study(sub: argparse._SubParsersAction) -> None:
    from ditlab.study.cli import add_study

    add_study(sub)


SUBCOMMANDS = [_add_train, _add_extract_latents, _add_sample, _add_eval, _add_convert, _add_demo, _add_flops,
               _add_study]


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
        from ditlab.errors import one_line

        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else one_line(e)
        print(f"ditlab {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
