"""Shards written from a real image tree (the digits): what other tools read in them, the same batches
bit for bit as the tree, a class subset, flat sample arrays, and errors that name the image or shard."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sogclr.contract.config import PretrainConfig, RunConfig
from sogclr.contract.dataindex import DatasetError, build_index, changes_since, prepare_data_root
from sogclr.contract.shards import SHARD_INDEX, pack_tree, read_shard_index
from sogclr.data.datasets import (
    FlatStrings,
    IndexedImageFolder,
    ResumableDistributedSampler,
    UnreadableImage,
    build_loader,
    build_pretrain_dataset,
    set_loader_epoch,
)
from sogclr.data.transforms import EvalAugment
from sogclr.shards import main

SHARD_BYTES = 250_000  # about 24 shards for the digits (2 kB per image with its tar headers)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.getbasetemp() / "digits-cache"
    return prepare_data_root(PretrainConfig(dataset="digits", data_dir=cache))


@pytest.fixture(scope="module")
def shards(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "digits"
    pack_tree(tree, out, "folder", SHARD_BYTES)
    return out


def configs(tree: Path, shards: Path, **fields: object) -> tuple[PretrainConfig, PretrainConfig]:
    common = {"dataset": "folder", "image_size": 16, **fields}
    return PretrainConfig(data_dir=tree, **common), PretrainConfig(
        data_dir=shards, data_format="shards", **common
    )


def shard_dataset(cfg: PretrainConfig) -> IndexedImageFolder:
    index = dataclasses.replace(build_index(cfg), shards=read_shard_index(cfg.data_dir))
    return build_pretrain_dataset(cfg, index)


def test_shards_hold_every_image_unchanged_as_webdataset_members(tree: Path, shards: Path) -> None:
    index = read_shard_index(shards)
    # a shard ends at the first image that would take it past SHARD_BYTES (plus tar's end records)
    assert all(s.bytes <= SHARD_BYTES + 12_288 for s in index.shard_files)
    assert len(index.shard_files) >= index.total_bytes // (SHARD_BYTES + 12_288) > 10
    train = index.splits["train"]
    assert (
        train.split.identity
        == build_index(PretrainConfig(dataset="digits", data_dir=tree.parent)).splits["train"].identity
    )  # the same images in the same order: the tree's dataset indices
    # A stdlib tar reader sees webdataset's layout: <class>/<stem>.png and <class>/<stem>.cls
    with tarfile.open(shards / "train-000000.tar") as archive:
        names = archive.getnames()
        first_class = train.split.classes[0]
        first = train.split.files[0][0]
        assert names[:2] == [f"{first_class}/{first[:-4]}.png", f"{first_class}/{first[:-4]}.cls"]
        assert archive.extractfile(names[1]).read() == b"0"
    arrays = train.member_arrays()
    for i in (0, 700, train.split.count - 1):  # each member's bytes at its recorded offset
        path = list(train.split.relative_paths())[i]
        shard = shards / train.shards[arrays["shard"][i]].name
        with open(shard, "rb") as file:
            file.seek(arrays["offset"][i])
            assert file.read(arrays["size"][i]) == (tree / "train" / path).read_bytes()


def test_tree_and_shards_give_the_same_batches_bit_for_bit(tree: Path, shards: Path) -> None:
    for augment_on in ("loader", "device"):
        batches = []
        for cfg in configs(tree, shards, augment_on=augment_on):
            index = build_index(cfg)
            if cfg.data_format == "shards":
                index = dataclasses.replace(index, shards=read_shard_index(shards))
            dataset = build_pretrain_dataset(cfg, index)
            sampler = ResumableDistributedSampler(len(dataset), 64, 0, 1, seed=3)
            loader = build_loader(dataset, sampler, 64, workers=2, pin_memory=False)
            set_loader_epoch(loader, epoch=1, start_step=2)
            batches.append([batch for _, batch in zip(range(3), loader, strict=False)])
        for from_tree, from_shards in zip(*batches, strict=True):
            views_tree, views_shards = from_tree[0], from_shards[0]
            for view_tree, view_shards in zip(views_tree, views_shards, strict=True):
                tensors = (
                    (view_tree.pixels, view_shards.pixels)
                    if augment_on == "device"
                    else (view_tree, view_shards)
                )
                assert torch.equal(*tensors)
            assert torch.equal(from_tree[1], from_shards[1]) and torch.equal(from_tree[2], from_shards[2])


def test_a_class_subset_reads_its_classes_from_the_full_shards(tree: Path, shards: Path) -> None:
    split = read_shard_index(shards).split("val", ["3", "7"])
    subset = IndexedImageFolder.from_shards(
        read_shard_index(shards), "val", split.split, EvalAugment(16, False)
    )
    from_tree = IndexedImageFolder(tree / "val", split.split, EvalAugment(16, False))
    assert subset.classes == ["3", "7"] and len(subset) == len(from_tree) == split.split.count
    for i in (0, len(subset) - 1):
        assert torch.equal(subset[i][0], from_tree[i][0]) and subset[i][1] == from_tree[i][1]
    assert subset.identity["content"] != read_shard_index(shards).splits["val"].content


def test_samples_are_flat_arrays_and_a_subset_keeps_them_so(tree: Path, shards: Path) -> None:
    dataset = shard_dataset(configs(tree, shards)[1])
    assert isinstance(dataset.targets, np.ndarray) and isinstance(dataset.images.paths, FlatStrings)
    assert isinstance(dataset.images.offset, np.ndarray)
    part = dataset.subset([5, 900])
    assert part.targets.tolist() == [dataset.targets[5], dataset.targets[900]]
    assert part.images.read(1) == dataset.images.read(900)
    names = FlatStrings(["a/é.png", "b/x", "c"])
    assert [names[i] for i in range(3)] == ["a/é.png", "b/x", "c"] and names.take([2, 0])[1] == "a/é.png"


def test_an_unreadable_image_names_its_path_and_index(tree: Path, shards: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    for split in ("train", "val"):
        (broken / split / "junk").mkdir(parents=True)
        (broken / split / "junk" / "a.png").write_bytes(b"not a png")
    cfg = PretrainConfig(dataset="folder", data_dir=broken, image_size=16)
    with pytest.raises(
        UnreadableImage, match=rf"dataset index 0: {broken}/train/junk/a.png: UnidentifiedImage"
    ):
        build_pretrain_dataset(cfg, build_index(cfg))[0]
    packed = pack_tree(broken, tmp_path / "packed")
    dataset = shard_dataset(
        PretrainConfig(**{**cfg.model_dump(), "data_dir": packed.directory, "data_format": "shards"})
    )
    with pytest.raises(
        UnreadableImage, match=r"dataset index 0: junk/a.png in .*train-000000.tar at byte 512"
    ):
        dataset[0]


def test_damaged_or_changed_shards_are_named(tree: Path, shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in shards.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    tree_cfg, cfg = configs(tree, copy)
    index = build_index(cfg)
    assert changes_since(cfg, index) is None
    with open(copy / "val-000000.tar", "r+b") as file:
        file.truncate(1000)
    with pytest.raises(DatasetError, match=r"val-000000.tar: 1000 bytes, but .*shards.json says"):
        read_shard_index(copy).check_sizes()
    document = json.loads((copy / SHARD_INDEX).read_text())
    document["splits"]["train"]["count"] += 1
    (copy / SHARD_INDEX).write_text(json.dumps(document))
    with pytest.raises(DatasetError, match="is damaged"):
        read_shard_index(copy)
    assert changes_since(tree_cfg, build_index(tree_cfg)) is None


def test_the_command_packs_a_tree_and_says_how_to_name_it(tree: Path, tmp_path: Path, capsys) -> None:
    assert main([str(tree), str(tmp_path / "out"), "--shard-gb", "0.001"]) == 0
    assert f"data_dir: {tmp_path / 'out'}, data_format: shards" in capsys.readouterr().out
    assert main([str(tree), str(tmp_path / "out")]) == 2
    assert "exists already" in capsys.readouterr().err


def test_the_spec_validates_the_data_format() -> None:
    with pytest.raises(ValueError, match="pretrain.data_format: shards needs dataset"):
        RunConfig(run_dir="/r", pretrain={"dataset": "digits", "data_format": "shards"})
    with pytest.raises(ValueError, match="pretrain.stage_dir: only shards are staged"):
        RunConfig(run_dir="/r", pretrain={"dataset": "folder", "data_dir": "/d", "stage_dir": "/tmp"})
    with pytest.raises(ValueError, match="data_format"):
        RunConfig(run_dir="/r", pretrain={"dataset": "folder", "data_dir": "/d", "data_format": "tar"})
