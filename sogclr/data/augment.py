"""The pretraining augmentation: one parameter record per view, and its batched device backend.

`draw_view_params` draws every random choice of one view (crop box, whether colour jitter fires, its four
factors and their order, grayscale, blur sigma, flip) from the sample's generator, which
`sogclr.data.datasets` seeds from (seed, epoch, index). Both backends apply the same record, so for a given
sample they make the same view up to interpolation and rounding:

- `augment_on: loader`: `sogclr.data.transforms.PretrainAugment` does everything in the loader worker,
  with PIL;
- `augment_on: device`: `sogclr.data.transforms.PretrainCrops` only decodes and crops in the worker and
  hands over uint8 crops with their parameters (`CropBatch`); `finish_views` applies the rest to the whole
  batch on the training device, after the transfer.
"""

from __future__ import annotations

import functools
import math
import random
from typing import NamedTuple

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")

# The reference augmentation recipe (NOTES-sogclr.md); the blur sigma is defined at 224 px.
JITTER_PROBABILITY = 0.8
JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
GRAYSCALE_PROBABILITY = 0.2
BLUR_SIGMA = (0.1, 2.0)
BLUR_REFERENCE_SIZE = 224
CROP_ASPECT_RATIO = (3 / 4, 4 / 3)

# The jitter operations, numbered as their factors are drawn and stored.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)


# --------------------------------------------------------------------------------------------------------
# The parameter record


class ViewParams(NamedTuple):
    """Every random choice of one augmented view."""

    box: tuple[int, int, int, int]  # top, left, height, width, in pixels of the full-size image
    jitter: bool
    # brightness, contrast, saturation, hue; the identity (1, 1, 1, 0) unless jitter
    factors: tuple[float, float, float, float]
    order: tuple[int, int, int, int]  # the jitter operations in the order they are applied
    grayscale: bool
    blur_sigma: float  # in pixels of the output view
    flip: bool


def draw_view_params(
    rng: random.Random, width: int, height: int, image_size: int, crop_min: float
) -> ViewParams:
    """The parameters of one view of a `width` x `height` image (the reference recipe, NOTES-sogclr.md).

    The order of the draws is fixed (it is what makes a view a function of the generator's seed).
    """
    box = crop_box(width, height, (crop_min, 1.0), rng)
    jitter = rng.random() < JITTER_PROBABILITY
    factors, order = _draw_jitter(rng) if jitter else (IDENTITY_FACTORS, (0, 1, 2, 3))
    grayscale = rng.random() < GRAYSCALE_PROBABILITY
    # Scaled with the output size, so the blur keeps its size relative to the view.
    blur_sigma = rng.uniform(*BLUR_SIGMA) * image_size / BLUR_REFERENCE_SIZE
    flip = rng.random() < 0.5
    return ViewParams(box, jitter, factors, order, grayscale, blur_sigma, flip)


def draw_two_views(
    rng: random.Random, width: int, height: int, image_size: int, crop_min: float
) -> tuple[ViewParams, ViewParams]:
    """The parameters of a sample's two views, the first view's drawn first."""
    first = draw_view_params(rng, width, height, image_size, crop_min)
    return first, draw_view_params(rng, width, height, image_size, crop_min)


def crop_box(
    image_width: int, image_height: int, scale: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (aspect ratio in [3/4, 4/3], 10 tries, then a central crop)."""
    area = image_width * image_height
    ratio = CROP_ASPECT_RATIO
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        width = round(math.sqrt(target_area * aspect))
        height = round(math.sqrt(target_area / aspect))
        if 0 < width <= image_width and 0 < height <= image_height:
            return rng.randint(0, image_height - height), rng.randint(0, image_width - width), height, width
    # No sample fitted: the whole image, cut to the nearest allowed aspect ratio.
    width, height = image_width, image_height
    if width / height < ratio[0]:
        height = round(width / ratio[0])
    elif width / height > ratio[1]:
        width = round(height * ratio[1])
    return (image_height - height) // 2, (image_width - width) // 2, height, width


def _draw_jitter(rng: random.Random) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """torchvision's ColorJitter(0.4, 0.4, 0.2, 0.1): four factors, then a random order of the four ops."""
    brightness, contrast, saturation, hue = JITTER_STRENGTH
    factors = (
        rng.uniform(1 - brightness, 1 + brightness),
        rng.uniform(1 - contrast, 1 + contrast),
        rng.uniform(1 - saturation, 1 + saturation),
        rng.uniform(-hue, hue),
    )
    order = [BRIGHTNESS, CONTRAST, SATURATION, HUE]
    rng.shuffle(order)
    return factors, tuple(order)


# --------------------------------------------------------------------------------------------------------
# The device backend


class CropBatch(NamedTuple):
    """Random resized crops and the rest of their views' parameters, as tensors.

    One view of one sample as a loader worker makes it (`pixels` `[3, S, S]`, the others scalars or
    `[4]`), or a batch of them after the DataLoader's collation (a leading batch dimension on each).
    """

    pixels: torch.Tensor  # uint8 [..., 3, S, S]
    factors: torch.Tensor  # float32 [..., 4]: brightness, contrast, saturation, hue
    order: torch.Tensor  # int64 [..., 4]
    grayscale: torch.Tensor  # bool [...]
    blur_sigma: torch.Tensor  # float32 [...]
    flip: torch.Tensor  # bool [...]

    @classmethod
    def of(cls, pixels: torch.Tensor, params: ViewParams) -> CropBatch:
        """One sample's crop `pixels` with the parameters of `params` that come after the crop."""
        return cls(
            pixels,
            torch.tensor(params.factors, dtype=torch.float32),
            torch.tensor(params.order, dtype=torch.int64),
            torch.tensor(params.grayscale),
            torch.tensor(params.blur_sigma, dtype=torch.float32),
            torch.tensor(params.flip),
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> CropBatch:
        return CropBatch(*(tensor.to(device, non_blocking=non_blocking) for tensor in self))


def finish_views(crops: CropBatch) -> torch.Tensor:
    """Colour jitter, grayscale, Gaussian blur, flip and ImageNet normalisation of a batch of crops.

    Returns float32 `[B, 3, S, S]`. Runs wherever `crops` is, without reading anything back to the host.
    """
    x = crops.pixels.float() / 255
    x = color_jitter(x, crops.factors, crops.order)
    x = torch.where(_per_sample(crops.grayscale), grayscale(x).expand_as(x), x)
    x = gaussian_blur(x, crops.blur_sigma, blur_radius(x.shape[-1]))
    x = torch.where(_per_sample(crops.flip), x.flip(-1), x)
    return (x - _per_channel(IMAGENET_MEAN, x.device)) / _per_channel(IMAGENET_STD, x.device)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter with per-sample factors `[B, 4]` and orders `[B, 4]` on images in [0, 1].

    Hue, the costly operation, runs once on the whole batch; each sample's other three operations run
    before or after it, as its order says. Hue comes somewhere in 0..3, so at most positions 0..2 come
    before it and 1..3 after it. Samples without jitter carry the identity factors (1, 1, 1, 0).
    """
    hue_at = (order == HUE).long().argmax(dim=1)
    for position in range(3):
        x = _blend_step(x, factors, order[:, position], position < hue_at)
    x = adjust_hue(x, factors[:, HUE])
    for position in range(1, 4):
        x = _blend_step(x, factors, order[:, position], position > hue_at)
    return x


def _blend_step(
    x: torch.Tensor, factors: torch.Tensor, op: torch.Tensor, active: torch.Tensor
) -> torch.Tensor:
    """Brightness, contrast or saturation, as `op` says per sample, for the `active` samples.

    All three are PIL's ImageEnhance: a blend of the image with a degenerate image (black, the mean gray
    level, the grayscale image), lerp(degenerate, x, factor). A factor of 1 leaves a sample exactly as
    it was (lerp is exact at its end points), which is what inactive samples and hue positions get.
    """
    gray = grayscale(x)
    mean_gray = gray.mean(dim=(-2, -1), keepdim=True)
    degenerate = torch.where(
        _per_sample(op == BRIGHTNESS), 0.0, torch.where(_per_sample(op == CONTRAST), mean_gray, gray)
    )
    factor = torch.where(active & (op != HUE), factors.gather(1, op[:, None]).squeeze(1), 1.0)
    return torch.lerp(degenerate, x, _per_sample(factor)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of images in [0, 1] by `shift` turns per sample (`[B]`), in HSV as PIL does."""
    red, green, blue = x.unbind(dim=1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    safe_chroma = torch.where(chroma > 0, chroma, 1.0)
    # The hue in sixths of a turn, from whichever channel is the largest; then rotated.
    sixths = torch.where(
        red == value,
        (green - blue) / safe_chroma,
        torch.where(green == value, 2 + (blue - red) / safe_chroma, 4 + (red - green) / safe_chroma),
    )
    rotated = sixths + 6 * shift[:, None, None]
    # HSV -> RGB: channel n = 5, 3, 1 (R, G, B) is v - c * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    n = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype)[:, None, None]
    k = (n + rotated[:, None]).remainder(6)
    return value[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """The luma of `[B, 3, H, W]` images, `[B, 1, H, W]`."""
    red, green, blue = x.unbind(dim=1)
    return (LUMA[0] * red + LUMA[1] * green + LUMA[2] * blue)[:, None]


def blur_radius(image_size: int) -> int:
    """Half the Gaussian kernel's width at `image_size`: three of the recipe's largest sigmas."""
    return max(1, math.ceil(3 * BLUR_SIGMA[1] * image_size / BLUR_REFERENCE_SIZE))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Gaussian blur with a per-sample `sigma` (`[B]`, pixels): one separable grouped convolution.

    The kernel's width is fixed (`2 * radius + 1`) so that shapes do not depend on the batch; edges
    repeat the border pixels, as PIL's blur does.
    """
    batch, channels, height, width = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    planes = F.pad(x.reshape(1, batch * channels, height, width), (radius,) * 4, mode="replicate")
    planes = F.conv2d(planes, kernel[:, None, None, :], groups=batch * channels)
    planes = F.conv2d(planes, kernel[:, None, :, None], groups=batch * channels)
    return planes.view(batch, channels, height, width)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """`[B]` -> `[B, 1, 1, 1]`, to broadcast over images."""
    return values[:, None, None, None]


@functools.cache
def _per_channel(values: tuple[float, float, float], device: torch.device) -> torch.Tensor:
    # Made once per device: building it every step would copy from the host, and that waits for the GPU.
    return torch.tensor(values, device=device)[:, None, None]
