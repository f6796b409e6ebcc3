"""The names of a checkpoint's classes, for the page's class picker and the API.

ImageNet models (1000 classes) get ImageNet's names: WordNet synsets in sorted id order, which is
the label order of DiT's training (the sorted train folders). A ditlab checkpoint names its
classes after its training data where that is still readable: "0" ... "9" for the digits, the
class folder names of an image folder, the `classes` of a latent cache's index (folders named
by synset id get their ImageNet names). Anything else shows the class ids."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

IMAGENET_CLASSES = 1000
IMAGENET_FILE = "imagenet_classes.tsv"  # one line per class: synset id, tab, its WordNet lemmas
SYNSET_ID = re.compile(r"n\d{8}")


def imagenet_synsets() -> list[tuple[str, str]]:
    """The 1000 (synset id, "lemma, lemma, ...") pairs of ImageNet-1k, in label order."""
    text = resources.files("ditlab.serve").joinpath(IMAGENET_FILE).read_text(encoding="utf-8")
    rows = [tuple(line.split("\t", 1)) for line in text.splitlines() if line]
    return [(wnid, lemmas) for wnid, lemmas in rows]


def _training_classes(train_config: dict[str, Any] | None) -> list[str] | None:
    """The class names of a `ditlab train` run's data, where they can still be read."""
    from ditlab.data.images import scan_image_folder
    from ditlab.data.latents import INDEX_NAME

    if not train_config:
        return None
    data = str(train_config.get("data", ""))
    if data == "digits":
        from ditlab.data.digits import DIGITS_CLASSES

        return [str(i) for i in range(DIGITS_CLASSES)]
    root = Path(data)
    try:
        if (root / INDEX_NAME).is_file():
            return list(json.loads((root / INDEX_NAME).read_text())["classes"])
        if root.is_dir():
            return scan_image_folder(str(root))[0]
    except (OSError, ValueError, KeyError):
        return None
    return None


def class_names(num_classes: int, train_config: dict[str, Any] | None = None) -> list[str]:
    """num_classes display names, index = label (empty for an unconditional model)."""
    if num_classes == 0:
        return []
    names = _training_classes(train_config)
    if names is not None and len(names) == num_classes:
        if num_classes == IMAGENET_CLASSES and all(SYNSET_ID.fullmatch(n) for n in names):
            lemmas = dict(imagenet_synsets())
            return [lemmas.get(n, n) for n in names]
        return names
    if num_classes == IMAGENET_CLASSES:
        return [lemmas for _, lemmas in imagenet_synsets()]
    return [str(i) for i in range(num_classes)]
