"""The names of a checkpoint's classes, for the page's class picker and the API: those of
`ditlab.data.classes`, the one home of class names that sampling uses too (ImageNet's in DiT's
label order, a checkpoint's stored names, its training data's, or the ids)."""

from __future__ import annotations

from ditlab.data.classes import IMAGENET_CLASSES, SYNSET_ID, class_names, imagenet_synsets

__all__ = ["IMAGENET_CLASSES", "SYNSET_ID", "class_names", "imagenet_synsets"]
