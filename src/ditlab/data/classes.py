"""Class names: ImageNet-1k's in DiT's label order, a checkpoint's own, and `--classes` values
(ids or names) resolved to labels.

ImageNet labels are the sorted synset order of the train folders, which is what DiT was trained
with; `imagenet_classes.tsv` holds one line per label: synset id, tab, its WordNet lemmas
("lesser panda, red panda, panda, ..."). A ditlab checkpoint stores its training data's class
names (an image folder's or a latent cache's class folder names, "0".."9" for the digits); older
ones are named after their data where it is still readable. Light: no torch."""

from __future__ import annotations

import difflib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from ditlab.errors import UserError

IMAGENET_CLASSES = 1000
IMAGENET_FILE = "imagenet_classes.tsv"  # one line per class: synset id, tab, its WordNet lemmas
SYNSET_ID = re.compile(r"n\d{8}")
CLOSEST = 3  # close matches named by the error for an unknown class


def imagenet_synsets() -> list[tuple[str, str]]:
    """The 1000 (synset id, "lemma, lemma, ...") pairs of ImageNet-1k, in label order."""
    text = resources.files("ditlab.data").joinpath(IMAGENET_FILE).read_text(encoding="utf-8")
    rows = [line.split("\t", 1) for line in text.splitlines() if line]
    return [(wnid, lemmas) for wnid, lemmas in rows]


def imagenet_names() -> list[str]:
    """ImageNet-1k's 1000 display names ("tench, Tinca tinca", ...), index = DiT's label."""
    return [lemmas for _, lemmas in imagenet_synsets()]


def training_class_names(train_config: dict[str, Any] | None) -> list[str] | None:
    """The class names of a `ditlab train` run's data, where they can still be read (checkpoints
    older than the stored `class_names`)."""
    from ditlab.data.images import scan_image_folder
    from ditlab.data.latents import INDEX_NAME

    if not train_config:
        return None
    from ditlab.data.named import NAMED_DATA

    data = str(train_config.get("data", ""))
    if data in NAMED_DATA:
        return list(NAMED_DATA[data].class_names)
    root = Path(data)
    try:
        if (root / INDEX_NAME).is_file():
            return list(json.loads((root / INDEX_NAME).read_text())["classes"])
        if root.is_dir():
            return scan_image_folder(str(root))[0]
    except (OSError, ValueError, KeyError):
        return None
    return None


def class_names(num_classes: int, train_config: dict[str, Any] | None = None,
                stored: list[str] | None = None) -> list[str]:
    """num_classes display names, index = label (empty for an unconditional model): the names a
    checkpoint stores, else its training data's, else ImageNet's for 1000 classes, else the ids.
    Synset-id folders of ImageNet get their lemmas."""
    if num_classes == 0:
        return []
    names = stored if stored is not None and len(stored) == num_classes else training_class_names(train_config)
    if names is not None and len(names) == num_classes:
        if num_classes == IMAGENET_CLASSES and all(SYNSET_ID.fullmatch(n) for n in names):
            lemmas = dict(imagenet_synsets())
            return [lemmas.get(n, n) for n in names]
        return list(names)
    if num_classes == IMAGENET_CLASSES:
        return imagenet_names()
    return [str(i) for i in range(num_classes)]


def _parts(name: str) -> list[str]:
    """A name and its comma-separated lemmas, lower case: "lesser panda, red panda" -> 3 strings."""
    low = name.strip().lower()
    return [low, *(p.strip() for p in low.split(",") if p.strip())]


def class_id(value: str | int, names: list[str], flag: str = "--classes") -> int:
    """The label of one class given as its id ("207") or its name, case-insensitive: the full name,
    one of its comma-separated lemmas, or an unambiguous prefix of one. An unknown or ambiguous
    name raises a one-line UserError naming the closest matches (with their ids)."""
    text = str(value).strip()
    if text.isdigit():
        if int(text) < len(names):
            return int(text)
        raise UserError(f"{flag} {text}: not a class id (0 to {len(names) - 1})")
    key = text.lower()
    parts = [_parts(n) for n in names]
    hits = [i for i, p in enumerate(parts) if key in p]
    hits = hits or [i for i, p in enumerate(parts) if any(q.startswith(key) for q in p)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        shown = ", ".join(f"{names[i]!r} ({i})" for i in hits[:2 * CLOSEST])
        raise UserError(f"{flag} {text!r}: names {len(hits)} classes: {shown}; give more of the name or the id")
    lemmas = {q: i for i, p in enumerate(parts) for q in p[1:] or p[:1]}
    close = difflib.get_close_matches(key, list(lemmas), n=CLOSEST, cutoff=0.5)
    hint = f"; closest: {', '.join(f'{q!r} ({lemmas[q]})' for q in close)}" if close else ""
    raise UserError(f"{flag} {text!r}: no such class{hint}")


def class_ids(values: list[str] | list[int], names: list[str], flag: str = "--classes") -> list[int]:
    """`class_id` of each value."""
    return [class_id(v, names, flag) for v in values]
