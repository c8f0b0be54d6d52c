"""Two-view pretraining augmentation throughput of one loader worker, against torchvision v1 Compose.

The baseline is the reference pipeline as torchvision transforms (tensor GaussianBlur, kernel 10% of the size,
global RNG); ours is `sogclr.data.transforms.PretrainAugment` (PIL blur, generator-driven). Both make two
views per image and run single-threaded, as inside a DataLoader worker. Inputs: real digits upscaled to 32 px
for the 32 px pipeline, and 500x375 images with natural-image (1/f) spectra for 224 px.

    python benchmarks/data.py [--repeats 3] [--images-224 100] [--images-32 1000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision import transforms

from sogclr.data.augment import IMAGENET_MEAN, IMAGENET_STD
from sogclr.data.datasets import sample_rng
from sogclr.data.transforms import PretrainAugment


def reference_augment(image_size: int, crop_min: float) -> transforms.Compose:
    kernel_size = max(3, int(0.1 * image_size) // 2 * 2 + 1)
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(crop_min, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([transforms.GaussianBlur(kernel_size, sigma=(0.1, 2.0))], p=1.0),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def natural_images(count: int, width: int, height: int, seed: int = 0) -> list[Image.Image]:
    """RGB images whose amplitude spectrum falls as 1/f, like photographs."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(height), np.fft.rfftfreq(width), indexing="ij")
    amplitude = 1 / np.maximum(np.hypot(fx, fy), 1 / max(width, height))
    images = []
    for _ in range(count):
        noise = rng.standard_normal((3, height, width // 2 + 1)) + 1j * rng.standard_normal(
            (3, height, width // 2 + 1)
        )
        field = np.fft.irfft2(noise * amplitude, s=(height, width))
        field = (field - field.mean()) / field.std()
        pixels = np.clip(128 + 48 * field, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        images.append(Image.fromarray(pixels))
    return images


def digit_images(count: int) -> list[Image.Image]:
    counts = load_digits().images[:count]
    return [
        Image.fromarray(np.round(c * 255 / 16).astype(np.uint8))
        .resize((32, 32), Image.Resampling.BICUBIC)
        .convert("RGB")
        for c in counts
    ]


def images_per_second(two_views: Callable[[Image.Image, int], object], images: list[Image.Image]) -> float:
    start = time.perf_counter()
    for i, image in enumerate(images):
        two_views(image, i)
    return len(images) / (time.perf_counter() - start)


def compare(name: str, images: list[Image.Image], image_size: int, crop_min: float, repeats: int) -> None:
    reference = reference_augment(image_size, crop_min)
    ours = PretrainAugment(image_size, crop_min)
    pipelines = {
        "torchvision v1 Compose": lambda image, i: (reference(image), reference(image)),
        "sogclr PretrainAugment": lambda image, i: ours(image, sample_rng(0, 0, i)),
    }
    best = {label: 0.0 for label in pipelines}
    for _ in range(repeats):  # interleaved, best of `repeats`: robust to other load on the machine
        for label, pipeline in pipelines.items():
            best[label] = max(best[label], images_per_second(pipeline, images))
    baseline = best["torchvision v1 Compose"]
    for label, rate in best.items():
        print(f"{name:<28} {label:<24} {rate:9.1f} img/s   x{rate / baseline:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images-224", type=int, default=100)
    parser.add_argument("--images-32", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    print(f"two views per image, one thread, best of {args.repeats}; ratio against torchvision v1")
    compare("32 px (digits 32x32)", digit_images(args.images_32), 32, 0.2, args.repeats)
    compare("224 px (500x375, 1/f)", natural_images(args.images_224, 500, 375), 224, 0.08, args.repeats)


if __name__ == "__main__":
    main()
