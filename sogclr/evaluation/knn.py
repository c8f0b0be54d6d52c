"""Weighted k-nearest-neighbour accuracy of a frozen backbone: a measure of the representation that needs
no training, logged during pretraining (Wu et al. 2018, non-parametric instance discrimination; DINO).

Each validation image's feature (L2-normalised backbone output) is compared by cosine similarity with a
bank of training images' features; its k most similar bank images vote for their class, each with weight
exp(similarity / T), and the classes with the most weight are its top-1 and top-5 predictions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sogclr.contract.config import PretrainConfig
from sogclr.contract.dataindex import DatasetIndex
from sogclr.data.datasets import build_plain_dataset
from sogclr.distributed import DistEnv
from sogclr.evaluation.diagnostics import evenly_spaced
from sogclr.evaluation.features import FrozenEncoder, extract_features

# Similarities computed at once (queries x bank): bounds the memory of a chunk of queries.
CHUNK_ELEMENTS = 1 << 24


def knn_votes(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, k: int, temperature: float
) -> Tensor:
    """`[Q, num_classes]`: each query's total vote per class from its k most similar bank rows (all rows
    unit norm), a neighbour at similarity s voting exp(s / T) for its label."""
    similarity, neighbour = (queries @ bank.T).topk(min(k, len(bank)), dim=1)
    # Shifted by each query's largest similarity: the same ranking of classes, and no overflow at small T.
    weights = ((similarity - similarity[:, :1]) / temperature).exp()
    votes = torch.zeros(len(queries), num_classes, device=queries.device)
    return votes.scatter_add_(1, bank_labels[neighbour], weights)


@torch.no_grad()
def knn_accuracy(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of weighted kNN classification of `queries` against `bank`."""
    rows = max(1, CHUNK_ELEMENTS // len(bank))
    hits = torch.zeros(2, dtype=torch.int64, device=queries.device)
    for start in range(0, len(queries), rows):
        votes = knn_votes(bank, bank_labels, queries[start : start + rows], num_classes, k, temperature)
        ranked = votes.topk(min(5, num_classes), dim=1).indices
        match = ranked == query_labels[start : start + rows, None]
        hits += torch.stack([match[:, 0].sum(), match.any(dim=1).sum()])
    top1, top5 = (100 * count / len(queries) for count in hits.tolist())
    return {"top1": top1, "top5": top5}


class KnnMonitor:
    """The kNN accuracy of a pretraining model's backbone (eval mode, projector unused): the validation
    split against a fixed, evenly spaced subset of at most `knn_subset` training images, both with the
    validation transform. Returns `knn_top1` and `knn_top5` (percent).

    A collective under torch.distributed: each rank encodes a shard of both sets, every rank receives all
    features and computes the same numbers.
    """

    def __init__(
        self,
        cfg: PretrainConfig,
        index: DatasetIndex,
        env: DistEnv,
        batch_size: int,
        dtype: torch.dtype | None,
    ) -> None:
        train = build_plain_dataset(cfg, index, "train")
        self.bank = train.subset(evenly_spaced(len(train), cfg.knn_subset))
        self.queries = build_plain_dataset(cfg, index, "val")
        self.num_classes = len(train.classes)
        self.cfg, self.env, self.batch_size, self.dtype = cfg, env, batch_size, dtype

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        encode = FrozenEncoder(model.backbone, self.dtype)
        bank, bank_labels = self.features(encode, self.bank)
        queries, query_labels = self.features(encode, self.queries)
        cfg = self.cfg
        accuracy = knn_accuracy(
            bank, bank_labels, queries, query_labels, self.num_classes, cfg.knn_k, cfg.knn_temperature
        )
        return {f"knn_{name}": value for name, value in accuracy.items()}

    def features(self, encode: FrozenEncoder, dataset: torch.utils.data.Dataset) -> tuple[Tensor, Tensor]:
        features, labels = extract_features(encode, dataset, self.env, self.batch_size, self.cfg.workers)
        return F.normalize(features, dim=1), labels
