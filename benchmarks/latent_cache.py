"""Latent-cache loading rate beside its peer, online VAE encoding, and beside what training
consumes. Each rate is samples/s of training latents (N, 4, 32, 32) ready on the device:

- cache: LatentCacheDataset (float16 shards, memory-mapped) -> DataLoader -> sample_latents;
- online (the peer): JPEG decode + ADM crop -> random flip -> SD VAE encode (its architecture,
  random weights) -> posterior sample, as a trainer without a cache does every step;
- decode only: the JPEG decode + crop of the online path without the VAE (its floor);
- consumer: forward + backward of a DiT (default DiT-XL/2) on the same device, which is what a
  training step needs per sample (the optimizer step excluded).

    PYTHONPATH=src python benchmarks/latent_cache.py [--cache-samples 8192 --online-images 32 --model DiT-XL/2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from data_common import device_name, make_jpeg_folder, make_sd_vae_folder  # noqa: E402
from dit_common import sync, write_result  # noqa: E402

from ditlab.data import ImageFolderDataset, LatentCacheDataset, sample_latents  # noqa: E402
from ditlab.data.codecs import load_codec  # noqa: E402
from ditlab.data.latents import write_index, write_shard  # noqa: E402

LATENT = (4, 32, 32)  # 256x256 images through the SD VAE


def synthetic_cache(root: str, n: int, shard_size: int = 1000) -> str:
    """A float16 cache of n random latents in the exact format extract-latents writes."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    metas = []
    for k, start in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - start)
        mean = rng.standard_normal((m, 2, *LATENT), dtype=np.float32).astype(np.float16)
        std = np.full((m, 2, *LATENT), 0.01, dtype=np.float16)
        meta = {"labels": [int(i % 1000) for i in range(start, start + m)], "paths": [f"x/{i}.jpg" for i in
                range(start, start + m)], "skipped": []}
        write_shard(root, k, mean, std, meta)
        metas.append({**meta, "count": m})
    settings = {"image_size": 256, "codec": "synthetic", "dtype": "float16", "latent_shape": list(LATENT),
                "shard_size": shard_size, "classes": [str(i) for i in range(1000)], "data_root": ""}
    write_index(root, settings, metas)
    return root


def _timed(batches, step, warmup: int = 1) -> float:
    """Samples/s of step(batch) over the batches after `warmup` (which pay worker start-up)."""
    count, start = 0, None
    for i, batch in enumerate(batches):
        n = step(batch)
        if i + 1 == warmup:
            start = time.perf_counter()
        elif i + 1 > warmup:
            count += n
    if not count:
        raise SystemExit(f"latent_cache.py: nothing timed after {warmup} warm-up batch(es): give more samples "
                         "than one batch (--cache-samples, --online-images)")
    return count / (time.perf_counter() - start)


def cache_rate(root: str, device: torch.device, batch_size: int, workers: int) -> float:
    ds = LatentCacheDataset(root)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True)
    g = torch.Generator(device).manual_seed(0)

    def step(batch):
        mean, std, _ = batch
        x = sample_latents(mean.to(device, non_blocking=True), std.to(device, non_blocking=True), g)
        sync(device)
        return len(x)

    return _timed(loader, step)


def online_rate(data: str, vae_dir: str | None, device: torch.device, batch_size: int, workers: int) -> float:
    ds = ImageFolderDataset(data, 256)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True)
    codec = None
    if vae_dir:
        codec = load_codec(vae_dir, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    g = torch.Generator(device).manual_seed(0)

    def step(batch):
        x = batch[0].to(device, non_blocking=True)  # (B, 3, 256, 256)
        flip = torch.rand(len(x), generator=g, device=device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if codec is not None:
            mean, std = codec.encode(x)
            x = mean + std * torch.randn(mean.shape, generator=g, device=device)
        sync(device)
        return len(x)

    return _timed(loader, step)


def consumer_rate(model_name: str, device: torch.device, batch_size: int, steps: int = 3) -> float:
    import ditlab

    model = ditlab.create_model(model_name, input_size=LATENT[1], in_channels=LATENT[0]).to(device).train()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(batch_size, *LATENT, device=device)
    t = torch.randint(0, 1000, (batch_size,), device=device)
    y = torch.randint(0, 1000, (batch_size,), device=device)

    def step(_):
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = model(x, t, y)
        out.float().square().mean().backward()
        sync(device)
        return batch_size

    return _timed(range(steps + 1), step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-samples", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=256, help="cache batch size (the paper's global batch)")
    p.add_argument("--online-images", type=int, default=32)
    p.add_argument("--online-batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--model", default="DiT-XL/2", help="the consumer; 'none' to skip it")
    p.add_argument("--model-batch-size", type=int, default=8)
    p.add_argument("--workdir", default=None, help="keep images and VAE here between runs (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        cache = synthetic_cache(os.path.join(tmp, "cache"), args.cache_samples)
        data = make_jpeg_folder(os.path.join(work, "images"), args.online_images)
        vae_dir = make_sd_vae_folder(os.path.join(work, "sd-vae-random"))
        rates = {
            "cache_workers_0": cache_rate(cache, device, args.batch_size, 0),
            f"cache_workers_{args.num_workers}": cache_rate(cache, device, args.batch_size, args.num_workers),
            "online_vae_encoding": online_rate(data, vae_dir, device, args.online_batch_size, args.num_workers),
            "decode_and_crop_only": online_rate(data, None, device, args.online_batch_size, args.num_workers),
        }
        if args.model != "none":
            rates[f"consumer_{args.model}_fwd_bwd"] = consumer_rate(args.model, device, args.model_batch_size)
    best_cache = max(v for k, v in rates.items() if k.startswith("cache"))
    result = {
        "benchmark": "latent_cache",
        "device": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "latent_shape": list(LATENT),
        "storage_dtype": "float16",
        "cache_samples": args.cache_samples,
        "samples_per_s": rates,
        "ratio_cache_to_online": best_cache / rates["online_vae_encoding"],
        "ratio_cache_to_decode_only": best_cache / rates["decode_and_crop_only"],
        "note": "cache read from the page cache (just written); the online path uses the SD VAE architecture with "
                "random weights in fp32 on CPU, fp16 on CUDA",
    }
    if args.model != "none":
        result["ratio_cache_to_consumer"] = best_cache / rates[f"consumer_{args.model}_fwd_bwd"]
    write_result(result, args.out)


if __name__ == "__main__":
    main()
