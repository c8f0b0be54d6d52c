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
import dataclasses
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from sogclr.contract.config import PretrainConfig, RunConfig
from sogclr.contract.dataindex import (
    DatasetError,
    DatasetIndex,
    SplitIndex,
    data_root,
    ensure_index,
    prepare_data_root,
    read_index,
)
from sogclr.contract.layout import RunLayout
from sogclr.contract.shards import ShardIndex, read_shard_index
from sogclr.data.staging import Watch, expanded_stage_dir, stage_shards
from sogclr.data.transforms import EvalAugment, PretrainAugment, PretrainCrops, open_image_bytes
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


def load_dataset_index(cfg: RunConfig, env: DistEnv, watch: Watch = Watch()) -> tuple[Path, DatasetIndex]:
    """The index file every rank reads, and its content: the one the config names (the launcher's), else the
    one rank 0 builds once into the run directory (sogclr/contract/dataindex.py). No rank walks the tree
    again; each checks that the root is there (and writes the digits where a node's cache lacks them).

    For shards, the index also says where each image lies in them (`DatasetIndex.shards`): in the shard
    directory, or in this node's copy when `stage_dir` is set (staged now: sogclr/data/staging.py, which
    polls and tells `watch`)."""
    pcfg = cfg.pretrain
    prepare_data_root(pcfg)
    path = cfg.dataset_index
    if path is None:
        built = ensure_index(pcfg, RunLayout(cfg.run_dir).datasets) if env.is_main else None
        path = broadcast_from_main(env, built and str(built))
    index = read_index(path)
    if pcfg.data_format == "shards":
        shards = read_shard_index(data_root(pcfg))
        if pcfg.stage_dir is not None:
            shards = stage_shards(shards, expanded_stage_dir(pcfg.stage_dir), watch)
        shards.check_sizes()
        index = with_shards(index, shards)
    return Path(path), index


def with_shards(index: DatasetIndex, shards: ShardIndex) -> DatasetIndex:
    """`index` reading its images from `shards`; DatasetError when they hold other images."""
    located = shards.dataset_index(index.splits["train"].classes)
    if located.fingerprint != index.fingerprint:
        raise DatasetError(
            f"{shards.directory} holds other images than the index (another shards.json since submission?): "
            "submit again with --reindex"
        )
    return dataclasses.replace(index, shards=shards)


# --------------------------------------------------------------------------------------------------------
# Dataset


class FlatStrings:
    """Many strings as one bytes blob and an array of ends. A list of 1.28 M Python strings costs each
    rank some 200 MB, and a forked loader worker copies every page whose reference counts it touches
    as it reads them (256 MB per worker within an eighth of an epoch); these two objects have none to
    touch (benchmarks/dataset_memory.py)."""

    def __init__(self, strings: Iterable[str]) -> None:
        self.blob = "\0".join(strings).encode()
        self.ends = np.flatnonzero(np.frombuffer(self.blob + b"\0", dtype=np.uint8) == 0)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = 0 if i == 0 else int(self.ends[i - 1]) + 1
        return self.blob[start : int(self.ends[i])].decode()

    def take(self, indices: Sequence[int]) -> FlatStrings:
        return FlatStrings(self[i] for i in indices)


class TreeFiles:
    """The images of a split as files of its tree: `<split root>/<class>/<file>`."""

    def __init__(self, split_root: Path, paths: FlatStrings) -> None:
        self.prefix = f"{Path(split_root).absolute()}/"
        self.paths = paths

    def name(self, index: int) -> str:
        return f"{self.prefix}{self.paths[index]}"

    def read(self, index: int) -> bytes:
        with open(self.name(index), "rb") as file:
            return file.read()

    def subset(self, indices: Sequence[int]) -> TreeFiles:
        return TreeFiles(Path(self.prefix), self.paths.take(indices))


class ShardMembers:
    """The images of a split as tar members, each read with one `pread` at its offset: one open file per
    shard per process (loader workers open their own, lazily, and keep them)."""

    def __init__(
        self, directory: Path, shards: list[str], paths: FlatStrings, arrays: dict[str, np.ndarray]
    ) -> None:
        self.directory = directory
        self.shards = shards
        self.paths = paths
        self.shard, self.offset, self.size = arrays["shard"], arrays["offset"], arrays["size"]
        self._files: dict[int, int] = {}
        self._pid = os.getpid()

    def name(self, index: int) -> str:
        shard = self.directory / self.shards[self.shard[index]]
        return f"{self.paths[index]} in {shard} at byte {self.offset[index]}"

    def read(self, index: int) -> bytes:
        size = int(self.size[index])
        data = os.pread(self._file(int(self.shard[index])), size, int(self.offset[index]))
        if len(data) != size:
            raise OSError(f"read {len(data)} of {size} bytes: the shard is shorter than its index says")
        return data

    def _file(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its own descriptors, never its parent's
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = os.open(self.directory / self.shards[shard], os.O_RDONLY)
        return self._files[shard]

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_files": {}, "_pid": None}

    def subset(self, indices: Sequence[int]) -> ShardMembers:
        rows = np.asarray(indices, dtype=np.int64)
        arrays = {"shard": self.shard[rows], "offset": self.offset[rows], "size": self.size[rows]}
        return ShardMembers(self.directory, self.shards, self.paths.take(indices), arrays)


class UnreadableImage(ValueError):
    """An image that cannot be read or decoded, named by its path (and shard) and dataset index."""


class IndexedImageFolder(Dataset):
    """The samples of one split of a dataset index, whose items are `(transform(image, rng), target, index)`.

    `image` is opened but not decoded (`open_image_bytes`); `rng` is a `random.Random` seeded from
    `(seed, epoch, index)`. The epoch lives in a shared-memory tensor, so `set_epoch` in the main process
    reaches DataLoader workers too, persistent ones included (they hold a copy of the dataset made when
    they started). Call it before iterating the epoch's loader. Images come from a tree's files or from
    shards (`from_shards`): the same images give the same items. Paths and targets are flat arrays
    (`FlatStrings`, numpy): nothing per sample is a Python object. `identity` is the split's fingerprint
    (and, from shards, the sha256 of its images' bytes: `content`).
    """

    def __init__(self, split_root: str | Path, index: SplitIndex, transform: Augment, seed: int = 0) -> None:
        self._setup(TreeFiles(Path(split_root), FlatStrings(index.relative_paths())), index, transform, seed)
        self.root = str(split_root)

    @classmethod
    def from_shards(
        cls, shards: ShardIndex, split: str, index: SplitIndex, transform: Augment, seed: int = 0
    ) -> IndexedImageFolder:
        """The split `index` (which may be a class subset of the shards') read from `shards`."""
        sharded = shards.split(split, index.classes)
        dataset = cls.__new__(cls)
        names = [shard.name for shard in sharded.shards]
        images = ShardMembers(
            shards.directory, names, FlatStrings(index.relative_paths()), sharded.member_arrays()
        )
        dataset._setup(images, index, transform, seed)
        dataset.root = str(shards.directory)
        dataset.identity = {**index.identity, "content": sharded.content}
        return dataset

    def _setup(
        self, images: TreeFiles | ShardMembers, index: SplitIndex, transform: Augment, seed: int
    ) -> None:
        self.images = images
        self.classes = list(index.classes)
        self.targets = np.repeat(np.arange(len(index.files)), [len(files) for files in index.files])
        self.identity = index.identity  # which images, in which order: the index's own fingerprint
        self.transform = transform
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def open(self, index: int) -> Image.Image:
        """Sample `index`'s image, read and opened (not decoded)."""
        return self.decoded(index, lambda image: image)

    def decoded(self, index: int, use: Callable[[Image.Image], object]) -> object:
        """`use(image)` of sample `index`; an image that cannot be read or decoded (there, or in `use`,
        which decodes it) raises UnreadableImage naming it: among a million images the message must
        say which (Pillow's names a BytesIO object)."""
        try:
            return use(open_image_bytes(self.images.read(index)))
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:
            raise UnreadableImage(
                f"dataset index {index}: {self.images.name(index)}: {type(error).__name__}: {error}"
            ) from error

    def __getitem__(self, index: int) -> tuple[object, int, int]:
        rng = sample_rng(self.seed, self.epoch, index)
        return self.decoded(index, lambda image: self.transform(image, rng)), int(self.targets[index]), index

    def subset(self, indices: Sequence[int]) -> IndexedImageFolder:
        """The same dataset restricted to the samples at `indices`, re-indexed from 0 in that order."""
        subset = copy.copy(self)
        subset.images = self.images.subset(indices)
        subset.targets = self.targets[np.asarray(indices, dtype=np.int64)]
        return subset


PRETRAIN_TRANSFORMS = {"loader": PretrainAugment, "device": PretrainCrops}  # by `augment_on`


def split_dataset(
    cfg: PretrainConfig, index: DatasetIndex, split: str, transform: Augment, seed: int | None = None
) -> IndexedImageFolder:
    """The `split` of `cfg`'s dataset as `index` lists it, with `transform` (`seed` default `cfg.seed`)."""
    seed = cfg.seed if seed is None else seed
    if index.shards is not None:
        return IndexedImageFolder.from_shards(index.shards, split, index.splits[split], transform, seed)
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
