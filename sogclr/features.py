"""Features of a frozen backbone over a whole dataset, each rank encoding a shard, every rank receiving all:
what linear evaluation trains on and the kNN monitor classifies with."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sogclr.data import IndexedImageFolder, ShardSampler, build_loader
from sogclr.distributed import DistEnv, all_gather_cat


class FrozenEncoder:
    """Features of a batch of images from the frozen backbone: no graph, autocast on GPU, float32 out."""

    def __init__(self, backbone: nn.Module, dtype: torch.dtype | None) -> None:
        self.backbone = backbone
        self.device = next(backbone.parameters()).device
        self.dtype = dtype
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.backbone(images).float()


def extract_features(
    encode: FrozenEncoder, dataset: IndexedImageFolder, env: DistEnv, batch_size: int, workers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, d], targets [N]) of the whole dataset on every rank; each rank encodes a shard."""
    shard = ShardSampler(len(dataset), env.rank, env.world_size)
    loader = build_loader(dataset, shard, batch_size, workers, pin_memory=env.device.type == "cuda")
    features, targets, indices = [], [], []
    for images, target, index in loader:
        features.append(encode(images))
        targets.append(target.to(encode.device))
        indices.append(index.to(encode.device))
    rows = len(dataset)
    index = torch.cat(indices)
    return _assemble(torch.cat(features), index, rows, env), _assemble(torch.cat(targets), index, rows, env)


def _assemble(shard: torch.Tensor, index: torch.Tensor, rows: int, env: DistEnv) -> torch.Tensor:
    """Put every rank's `shard` rows at their dataset `index` in one [rows, ...] tensor."""
    # Shards differ in length by at most one: pad to a common length (index -1 marks padding) to gather.
    length = math.ceil(rows / env.world_size)
    padding = length - shard.shape[0]
    shard = all_gather_cat(F.pad(shard, (0, 0) * (shard.dim() - 1) + (0, padding)))
    index = all_gather_cat(F.pad(index, (0, padding), value=-1))
    full = shard.new_empty((rows, *shard.shape[1:]))
    full[index[index >= 0]] = shard[index >= 0]
    return full
