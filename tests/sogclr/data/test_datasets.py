"""Data pipeline: digits root, samplers, position-seeded augmentations, loaders."""

from __future__ import annotations

import multiprocessing as mp
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import default_collate
from torchvision.transforms import RandomResizedCrop

from sogclr.contract.config import PretrainConfig
from sogclr.contract.dataindex import (
    DIGITS_VERSION,
    _materialise_once,
    build_index,
    imagenet100_classes,
    index_split,
    prepare_data_root,
)
from sogclr.data.augment import CropBatch, crop_box, finish_views
from sogclr.data.datasets import (
    IndexedImageFolder,
    ResumableDistributedSampler,
    ShardSampler,
    build_lincls_datasets,
    build_loader,
    build_pretrain_dataset,
    sample_rng,
    set_loader_epoch,
)
from sogclr.data.transforms import EvalAugment, PretrainAugment

DIGITS = load_digits()


def digits_config(cache: Path, **overrides) -> PretrainConfig:
    return PretrainConfig(dataset="digits", data_dir=cache, image_size=32, crop_min=0.2, **overrides)


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    prepare_data_root(digits_config(cache))
    return cache


def files_by_split(root: Path) -> dict[str, dict[int, str]]:
    """split -> {original digits index: class folder name}, read from the tree on disk."""
    return {
        split: {int(png.stem): png.parent.name for png in (root / split).glob("*/*.png")}
        for split in ("train", "val")
    }


# ---------------------------------------------------------------------------------------------- digits root


def test_digits_root_is_a_stratified_split_of_all_digits(digits_cache: Path) -> None:
    root = prepare_data_root(digits_config(digits_cache))
    assert root == digits_cache / DIGITS_VERSION
    for split in ("train", "val"):
        assert sorted(p.name for p in (root / split).iterdir()) == [str(d) for d in range(10)]

    files = files_by_split(root)
    assert files["train"].keys().isdisjoint(files["val"].keys())
    assert sorted(files["train"].keys() | files["val"].keys()) == list(range(len(DIGITS.target)))
    assert len(files["val"]) == 360  # ceil(0.2 * 1797)
    for split in files.values():
        assert all(folder == str(DIGITS.target[i]) for i, folder in split.items())

    class_sizes = np.bincount(DIGITS.target)
    val_sizes = Counter(files["val"].values())
    for digit, size in enumerate(class_sizes):
        assert abs(val_sizes[str(digit)] - 0.2 * size) <= 1


def test_digit_images_are_upscaled_originals(digits_cache: Path) -> None:
    root = digits_cache / DIGITS_VERSION
    for index in (0, 17, 1796):
        (png,) = root.glob(f"*/*/{index:04d}.png")
        image = Image.open(png)
        assert (image.mode, image.size) == ("RGB", (32, 32))
        pixels = np.asarray(image, dtype=np.float64)
        assert np.array_equal(pixels[..., 0], pixels[..., 2])
        block_means = pixels[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
        assert np.corrcoef(block_means.ravel(), DIGITS.images[index].ravel())[0, 1] > 0.95


def test_digits_root_is_built_once(digits_cache: Path) -> None:
    root = digits_cache / DIGITS_VERSION
    some_png = next(root.glob("train/*/*.png"))
    written_at = some_png.stat().st_mtime_ns
    assert prepare_data_root(digits_config(digits_cache)) == root
    assert some_png.stat().st_mtime_ns == written_at
    assert [p.name for p in digits_cache.iterdir()] == [DIGITS_VERSION]  # no staging dirs left


def _prepare_after_barrier(cache: Path, barrier, results) -> None:
    barrier.wait()
    try:
        results.put(str(prepare_data_root(digits_config(cache))))
    except Exception as error:  # reported to the parent, which would otherwise wait for a result
        results.put(repr(error))


def test_concurrent_preparation_yields_one_complete_tree(tmp_path: Path) -> None:
    context = mp.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=_prepare_after_barrier, args=(tmp_path, barrier, results)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    roots = {results.get(timeout=60) for _ in workers}
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    assert roots == {str(tmp_path / DIGITS_VERSION)}
    assert [p.name for p in tmp_path.iterdir()] == [DIGITS_VERSION]
    files = files_by_split(tmp_path / DIGITS_VERSION)
    assert len(files["train"]) + len(files["val"]) == len(DIGITS.target)


def test_loser_of_a_race_keeps_the_winners_tree(tmp_path: Path) -> None:
    root = tmp_path / "tree"

    def write_while_another_process_wins(staging: Path) -> None:
        (root / "split").mkdir(parents=True)
        (root / "split" / "winner").write_text("first")
        (staging / "split").mkdir()
        (staging / "split" / "loser").write_text("second")

    assert _materialise_once(root, write_while_another_process_wins) == root
    assert [p.name for p in (root / "split").iterdir()] == ["winner"]
    assert [p.name for p in tmp_path.iterdir()] == ["tree"]


# ------------------------------------------------------------------------------------------ other roots


def test_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=re.escape(str(missing / "train"))):
        prepare_data_root(PretrainConfig(dataset="folder", data_dir=missing))
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "val"))):
        prepare_data_root(PretrainConfig(dataset="imagenet1k", data_dir=tmp_path))


def test_imagenet100_list_is_the_first_100_wnids() -> None:
    wnids = imagenet100_classes()
    assert len(wnids) == len(set(wnids)) == 100
    assert wnids == sorted(wnids)
    assert all(re.fullmatch(r"n\d{8}", wnid) for wnid in wnids)
    assert (wnids[0], wnids[-1]) == ("n01440764", "n01855672")


def fake_imagenet(root: Path, wnids: list[str]) -> None:
    for split in ("train", "val"):
        for wnid in wnids:
            (root / split / wnid).mkdir(parents=True)
            Image.new("RGB", (12, 10), color=(len(wnid), 0, 0)).save(root / split / wnid / "a.png")


def test_imagenet100_uses_exactly_the_listed_classes(tmp_path: Path) -> None:
    wnids = imagenet100_classes()
    fake_imagenet(tmp_path, wnids + ["n09999999"])  # a 101st ImageNet-1K class, not in the subset
    cfg = PretrainConfig(dataset="imagenet100", data_dir=tmp_path, image_size=8)
    index = build_index(cfg)
    train, val = build_lincls_datasets(cfg, index)
    assert build_pretrain_dataset(cfg, index).classes == train.classes == val.classes == wnids
    assert sorted(train.targets) == list(range(100))


def test_imagenet100_missing_class_is_a_clear_error(tmp_path: Path) -> None:
    wnids = imagenet100_classes()
    fake_imagenet(tmp_path, wnids[:50] + wnids[51:])
    cfg = PretrainConfig(dataset="imagenet100", data_dir=tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "train" / wnids[50]))):
        build_index(cfg)


# ------------------------------------------------------------------------------------------------ samplers


def epoch_indices(size: int, batch: int, world: int, epoch: int, start_step: int = 0) -> list[list[int]]:
    """Per rank, the indices one epoch yields."""
    samplers = [ResumableDistributedSampler(size, batch, rank, world, seed=3) for rank in range(world)]
    for sampler in samplers:
        sampler.set_epoch(epoch, start_step)
    return [list(sampler) for sampler in samplers]


def test_sampler_splits_the_same_global_batches_for_any_world_size() -> None:
    size, batch = 103, 12
    (single,) = epoch_indices(size, batch, world=1, epoch=5)
    assert len(single) == (size // batch) * batch
    assert len(set(single)) == len(single) and set(single) <= set(range(size))
    for world in (2, 4):
        ranks = epoch_indices(size, batch, world, epoch=5)
        local = batch // world
        for step in range(size // batch):
            global_batch = [i for rank in ranks for i in rank[step * local : (step + 1) * local]]
            assert global_batch == single[step * batch : (step + 1) * batch]


def test_sampler_shuffles_per_epoch_and_seed() -> None:
    (epoch0,), (epoch1,) = epoch_indices(50, 10, 1, epoch=0), epoch_indices(50, 10, 1, epoch=1)
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1
    assert epoch_indices(50, 10, 1, epoch=0) == [epoch0]
    other_seed = ResumableDistributedSampler(50, 10, 0, 1, seed=4)
    assert list(other_seed) != epoch0


def test_resuming_at_step_k_yields_exactly_the_tail() -> None:
    full = epoch_indices(64, 8, world=2, epoch=2)
    for start_step in (0, 3, 8):
        resumed = epoch_indices(64, 8, world=2, epoch=2, start_step=start_step)
        assert resumed == [rank[start_step * 4 :] for rank in full]
    sampler = ResumableDistributedSampler(64, 8, rank=1, world_size=2, seed=0)
    sampler.set_epoch(0, start_step=3)
    assert len(sampler) == len(list(sampler)) == 5 * 4


def test_sampler_rejects_inconsistent_sizes() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ResumableDistributedSampler(100, 10, rank=0, world_size=3, seed=0)
    with pytest.raises(ValueError, match="larger than the dataset"):
        ResumableDistributedSampler(10, 16, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="start_step"):
        ResumableDistributedSampler(10, 4, rank=0, world_size=2, seed=0).set_epoch(0, start_step=3)


def test_shard_sampler_partitions_all_indices() -> None:
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]
    assert sorted(i for shard in shards for i in shard) == list(range(10))


# ----------------------------------------------------------------------------------------- augmentations


def test_crop_box_follows_random_resized_crop() -> None:
    rng = sample_rng(0, 0, 0)
    for width, height in ((500, 375), (32, 32)):
        for _ in range(200):
            top, left, h, w = crop_box(width, height, (0.2, 1.0), rng)
            assert 0 <= top <= height - h and 0 <= left <= width - w
            # Sides are rounded to whole pixels, so ratio and area hold up to half a pixel per side.
            assert (w - 0.5) / (h + 0.5) <= 4 / 3 and (w + 0.5) / (h - 0.5) >= 3 / 4
            assert 0.2 <= (w + 0.5) * (h + 0.5) / (width * height) and (w - 0.5) * (h - 0.5) <= width * height
    # No 3:4..4:3 crop of 20% fits a 40x300 strip: both fall back to the same central crop.
    expected = RandomResizedCrop.get_params(
        Image.new("RGB", (40, 300)), scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3]
    )
    assert crop_box(40, 300, (0.2, 1.0), rng) == tuple(expected) == (123, 0, 53, 40)


def digit_image(index: int) -> Image.Image:
    pixels = np.round(DIGITS.images[index] * 255 / 16).astype(np.uint8)
    return Image.fromarray(pixels).resize((32, 32)).convert("RGB")


def test_pretrain_views_are_a_function_of_seed_epoch_and_index() -> None:
    augment, image = PretrainAugment(image_size=24, crop_min=0.2), digit_image(0)
    view1, view2 = augment(image, sample_rng(0, 0, 7))
    assert view1.shape == view2.shape == (3, 24, 24) and view1.dtype == torch.float32
    assert not torch.equal(view1, view2)
    again = augment(image, sample_rng(0, 0, 7))
    assert torch.equal(view1, again[0]) and torch.equal(view2, again[1])
    for other in (sample_rng(0, 1, 7), sample_rng(0, 0, 8), sample_rng(1, 0, 7)):
        assert not torch.equal(view1, augment(image, other)[0])


def test_eval_augment_val_is_deterministic_center_crop() -> None:
    image = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint32).reshape(40, 60, 3).astype(np.uint8))
    val = EvalAugment(image_size=28, train=False)
    a, b = val(image, sample_rng(0, 0, 0)), val(image, sample_rng(5, 9, 1))
    assert a.shape == (3, 28, 28) and torch.equal(a, b)
    # Resize(32) keeps the aspect ratio (40x60 -> 32x48), the crop then takes the middle 28x28.
    resized = np.asarray(image.resize((48, 32), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    expected = (resized[2:30, 10:38] - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(a.permute(1, 2, 0).numpy(), expected, atol=0.02)
    train = EvalAugment(image_size=28, train=True)
    assert not torch.equal(train(image, sample_rng(0, 0, 0)), train(image, sample_rng(0, 1, 0)))


# --------------------------------------------------------------------------------------- dataset, loader


def finished(views: torch.Tensor | CropBatch) -> torch.Tensor:
    """A batch of views as the model gets them: crops (augment_on=device) finished, here on the CPU."""
    return finish_views(views) if isinstance(views, CropBatch) else views


@pytest.mark.parametrize("augment_on", ["loader", "device"])
def test_pretrain_dataset_returns_two_views_target_and_index(digits_cache: Path, augment_on: str) -> None:
    cfg = digits_config(digits_cache, augment_on=augment_on)
    dataset = build_pretrain_dataset(cfg, build_index(cfg))
    assert dataset.classes == [str(d) for d in range(10)] and len(dataset) == 1797 - 360
    (view1, view2), target, index = dataset[123]
    if augment_on == "device":
        assert view1.pixels.dtype == torch.uint8
        view1, view2 = (finished(default_collate([view]))[0] for view in (view1, view2))
    assert view1.shape == view2.shape == (3, 32, 32) and view1.dtype == torch.float32
    assert index == 123 and target == int(Path(dataset.images.name(123)).parent.name)
    assert not torch.equal(view1, view2)


def test_class_subset_restricts_and_renumbers(digits_cache: Path) -> None:
    root = digits_cache / DIGITS_VERSION / "val"
    dataset = IndexedImageFolder(root, index_split(root, ["3", "7"]), EvalAugment(32, train=False))
    assert dataset.classes == ["3", "7"]
    paths = [Path(dataset.images.name(i)) for i in range(len(dataset))]
    assert {path.parent.name for path in paths} == {"3", "7"}
    assert all(t == dataset.classes.index(p.parent.name) for p, t in zip(paths, dataset.targets, strict=True))


def load_epochs(dataset: IndexedImageFolder, workers: int, epochs: int) -> list[dict[int, torch.Tensor]]:
    """Per epoch, index -> both views stacked, read through a loader with `workers` processes."""
    sampler = ResumableDistributedSampler(48, 16, rank=0, world_size=1, seed=0)
    loader = build_loader(dataset, sampler, batch_size=16, workers=workers, pin_memory=False)
    seen = []
    for epoch in range(epochs):
        set_loader_epoch(loader, epoch)
        views = {}
        for batch_views, targets, indices in loader:
            view1, view2 = (finished(views) for views in batch_views)
            assert view1.shape == (16, 3, 32, 32) and targets.dtype == indices.dtype == torch.int64
            assert targets.tolist() == [dataset.targets[i] for i in indices.tolist()]
            views.update(zip(indices.tolist(), torch.stack([view1, view2], 1)))
        seen.append(views)
    return seen


@pytest.mark.parametrize("augment_on", ["loader", "device"])
def test_augmentations_do_not_depend_on_loader_workers(digits_cache: Path, augment_on: str) -> None:
    cfg = digits_config(digits_cache, seed=1, augment_on=augment_on)
    dataset = build_pretrain_dataset(cfg, build_index(cfg))
    in_process = load_epochs(dataset, workers=0, epochs=2)
    persistent_workers = load_epochs(dataset, workers=2, epochs=2)
    for epoch in range(2):
        assert in_process[epoch].keys() == persistent_workers[epoch].keys() == set(range(48))
        for index, views in in_process[epoch].items():
            assert torch.equal(views, persistent_workers[epoch][index])
    assert not torch.equal(in_process[0][5], in_process[1][5])


def test_loader_batch_must_match_the_sampler(digits_cache: Path) -> None:
    cfg = digits_config(digits_cache)
    dataset = build_pretrain_dataset(cfg, build_index(cfg))
    sampler = ResumableDistributedSampler(len(dataset), 32, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="per-rank batch 16"):
        build_loader(dataset, sampler, batch_size=32, workers=0, pin_memory=False)
