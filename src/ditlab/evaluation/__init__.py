"""Evaluation as ADM computes it: the TF-graph InceptionV3, FID / sFID / IS / precision / recall,
and ADM's .npz sample and reference batches; DINOv2 for FD-DINOv2 (EDM2's protocol) and REPA."""

from ditlab.evaluation.batches import NpzImages, load_stats, save_reference, save_samples
from ditlab.evaluation.dinov2 import DinoVisionTransformer, load_dinov2
from ditlab.evaluation.evaluate import evaluate, extract_features
from ditlab.evaluation.inception import InceptionV3, default_weights_path, load_inception
from ditlab.evaluation.metrics import (
    FeatureStats,
    feature_stats,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)

__all__ = [
    "DinoVisionTransformer",
    "FeatureStats",
    "InceptionV3",
    "NpzImages",
    "default_weights_path",
    "evaluate",
    "extract_features",
    "feature_stats",
    "frechet_distance",
    "inception_score",
    "load_dinov2",
    "load_inception",
    "load_stats",
    "manifold_radii",
    "precision_recall",
    "save_reference",
    "save_samples",
]
