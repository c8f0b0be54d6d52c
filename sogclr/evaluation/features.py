"""Features of a frozen backbone over a whole dataset, each rank encoding a shard, every rank receiving all:
what linear evaluation trains on and the kNN monitor classifies with; and linear evaluation's cache of
them on disk, so that an attempt after a requeue does not encode the dataset again."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sogclr.data.datasets import IndexedImageFolder, ShardSampler, build_loader
from sogclr.distributed import DistEnv, all_gather_cat, broadcast_from_main
from sogclr.training.checkpoint import load_file, save_atomic
from sogclr.training.watchdog import progressed

Features = tuple[torch.Tensor, torch.Tensor]  # features [N, d], targets [N]


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
    encode: FrozenEncoder,
    dataset: IndexedImageFolder,
    env: DistEnv,
    batch_size: int,
    workers: int,
    stop: Callable[[], bool] | None = None,
) -> Features | None:
    """(features [N, d], targets [N]) of the whole dataset on every rank; each rank encodes a shard.

    `stop`, a collective (`sogclr.training.loop.stop_agreed`), is asked before every batch: None is returned
    as soon as it says so. Every rank asks it equally often, though shards may differ by a batch.
    """
    shard = ShardSampler(len(dataset), env.rank, env.world_size)
    loader = iter(build_loader(dataset, shard, batch_size, workers, pin_memory=env.device.type == "cuda"))
    rows = len(dataset)
    features, targets, indices = [], [], []
    for _ in range(math.ceil(math.ceil(rows / env.world_size) / batch_size)):  # the longest shard's batches
        progressed()
        if stop is not None and stop():
            return None
        if (batch := next(loader, None)) is None:
            continue
        images, target, index = batch
        features.append(encode(images))
        targets.append(target.to(encode.device))
        indices.append(index.to(encode.device))
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


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state_dict's names, dtypes, shapes and values: equal weights, equal digest."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Extracted features kept in `directory`, one file per split, keyed by everything they depend on
    (`key`: the backbone's weights, the samples, the transform, the precision): a file whose key differs
    is never used. Written atomically by rank 0 (every rank holds all the features) and read by every rank.
    """

    def __init__(self, directory: Path, env: DistEnv) -> None:
        self.directory = directory
        self.env = env

    def path(self, key: dict[str, str]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.directory / f"{key['split']}-{digest[:16]}.pt"

    def get(self, key: dict[str, str], extract: Callable[[], Features | None]) -> Features | None:
        """The cached features for `key`, or `extract()`'s (cached when it returns any)."""
        path = self.path(key)
        # rank 0 decides, so that all ranks extract (a collective) or none does
        if broadcast_from_main(self.env, path.is_file()):
            payload = load_file(path)
            if payload["key"] == key:  # else a clash of digests: extract again
                return payload["features"].to(self.env.device), payload["targets"].to(self.env.device)
        features = extract()
        if features is not None and self.env.is_main:
            save_atomic({"key": key, "features": features[0].cpu(), "targets": features[1].cpu()}, path)
        return features
