"""What an entry's model is: parameters, Gflops, tokens and its input, counted on the meta device
(the runner's entry records and the ablation's training cost both read it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ditlab.data.codecs import PIXEL
from ditlab.data.named import NAMED_DATA

if TYPE_CHECKING:
    from ditlab.study.entry import Entry

SD_VAE_DOWNSAMPLE = 8  # image pixels per latent pixel of the SD VAE (4 latent channels)


def model_facts(entry: Entry) -> dict[str, Any]:
    """Parameters, Gflops and tokens of the entry's DiT, counted on the meta device (no weights), and
    its input: the image's size and channels, and the DiT's input size (a latent's, or the image's)."""
    from ditlab.models import DiT, count_gflops

    t = entry.train
    named, pixel = NAMED_DATA.get(t["data"]), t.get("vae") == PIXEL
    image = t.get("image_size") or (named.image_size if named else 256)  # train's defaults: the data's own size
    size = image if named or pixel else image // SD_VAE_DOWNSAMPLE
    channels = named.channels if named else 3 if pixel else 4
    classes = t.get("num_classes") or (len(named.class_names) if named else 1000)
    with torch.device("meta"):
        model = DiT(input_size=size, patch_size=entry.patch_size, in_channels=channels, num_classes=classes,
                    block=entry.block, learn_sigma=entry.train_config(Path(), 1, False).learn_sigma, **entry.model,
                    **entry.options)  # fmt: skip
    return {"params": sum(p.numel() for p in model.parameters()), "gflops": count_gflops(model),
            "tokens": (size // entry.patch_size) ** 2, "input_size": size, "image_size": image,
            "channels": named.channels if named else 3}
