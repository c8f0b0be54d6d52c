"""The two augmentation backends make the same views: one parameter record per view, drawn from
(seed, epoch, index), applied by PIL in the loader (`augment_on: loader`) or, after a uint8 crop in the
loader, batched on the training device (`augment_on: device`; here on the CPU). And JPEGs decode at a
reduced scale only where the crops allow it, covering the same pixels.

Tolerances, in grey levels (1/255) of the un-normalised views: PIL rounds to uint8 after every
operation and does hue in uint8 HSV (hue quantised to 1/255 of a turn, the shift truncated to it); the
device path stays in float32, and blurs with a true Gaussian where PIL stacks three box filters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter
from torch.utils.data import default_collate

from sogclr.data.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    IDENTITY_FACTORS,
    IMAGENET_STD,
    SATURATION,
    CropBatch,
    ViewParams,
    blur_radius,
    color_jitter,
    draw_two_views,
    draw_view_params,
    finish_views,
    gaussian_blur,
    grayscale,
)
from sogclr.data.datasets import sample_rng
from sogclr.data.transforms import (
    PretrainAugment,
    PretrainCrops,
    augmented_view,
    crop_pixels,
    decode_for_crops,
    open_image,
)
from sogclr.data.transforms import color_jitter as pil_color_jitter

SIZE = 48  # the views' size in these tests
CROP_MIN = 0.08


def colour_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Saturated colours at several scales: a random 8x coarser grid, upscaled bicubically."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)


def as_float(image: Image.Image) -> torch.Tensor:
    """`[1, 3, H, W]` in [0, 1]."""
    return F.pil_to_tensor(image)[None].float() / 255


def grey_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two normalised views, in grey levels of the images before normalisation."""
    return (a - b).abs() * torch.tensor(IMAGENET_STD)[:, None, None] * 255


def only(**fields: object) -> ViewParams:
    """A view that crops 60x80 at (4, 6) and does nothing else, but for `fields`."""
    nothing = ViewParams((4, 6, 60, 80), False, IDENTITY_FACTORS, (0, 1, 2, 3), False, 1e-3, False)
    return nothing._replace(**fields)


# --------------------------------------------------------------------------------------- the parameters


def test_view_params_follow_the_recipe() -> None:
    draws = [draw_view_params(sample_rng(0, 0, i), 500, 375, 112, CROP_MIN) for i in range(2000)]

    def frequency(flag: str) -> float:
        return np.mean([getattr(p, flag) for p in draws])

    # Binomial, 2000 draws: one standard deviation is at most 0.011.
    assert abs(frequency("jitter") - 0.8) < 0.04 and abs(frequency("grayscale") - 0.2) < 0.04
    assert abs(frequency("flip") - 0.5) < 0.04
    jittered = [p for p in draws if p.jitter]
    low, high = np.min([p.factors for p in jittered], 0), np.max([p.factors for p in jittered], 0)
    assert np.allclose(low, (0.6, 0.6, 0.8, -0.1), atol=0.01)
    assert np.allclose(high, (1.4, 1.4, 1.2, 0.1), atol=0.01)
    assert all(sorted(p.order) == [0, 1, 2, 3] for p in jittered)
    assert len({p.order for p in jittered}) == 24
    assert all(p.factors == IDENTITY_FACTORS for p in draws if not p.jitter)
    sigmas = [p.blur_sigma for p in draws]  # [0.1, 2] at 224 px, halved at 112
    assert 0.05 <= min(sigmas) < 0.06 and 0.99 < max(sigmas) <= 1.0


def test_both_paths_take_the_same_parameters() -> None:
    image = colour_image(80, 60)
    for seed, epoch, index in ((0, 0, 0), (0, 3, 7), (5, 1, 123)):
        first, second = draw_two_views(sample_rng(seed, epoch, index), 80, 60, SIZE, CROP_MIN)
        # The loader path applies exactly this record...
        pil_views = PretrainAugment(SIZE, CROP_MIN)(image, sample_rng(seed, epoch, index))
        for view, params in zip(pil_views, (first, second)):
            assert torch.equal(view, augmented_view(image, params, SIZE))
        # ... and the device path carries it, with the same crop's pixels.
        crops = PretrainCrops(SIZE, CROP_MIN)(image, sample_rng(seed, epoch, index))
        for crop, params in zip(crops, (first, second)):
            top, left, height, width = params.box
            expected = F.pil_to_tensor(F.resized_crop(image, top, left, height, width, [SIZE, SIZE]))
            assert torch.equal(crop.pixels, expected)
            assert crop.factors.tolist() == pytest.approx(params.factors)
            assert tuple(crop.order.tolist()) == params.order
            assert (bool(crop.grayscale), bool(crop.flip)) == (params.grayscale, params.flip)
            assert float(crop.blur_sigma) == pytest.approx(params.blur_sigma)


# ---------------------------------------------------------------------------- the operations, one by one


@pytest.mark.parametrize(
    "op, factor, max_levels",
    [
        (BRIGHTNESS, 1.35, 1.5),  # PIL: uint8 after the blend, grey levels rounded
        (BRIGHTNESS, 0.65, 1.5),
        (CONTRAST, 1.3, 1.5),
        (CONTRAST, 0.7, 1.5),
        (SATURATION, 1.2, 1.5),
        (SATURATION, 0.8, 1.5),
        (HUE, 0.08, 12.0),  # PIL: hue in uint8 HSV
        (HUE, -0.06, 12.0),
    ],
)
def test_each_jitter_operation_matches_pil(op: int, factor: float, max_levels: float) -> None:
    crop = colour_image(SIZE, SIZE)
    factors = list(IDENTITY_FACTORS)
    factors[op] = factor
    expected = as_float(pil_color_jitter(crop, factors, [op]))
    order = torch.tensor([[BRIGHTNESS, CONTRAST, SATURATION, HUE]])
    ours = color_jitter(as_float(crop), torch.tensor([factors]), order)
    levels = (ours - expected).abs() * 255
    assert levels.max() <= max_levels and levels.mean() <= 1.0


def test_jitter_follows_each_samples_order() -> None:
    # Brightness then contrast differs from contrast then brightness (clipping, and the mean moves).
    crop = colour_image(SIZE, SIZE)
    factors = (1.4, 0.6, 1.2, 0.05)
    orders = [(BRIGHTNESS, CONTRAST, HUE, SATURATION), (HUE, SATURATION, CONTRAST, BRIGHTNESS)]
    batch = color_jitter(as_float(crop).repeat(2, 1, 1, 1), torch.tensor([factors] * 2), torch.tensor(orders))
    for ours, order in zip(batch, orders):
        levels = (ours - as_float(pil_color_jitter(crop, factors, order))[0]).abs() * 255
        assert levels.mean() <= 2.0
    assert (batch[0] - batch[1]).abs().mean() * 255 > 5


def test_grayscale_matches_pil() -> None:
    crop = colour_image(SIZE, SIZE)
    expected = as_float(F.rgb_to_grayscale(crop, num_output_channels=1))
    assert ((grayscale(as_float(crop)) - expected).abs() * 255).max() <= 0.5 + 1e-4


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.3, 2.0])
def test_blur_matches_pil(sigma: float) -> None:
    # At 224 px, the recipe's own sizes: sigma up to 2, the kernel three of those each side.
    image = colour_image(96, 96)
    expected = as_float(image.filter(ImageFilter.GaussianBlur(radius=sigma)))
    ours = gaussian_blur(as_float(image), torch.tensor([sigma]), blur_radius(224))
    levels = (ours - expected).abs() * 255
    assert levels.mean() <= 0.75 and levels.max() <= 4.0


# ------------------------------------------------------------------------------------- whole views


def device_views(image: Image.Image, indices: range) -> list[torch.Tensor]:
    """Both views of `image` as samples `indices` in epoch 0: loader crops, collated, finished."""
    crops = default_collate([PretrainCrops(SIZE, CROP_MIN)(image, sample_rng(0, 0, i)) for i in indices])
    return [finish_views(views) for views in crops]


def test_device_views_match_pil_views() -> None:
    image, indices = colour_image(120, 90), range(64)
    pil = [PretrainAugment(SIZE, CROP_MIN)(image, sample_rng(0, 0, i)) for i in indices]
    for view, ours in enumerate(device_views(image, indices)):
        levels = grey_levels(ours, torch.stack([views[view] for views in pil]))
        assert levels.mean() <= 2.0  # observed 1.3
        assert levels.flatten(1).mean(1).max() <= 4.0  # every single view
        assert torch.quantile(levels.flatten()[::7], 0.99) <= 12.0


def test_unjittered_views_differ_from_pil_only_by_the_blur() -> None:
    image = colour_image(120, 90)
    params = only(blur_sigma=0.3, grayscale=True, flip=True)
    crop = CropBatch.of(crop_pixels(image, params.box, 1.0, SIZE), params)
    ours = finish_views(default_collate([crop]))[0]
    assert grey_levels(ours, augmented_view(image, params, SIZE)).max() <= 4.0


# ------------------------------------------------------------------------------------ reduced decoding


def jpeg(tmp_path: Path, width: int, height: int) -> Path:
    path = tmp_path / f"{width}x{height}.jpg"
    colour_image(width, height).save(path, quality=95)
    return path


@pytest.mark.parametrize("side, reduction", [(SIZE - 1, 1), (2 * SIZE - 1, 1), (2 * SIZE, 2), (4 * SIZE, 4)])
def test_jpeg_decodes_at_the_largest_reduction_the_crops_allow(
    tmp_path: Path, side: int, reduction: int
) -> None:
    path = jpeg(tmp_path, 8 * SIZE + 10, 8 * SIZE + 6)
    views = [only(box=(3, 5, 8 * SIZE, 8 * SIZE)), only(box=(1, 2, side, side + 7))]
    image, scale = decode_for_crops(open_image(str(path)), views, SIZE)
    assert scale == 1 / reduction
    assert image.size == (-(-(8 * SIZE + 10) // reduction), -(-(8 * SIZE + 6) // reduction))
    assert image.mode == "RGB"


@pytest.mark.parametrize("side", [2 * SIZE + 3, 4 * SIZE + 5])
def test_reduced_decoding_covers_the_same_pixels(tmp_path: Path, side: int) -> None:
    path = jpeg(tmp_path, 400, 300)
    top, left, height, width = box = (37, 51, side, side + 12)
    full, unit = decode_for_crops(open_image(str(path)), [only(box=(0, 0, 1, 1))], SIZE)
    reduced, scale = decode_for_crops(open_image(str(path)), [only(box=box)], SIZE)
    assert unit == 1.0 and scale < 1.0
    ours = crop_pixels(reduced, box, scale, SIZE).float()

    def levels_from_full_decode(shift: float) -> float:
        shifted = (top, left + shift, height, width)
        return (ours - crop_pixels(full, shifted, unit, SIZE).float()).abs().mean().item()

    # Closest to the full decoding's crop at the same box (not at a box moved by a fraction of a pixel
    # either way): only the filters differ (libjpeg's scaled inverse DCT + bilinear, or bilinear alone).
    assert levels_from_full_decode(0) <= 3.0
    assert levels_from_full_decode(0) < min(levels_from_full_decode(s) for s in (-0.5, 0.5))


def test_other_formats_decode_at_full_size(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    colour_image(8 * SIZE, 8 * SIZE).save(path)
    image, scale = decode_for_crops(open_image(str(path)), [only(box=(0, 0, 8 * SIZE, 8 * SIZE))], SIZE)
    assert scale == 1.0 and image.size == (8 * SIZE, 8 * SIZE)


def test_grayscale_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.jpg"
    colour_image(4 * SIZE, 4 * SIZE).convert("L").save(path)
    for view in PretrainCrops(SIZE, CROP_MIN)(open_image(str(path)), sample_rng(0, 0, 0)):
        assert view.pixels.shape == (3, SIZE, SIZE)
        assert torch.equal(view.pixels[0], view.pixels[2])
