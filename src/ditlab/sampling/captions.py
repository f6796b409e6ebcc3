"""Captions under the images of a grid (`ditlab sample --captions`): each image gets a strip
below it with its class name, cut to the image's width."""

from __future__ import annotations

import numpy as np

CAPTION_HEIGHT = 14  # pixels of the strip under each image, for PIL's default font
CAPTION_MARGIN = 2


def captioned(images: np.ndarray, captions: list[str]) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, H + CAPTION_HEIGHT, W, C): image i over a white strip with captions[i]
    in black, shortened (with "...") to fit the width."""
    from PIL import Image, ImageDraw, ImageFont

    n, h, w, c = images.shape
    if len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images")
    font = ImageFont.load_default()
    out = np.full((n, h + CAPTION_HEIGHT, w, c), 255, dtype=np.uint8)
    out[:, :h] = images
    for i, text in enumerate(captions):
        strip = Image.new("L", (w, CAPTION_HEIGHT), 255)
        draw = ImageDraw.Draw(strip)
        text = _fit(draw, font, text, w - 2 * CAPTION_MARGIN)
        draw.text((CAPTION_MARGIN, 1), text, fill=0, font=font)
        out[i, h:] = np.asarray(strip)[:, :, None]  # (CAPTION_HEIGHT, W, 1) broadcast over channels
    return out


def _fit(draw, font, text: str, width: int) -> str:
    """`text`, or its longest prefix plus "..." that fits `width` pixels (empty if nothing does)."""
    if draw.textlength(text, font=font) <= width:
        return text
    for end in range(len(text) - 1, 0, -1):
        if draw.textlength(text[:end] + "...", font=font) <= width:
            return text[:end] + "..."
    return ""
