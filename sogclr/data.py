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
import io
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler

from sogclr.augment import IMAGENET_MEAN, IMAGENET_STD, CropBatch, ViewParams, crop_box, draw_two_views
from sogclr.config import PretrainConfig, RunConfig
from sogclr.dataindex import (
    DatasetIndex,
    SplitIndex,
    data_root,
    ensure_index,
    prepare_data_root,
    read_index,
)
from sogclr.distributed import DistEnv, broadcast_from_main, ignore_stop_signals
from sogclr.layout import RunLayout

EVAL_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default, as the reference linear eval

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
    """The index file every rank reads, and its content: the one the config names (the launcher's), else
    the one rank 0 builds once into the run directory (sogclr/dataindex.py). No rank walks the tree again;
    each checks that the root is there (and writes the digits where a node's cache lacks them)."""
    prepare_data_root(cfg.pretrain)
    path = cfg.dataset_index
    if path is None:
        built = ensure_index(cfg.pretrain, RunLayout(cfg.run_dir).datasets) if env.is_main else None
        path = broadcast_from_main(env, built and str(built))
    return Path(path), read_index(path)


# --------------------------------------------------------------------------------------------------------
# Augmentations: each takes (PIL image, random.Random) and draws every parameter from that generator.
# The image comes opened but not yet decoded (`open_image`), so a transform can pick a reduced JPEG
# decoding scale before it decodes; each transform decodes it itself (`decoded_rgb`).

# Reduced JPEG decoding (libjpeg's DCT scaling, PIL's draft mode): 1/8, 1/4, 1/2, the largest first.
JPEG_REDUCTIONS = (8, 4, 2)


@dataclass(frozen=True)
class PretrainAugment:
    """Two views of one image, both from the SogCLR/SimCLR recipe, made with PIL (`augment_on: loader`).

    RandomResizedCrop(scale=(crop_min, 1)), ColorJitter(0.4, 0.4, 0.2, 0.1) in random order with p=0.8,
    grayscale p=0.2, PIL Gaussian blur always (sigma in [0.1, 2] at 224 px, scaled by image_size / 224 so
    the blur keeps its size relative to the image), horizontal flip, ImageNet normalisation. Parameters:
    `sogclr.augment.draw_view_params`.
    """

    image_size: int = 224
    crop_min: float = 0.08

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        image = decoded_rgb(image)
        first, second = draw_two_views(rng, image.width, image.height, self.image_size, self.crop_min)
        return augmented_view(image, first, self.image_size), augmented_view(image, second, self.image_size)


@dataclass(frozen=True)
class PretrainCrops:
    """The loader's part of `augment_on: device`: each view's random resized crop, uint8, with the rest of
    its parameters (`sogclr.augment.CropBatch`); `sogclr.augment.finish_views` then does the rest on the
    training device, batched. The draws are `PretrainAugment`'s, so both make the same views.

    A JPEG is decoded at a reduced scale when both crops allow it (`decode_for_crops`).
    """

    image_size: int = 224
    crop_min: float = 0.08

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[CropBatch, CropBatch]:
        views = draw_two_views(rng, image.width, image.height, self.image_size, self.crop_min)
        image, scale = decode_for_crops(image, views, self.image_size)
        first, second = (CropBatch.of(crop_pixels(image, v.box, scale, self.image_size), v) for v in views)
        return first, second


@dataclass(frozen=True)
class EvalAugment:
    """Linear evaluation: RandomResizedCrop + flip for training; Resize(size*256/224) + CenterCrop for val."""

    image_size: int = 224
    train: bool = True

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        image = decoded_rgb(image)
        if self.train:
            image = random_flip(random_resized_crop(image, self.image_size, EVAL_CROP_SCALE, rng), rng)
        else:
            image = F.resize(image, round(self.image_size * 256 / 224))
            image = F.center_crop(image, self.image_size)
        return normalised_tensor(image)


def augmented_view(image: Image.Image, params: ViewParams, image_size: int) -> torch.Tensor:
    """The view of `image` that `params` describe, made with PIL, as a normalised float tensor."""
    top, left, height, width = params.box
    image = F.resized_crop(image, top, left, height, width, [image_size, image_size])
    if params.jitter:
        image = color_jitter(image, params.factors, params.order)
    if params.grayscale:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    image = image.filter(ImageFilter.GaussianBlur(radius=params.blur_sigma))  # PIL's radius is the std
    if params.flip:
        image = F.hflip(image)
    return normalised_tensor(image)


# Indexed by sogclr.augment's BRIGHTNESS, CONTRAST, SATURATION, HUE.
_PIL_JITTER = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def color_jitter(image: Image.Image, factors: Sequence[float], order: Sequence[int]) -> Image.Image:
    """ColorJitter: the four factors (brightness, contrast, saturation, hue), applied in `order`."""
    for op in order:
        image = _PIL_JITTER[op](image, factors[op])
    return image


def random_resized_crop(
    image: Image.Image, size: int, scale: tuple[float, float], rng: random.Random
) -> Image.Image:
    """torchvision's RandomResizedCrop (aspect ratio in [3/4, 4/3], 10 tries, then a central crop)."""
    top, left, height, width = crop_box(image.width, image.height, scale, rng)
    return F.resized_crop(image, top, left, height, width, [size, size])


def random_flip(image: Image.Image, rng: random.Random) -> Image.Image:
    return F.hflip(image) if rng.random() < 0.5 else image


def normalised_tensor(image: Image.Image) -> torch.Tensor:
    return F.normalize(F.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD, inplace=True)


def open_image(path: str) -> Image.Image:
    """The image file at `path`, read and opened (its size is known) but not decoded."""
    with open(path, "rb") as file:
        return Image.open(io.BytesIO(file.read()))


def decoded_rgb(image: Image.Image) -> Image.Image:
    """`image` decoded, in RGB (without a copy when it already is)."""
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_for_crops(image: Image.Image, views: Sequence[ViewParams], size: int) -> tuple[Image.Image, float]:
    """Decode `image` at the smallest JPEG scale at which every view's crop still spans at least `size`
    pixels a side; returns the RGB image and its scale against the full size (1, 1/2, 1/4 or 1/8).

    The crop boxes, scaled with it, cover the same part of the picture, and are still shrunk (never
    enlarged) to `size`. Images in other formats, or whose crops are too small, decode at full size.
    """
    smallest_side = min(min(view.box[2:]) for view in views)
    reduction = next((r for r in JPEG_REDUCTIONS if smallest_side >= r * size), 1)
    full_width = image.width
    drafted = None
    if reduction > 1:
        # The full image's box in the reduced one, or None where draft() does nothing (not a JPEG).
        drafted = image.draft("RGB", (image.width // reduction, image.height // reduction))
    scale = drafted[1][2] / full_width if drafted else 1.0
    return decoded_rgb(image), scale


def crop_pixels(image: Image.Image, box: tuple[int, int, int, int], scale: float, size: int) -> torch.Tensor:
    """The crop `box` (top, left, height, width in full-size pixels) of `image`, decoded at `scale`,
    resized to `size` x `size` (bilinear, antialiased): uint8 `[3, size, size]`."""
    top, left, height, width = (side * scale for side in box)
    # Cut out the whole pixels the box touches, then resize exactly the box (fractional at a reduced
    # scale): the crop's edges do not move, and, as in RandomResizedCrop, only its own pixels are read.
    outer = (math.floor(left), math.floor(top), math.ceil(left + width), math.ceil(top + height))
    inner = (left - outer[0], top - outer[1], left + width - outer[0], top + height - outer[1])
    crop = image.crop(outer).resize((size, size), Image.Resampling.BILINEAR, box=inner)
    return F.pil_to_tensor(crop)


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

    def __iter__(self) -> Iterator[int]:
        perm = epoch_permutation(self.seed, self.epoch, self.dataset_size)
        steps = perm[: self.steps_per_epoch * self.global_batch].reshape(
            self.steps_per_epoch, self.world_size, self.local_batch
        )
        return iter(steps[self.start_step :, self.rank].ravel().tolist())

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
