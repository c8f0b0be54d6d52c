"""Features of a frozen backbone over a whole dataset, each rank encoding a shard: kept sharded for linear
evaluation (each rank holds 1/world of the rows: ImageNet-1K's 1.28 M x 2048 fp32 features are 10.5 GB),
gathered onto every rank for the kNN monitor's bank (a subset); and linear evaluation's cache of the
shards on disk, so that an attempt after a requeue does not encode the dataset again."""

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
from sogclr.distributed import DistEnv, agree, all_gather_cat
from sogclr.training.checkpoint import load_file, remove_temporary_files, save_atomic
from sogclr.training.watchdog import progressed

# features [n, d], targets [n]: the whole dataset, or a rank's shard (rows rank, rank + world, ...)
Features = tuple[torch.Tensor, torch.Tensor]


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


def extract_shard(
    encode: FrozenEncoder,
    dataset: IndexedImageFolder,
    env: DistEnv,
    batch_size: int,
    workers: int,
    stop: Callable[[], bool] | None = None,
) -> Features | None:
    """This rank's shard of the dataset's (features, targets): rows rank, rank + world, ... (ShardSampler).

    `stop`, a collective (`sogclr.training.loop.stop_agreed`), is asked before every batch: None is returned
    as soon as it says so. Every rank asks it equally often, though shards may differ by a batch.
    """
    shard = ShardSampler(len(dataset), env.rank, env.world_size)
    loader = iter(build_loader(dataset, shard, batch_size, workers, pin_memory=env.device.type == "cuda"))
    features, targets = [], []
    for _ in range(math.ceil(math.ceil(len(dataset) / env.world_size) / batch_size)):  # the longest shard's
        progressed()
        if stop is not None and stop():
            return None
        if (batch := next(loader, None)) is None:
            continue
        images, target, _ = batch
        features.append(encode(images))
        targets.append(target.to(encode.device))
    return torch.cat(features), torch.cat(targets)


def extract_features(
    encode: FrozenEncoder, dataset: IndexedImageFolder, env: DistEnv, batch_size: int, workers: int
) -> Features:
    """(features [N, d], targets [N]) of the whole dataset on every rank; each rank encodes a shard."""
    features, targets = extract_shard(encode, dataset, env, batch_size, workers)
    return gather_shards(features, len(dataset), env), gather_shards(targets, len(dataset), env)


def gather_shards(shard: torch.Tensor, rows: int, env: DistEnv) -> torch.Tensor:
    """Every rank's `shard` (rows rank, rank + world, ...) in one [rows, ...] tensor, in dataset order."""
    # Shards differ in length by at most one: pad to a common length to gather. Row i is row i // world of
    # rank i % world's shard, so rank-major [world, length] read column-major is dataset order, padding last.
    length = math.ceil(rows / env.world_size)
    shard = F.pad(shard, (0, 0) * (shard.dim() - 1) + (0, length - shard.shape[0]))
    gathered = all_gather_cat(shard).view(env.world_size, length, *shard.shape[1:])
    return gathered.transpose(0, 1).reshape(env.world_size * length, *shard.shape[1:])[:rows]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state_dict's names, dtypes, shapes and values: equal weights, equal digest."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Extracted features kept in `directory`, one file per split and rank: each rank writes and reads its
    own shard, so no rank holds the whole matrix nor waits for another's write. Keyed by everything they
    depend on (`key`: the backbone's weights, the samples, the transform, the precision; and the shard): a
    file whose key differs is never used. What interrupted writes left behind is removed at start."""

    def __init__(self, directory: Path, env: DistEnv) -> None:
        self.directory = directory
        self.env = env
        # Before any rank writes: every write follows `get`'s collective, which rank 0 enters after this.
        if env.is_main:
            remove_temporary_files(directory)

    def path(self, key: dict[str, str]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.directory / f"{key['split']}-{digest[:16]}-{self.env.rank}of{self.env.world_size}.pt"

    def get(self, key: dict[str, str], extract: Callable[[], Features | None]) -> Features | None:
        """This rank's cached shard for `key`, or `extract()`'s (cached when it returns one)."""
        key = {**key, "shard": f"{self.env.rank}/{self.env.world_size}"}
        path = self.path(key)
        payload = load_file(path) if path.is_file() else None
        cached = payload is not None and payload["key"] == key  # else a clash of digests: extract again
        (missing,) = agree(self.env, not cached)  # all ranks extract (a collective) or none does
        if not missing:
            return payload["features"].to(self.env.device), payload["targets"].to(self.env.device)
        shard = extract()
        if shard is not None:
            save_atomic({"key": key, "features": shard[0].cpu(), "targets": shard[1].cpu()}, path)
        return shard
