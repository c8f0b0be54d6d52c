"""CPU time per training image of the two data paths, from JPEG files, as one loader worker spends it.

The benchmark writes an image folder of JPEGs (quality 90, photograph-like 1/f spectra) at ImageNet's
typical 500x375 and at 1000x750, then does, in this one process on one thread, exactly what a loader
worker does for each batch: read each file, decode, augment, collate. Today's path (`augment_on:
loader`): the whole PIL recipe, two float views. The new path (`augment_on: device`): decode and crop
only (reduced JPEG decoding where the crops allow), two uint8 crops plus their parameters. CPU time is
`time.process_time` (robust to other load on shared cores); best of `--repeats`, interleaved. The device
half of the new path (`finish_views`) is timed on this CPU too, for the record.

    python benchmarks/data_path.py [--images 64] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from data import natural_images  # benchmarks/data.py
from torch.utils.data import default_collate

from sogclr.contract.dataindex import index_split
from sogclr.data.augment import draw_two_views, finish_views
from sogclr.data.datasets import IndexedImageFolder, sample_rng
from sogclr.data.transforms import PretrainAugment, PretrainCrops, decode_for_crops

IMAGE_SIZE = 224
CROP_MIN = 0.08
SIZES = ((500, 375), (1000, 750))


def write_jpeg_folder(root: Path, count: int, width: int, height: int) -> Path:
    """`root/<w>x<h>/images/<i>.jpg`: an ImageFolder with one class."""
    folder = root / f"{width}x{height}"
    (folder / "images").mkdir(parents=True)
    for i, image in enumerate(natural_images(count, width, height, seed=width)):
        image.save(folder / "images" / f"{i:04d}.jpg", quality=90)
    return folder


def worker_batches(dataset: IndexedImageFolder, batch: int) -> Callable[[], list]:
    """A loader worker's job over the whole dataset: every batch read, augmented and collated."""

    def run() -> list:
        indices = range(len(dataset))
        return [
            default_collate([dataset[i] for i in indices[start : start + batch]])
            for start in range(0, len(indices), batch)
        ]

    return run


def decode_only(dataset: IndexedImageFolder) -> Callable[[], None]:
    def run() -> None:
        for index in range(len(dataset)):
            dataset.open(index).load()

    return run


def cpu_ms_per_image(job: Callable[[], object], images: int) -> float:
    start = time.process_time()
    job()
    return 1000 * (time.process_time() - start) / images


def reduced_fraction(dataset: IndexedImageFolder) -> float:
    """The share of images that the new path decodes at a reduced scale (with epoch 0's crops)."""
    reduced = 0
    for index in range(len(dataset)):
        image = dataset.open(index)
        views = draw_two_views(sample_rng(dataset.seed, 0, index), *image.size, IMAGE_SIZE, CROP_MIN)
        reduced += decode_for_crops(image, views, IMAGE_SIZE)[1] < 1
    return reduced / len(dataset)


def compare(folder: Path, batch: int, repeats: int) -> list:
    """Prints one table row per path; returns the new path's collated batches (for `finish_views`)."""
    today = IndexedImageFolder(folder, index_split(folder), PretrainAugment(IMAGE_SIZE, CROP_MIN))
    new = IndexedImageFolder(folder, index_split(folder), PretrainCrops(IMAGE_SIZE, CROP_MIN))
    images = len(today)
    jobs = {
        "decode only (for reference)": decode_only(today),
        "augment_on: loader (today)": worker_batches(today, batch),
        "augment_on: device (new)": worker_batches(new, batch),
    }
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(repeats):  # interleaved: drifting load hits every path alike
        for name, job in jobs.items():
            best[name] = min(best[name], cpu_ms_per_image(job, images))
    baseline = best["augment_on: loader (today)"]
    for name, ms in best.items():
        print(f"| {folder.name:>8} | {name:<28} | {ms:7.2f} | {1000 / ms:7.1f} | {ms / baseline:5.2f} |")
    return worker_batches(new, batch)()


def time_finish_views(batches: list, repeats: int) -> None:
    """CPU time of the device half of the new path on this CPU, both views of every image."""
    images = sum(len(index) for _, _, index in batches)

    def run() -> None:
        for views, _, _ in batches:
            for crops in views:
                finish_views(crops)

    ms = min(cpu_ms_per_image(run, images) for _ in range(repeats))
    print(
        f"finish_views on this CPU (one thread, batches of {len(batches[0][2])}, both views): "
        f"{ms:.2f} ms per image, {1000 / ms:.1f} images/s per core"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="JPEG files per image size")
    parser.add_argument("--batch", type=int, default=32, help="images per collated batch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    print(f"{args.images} JPEGs per size, {IMAGE_SIZE} px views, one thread; CPU ms per image (2 views),")
    print(f"images/s per core, and the ratio against today's path in the same run (best of {args.repeats})")
    print("| size     | path                         | CPU ms  | img/s   | ratio |")
    print("|----------|------------------------------|--------:|--------:|------:|")
    with tempfile.TemporaryDirectory() as root:
        folders = [write_jpeg_folder(Path(root), args.images, *size) for size in SIZES]
        for folder in folders:
            batches = compare(folder, args.batch, args.repeats)
        for folder in folders:
            dataset = IndexedImageFolder(folder, index_split(folder), PretrainCrops(IMAGE_SIZE, CROP_MIN))
            print(
                f"{folder.name}: {100 * reduced_fraction(dataset):.0f}% of images decoded at a reduced scale"
            )
    time_finish_views(batches, args.repeats)


if __name__ == "__main__":
    main()
