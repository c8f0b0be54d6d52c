"""Data pipeline: datasets read from the dataset index, position-seeded augmentations, resumable samplers,
loaders.

Every random draw is a function of *where* it happens, never of a stream with history:

- the shuffle of epoch `e` comes from `(seed, e)`;
- the augmentations of sample `i` in epoch `e` come from `(seed, e, i)`.

So neither the number of loader workers, nor the rank layout, nor the point where a run was interrupted
changes what a sample sees, and ranks never share augmentation parameters (they never share a sample).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from sogclr.contract.config import PretrainConfig, RunConfig
from sogclr.contract.dataindex import (
    DatasetIndex,
    SplitIndex,
    data_root,
    ensure_index,
    prepare_data_root,
    read_index,
)
from sogclr.contract.layout import RunLayout
from sogclr.data.transforms import EvalAugment, PretrainAugment, PretrainCrops, open_image
from sogclr.distributed import DistEnv, broadcast_from_main, ignore_stop_signals

# Independent random streams derived from one seed.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1

Augment = Callable[[Image.Image, random.Random], object]


# --------------------------------------------------------------------------------------------------------
# Seeds


def derive_seed(*key: int) -> int:
    """A 128-bit seed that is a well-mixed function of `key` (Python's hash() is salted per process)."""
    high, low = np.random.SeedSequence(key).generate_state(2, dtype=np.uint64)
    return int(high) << 64 | int(low)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator that draws every augmentation parameter of sample `index` in `epoch`."""
    return random.Random(derive_seed(seed, _AUGMENT_STREAM, epoch, index))


def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """The shuffle of `range(size)` for `epoch`."""
    return np.random.default_rng(derive_seed(seed, _SHUFFLE_STREAM, epoch)).permutation(size)


# --------------------------------------------------------------------------------------------------------
# The dataset index of a run


def load_dataset_index(cfg: RunConfig, env: DistEnv) -> tuple[Path, DatasetIndex]:
    """The index file every rank reads, and its content: the one the config names (the launcher's), else the
    one rank 0 builds once into the run directory (sogclr/contract/dataindex.py). No rank walks the tree
    again; each checks that the root is there (and writes the digits where a node's cache lacks them)."""
    prepare_data_root(cfg.pretrain)
    path = cfg.dataset_index
    if path is None:
        built = ensure_index(cfg.pretrain, RunLayout(cfg.run_dir).datasets) if env.is_main else None
        path = broadcast_from_main(env, built and str(built))
    return Path(path), read_index(path)


# --------------------------------------------------------------------------------------------------------
# Dataset


class IndexedImageFolder(Dataset):
    """The samples of one split of a dataset index, whose items are `(transform(image, rng), target, index)`.

    `image` is opened but not decoded (`open_image`); `rng` is a `random.Random` seeded from
    `(seed, epoch, index)`. The epoch lives in a shared-memory tensor, so `set_epoch` in the main process
    reaches DataLoader workers too, persistent ones included (they hold a copy of the dataset made when
    they started). Call it before iterating the epoch's loader. `root`, `samples`, `targets` and
    `classes` are ImageFolder's; nothing here lists a directory. `identity` is the split's fingerprint.
    """

    def __init__(self, split_root: str | Path, index: SplitIndex, transform: Augment, seed: int = 0) -> None:
        self.root = str(split_root)
        self.classes = list(index.classes)
        self.samples = index.samples(Path(split_root))
        self.identity = index.identity  # which images, in which order: the index's own fingerprint
        self.targets = [target for _, target in self.samples]
        self.transform = transform
        self.loader = open_image
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __getitem__(self, index: int) -> tuple[object, int, int]:
        path, target = self.samples[index]
        image = self.loader(path)
        return self.transform(image, sample_rng(self.seed, self.epoch, index)), target, index

    def subset(self, indices: Sequence[int]) -> IndexedImageFolder:
        """The same dataset restricted to the samples at `indices`, re-indexed from 0 in that order."""
        subset = copy.copy(self)
        subset.samples = [self.samples[i] for i in indices]
        subset.targets = [self.targets[i] for i in indices]
        return subset


PRETRAIN_TRANSFORMS = {"loader": PretrainAugment, "device": PretrainCrops}  # by `augment_on`


def split_dataset(
    cfg: PretrainConfig, index: DatasetIndex, split: str, transform: Augment, seed: int | None = None
) -> IndexedImageFolder:
    """The `split` of `cfg`'s dataset as `index` lists it, with `transform` (`seed` default `cfg.seed`)."""
    seed = cfg.seed if seed is None else seed
    return IndexedImageFolder(data_root(cfg) / split, index.splits[split], transform, seed)


def build_pretrain_dataset(cfg: PretrainConfig, index: DatasetIndex) -> IndexedImageFolder:
    """The train split with the two-view pretraining augmentation: all of it (`augment_on: loader`), or
    the crops that the training device finishes (`augment_on: device`)."""
    augment = PRETRAIN_TRANSFORMS[cfg.augment_on](cfg.image_size, cfg.crop_min)
    return split_dataset(cfg, index, "train", augment)


def build_lincls_datasets(
    cfg: PretrainConfig, index: DatasetIndex, seed: int | None = None
) -> tuple[IndexedImageFolder, IndexedImageFolder]:
    """(train, val) for linear evaluation; `seed` (default `cfg.seed`) drives the train augmentation."""
    train = split_dataset(cfg, index, "train", EvalAugment(cfg.image_size, train=True), seed)
    return train, build_plain_dataset(cfg, index, "val")


def build_plain_dataset(cfg: PretrainConfig, index: DatasetIndex, split: str) -> IndexedImageFolder:
    """The `split` ("train" or "val") with the validation transform, Resize + CenterCrop: each image's
    pixels are the same at every read (the linear features protocol, the kNN monitor)."""
    return split_dataset(cfg, index, split, EvalAugment(cfg.image_size, train=False))


# --------------------------------------------------------------------------------------------------------
# Samplers and loader


class ResumableDistributedSampler(Sampler[int]):
    """This rank's share of each global batch of a (seed, epoch) shuffle, resumable at any step.

    At step `s` rank `r` takes `perm[s*B + r*b : s*B + (r+1)*b]` (B global, b = B / world), so the global
    batch of every step is the same for any world size. The last partial global batch is dropped: no index
    repeats within an epoch (the reference padded, and a repeated index made the `u` update ambiguous).
    """

    def __init__(self, dataset_size: int, global_batch: int, rank: int, world_size: int, seed: int) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if global_batch > dataset_size:
            raise ValueError(f"global batch {global_batch} is larger than the dataset ({dataset_size})")
        self.dataset_size = dataset_size
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.steps_per_epoch = dataset_size // global_batch
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate `epoch` from `start_step` on (a resumed run skips the steps already done)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is outside [0, {self.steps_per_epoch}]")
        self.epoch = epoch
        self.start_step = start_step

    def global_batches(self) -> np.ndarray:
        """[steps left, global batch]: every rank's indices of each step left in the epoch, rank-major."""
        perm = epoch_permutation(self.seed, self.epoch, self.dataset_size)
        return perm[: self.steps_per_epoch * self.global_batch].reshape(self.steps_per_epoch, -1)[
            self.start_step :
        ]

    def __iter__(self) -> Iterator[int]:
        steps = self.global_batches().reshape(-1, self.world_size, self.local_batch)
        return iter(steps[:, self.rank].ravel().tolist())

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.local_batch


class ShardSampler(Sampler[int]):
    """Evaluation: rank `r` takes indices r, r + world, r + 2*world, ...; no padding, no duplicates,
    so per-rank counts all-reduce to exact dataset totals."""

    def __init__(self, dataset_size: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.indices = range(rank, dataset_size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loader(
    dataset: IndexedImageFolder, sampler: Sampler[int], batch_size: int, workers: int, pin_memory: bool
) -> DataLoader:
    """A loader over `sampler`'s indices; `batch_size` is per rank and must match a training sampler."""
    if isinstance(sampler, ResumableDistributedSampler) and batch_size != sampler.local_batch:
        raise ValueError(f"batch_size {batch_size} != the sampler's per-rank batch {sampler.local_batch}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        worker_init_fn=ignore_stop_signals,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=workers > 0,
        # Two batches in flight per worker: at 224 px a two-view batch of 256 is 300 MB of shared memory.
        prefetch_factor=2 if workers > 0 else None,
    )


def set_loader_epoch(loader: DataLoader, epoch: int, start_step: int = 0) -> None:
    """Point a training loader at `epoch` (from `start_step`): its sampler's shuffle and its dataset's
    augmentations together. Call before `iter(loader)`."""
    loader.sampler.set_epoch(epoch, start_step)
    loader.dataset.set_epoch(epoch)
