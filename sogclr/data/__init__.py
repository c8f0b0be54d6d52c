"""The data pipeline: datasets read from the dataset index, augmentations drawn from each sample's own
generator (seeded by seed, epoch and index), resumable samplers and loaders.

    datasets    IndexedImageFolder, the builders per phase, the samplers and the loader
    transforms  the PIL augmentations (`augment_on: loader`) and the worker half of `augment_on: device`
    augment     the view parameters both backends share, and the batched device backend
"""

from sogclr.data.datasets import (
    IndexedImageFolder,
    ResumableDistributedSampler,
    build_lincls_datasets,
    build_loader,
    build_pretrain_dataset,
    load_dataset_index,
)
from sogclr.data.transforms import EvalAugment, PretrainAugment, PretrainCrops

__all__ = [
    "EvalAugment",
    "IndexedImageFolder",
    "PretrainAugment",
    "PretrainCrops",
    "ResumableDistributedSampler",
    "build_lincls_datasets",
    "build_loader",
    "build_pretrain_dataset",
    "load_dataset_index",
]
