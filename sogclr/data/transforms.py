"""PIL augmentations (`augment_on: loader`): each takes (PIL image, random.Random) and draws every
parameter from that generator, so a sample's views are a function of its position (sogclr/data/datasets.py).

The tensor twin that crops here and finishes the views on the device (`augment_on: device`) is
sogclr/data/augment.py; both draw the same parameters (`draw_two_views`).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter

from sogclr.data.augment import IMAGENET_MEAN, IMAGENET_STD, CropBatch, ViewParams, crop_box, draw_two_views

EVAL_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default, as the reference linear eval

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
    `sogclr.data.augment.draw_view_params`.
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
    its parameters (`sogclr.data.augment.CropBatch`); `sogclr.data.augment.finish_views` then does the rest
    on the
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


# Indexed by sogclr.data.augment's BRIGHTNESS, CONTRAST, SATURATION, HUE.
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
        return open_image_bytes(file.read())


def open_image_bytes(data: bytes) -> Image.Image:
    """An image file's bytes, opened (its size is known) but not decoded."""
    return Image.open(io.BytesIO(data))


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
