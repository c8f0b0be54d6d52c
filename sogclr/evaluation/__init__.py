"""What a trained encoder is worth, and what the objective is.

features     frozen-encoder features, sharded over ranks, cached across attempts
knn          the kNN monitor of pretraining
diagnostics  exact global objectives on fixed views, and the bias of mini-batch gradients
"""

from sogclr.evaluation.diagnostics import GlobalObjective, gradient_bias
from sogclr.evaluation.features import FeatureCache, FrozenEncoder, extract_features, extract_shard
from sogclr.evaluation.knn import KnnMonitor, knn_accuracy

__all__ = [
    "FeatureCache",
    "FrozenEncoder",
    "GlobalObjective",
    "KnnMonitor",
    "extract_features",
    "extract_shard",
    "gradient_bias",
    "knn_accuracy",
]
