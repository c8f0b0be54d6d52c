"""`python -m sogclr.imagenet` on a tiny ImageNet in the official layout: 101 classes (the 100 of
ImageNet-100 and one more), one training image each, a flat validation folder of 101 images, and a
devkit archive written here (meta.mat with scipy.io.savemat, the validation ground truth)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision.datasets.imagenet as tv_imagenet
from PIL import Image
from torchvision.datasets.utils import calculate_md5

from sogclr import imagenet
from sogclr.contract.config import PretrainConfig
from sogclr.contract.dataindex import build_index, imagenet100_classes
from sogclr.contract.shards import read_shard_index

WNIDS = imagenet100_classes() + ["n09999999"]
VAL_IMAGES = [f"ILSVRC2012_val_{number:08d}.JPEG" for number in range(1, len(WNIDS) + 1)]
# The class of each validation image: a permutation, so that the order of the labels matters.
VAL_WNIDS = [WNIDS[(7 * number) % len(WNIDS)] for number in range(len(WNIDS))]


def jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), color=(shade % 256, 30, 60)).save(buffer, "JPEG")
    return buffer.getvalue()


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def devkit_archive(path: Path) -> Path:
    """ILSVRC2012_devkit_t12.tar.gz: data/meta.mat (the synsets, leaves numbered 1..N, plus one inner
    node that torchvision skips) and data/ILSVRC2012_validation_ground_truth.txt (one number per image)."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height", "num_train_images"]
    synsets = np.zeros(len(WNIDS) + 1, dtype=[(field, object) for field in fields])
    for row, wnid in enumerate(WNIDS):
        synsets[row] = (row + 1, wnid, f"class {row}", "a gloss", 0, 0, 1)
    synsets[-1] = (len(WNIDS) + 1, "n00000001", "an inner node", "a gloss", 3, 1, 0)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    truth = "".join(f"{WNIDS.index(wnid) + 1}\n" for wnid in VAL_WNIDS).encode()
    with tarfile.open(path, "w:gz") as archive:
        add(archive, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        add(archive, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
    return path


def official_files(directory: Path) -> dict[str, Path]:
    """The three archives, and what they unpack to (train: class folders; val: one flat folder)."""
    directory.mkdir()
    files = {"devkit": devkit_archive(directory / "ILSVRC2012_devkit_t12.tar.gz")}
    with tarfile.open(directory / "ILSVRC2012_img_train.tar", "w") as train:
        for number, wnid in enumerate(WNIDS):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_archive:
                add(class_archive, f"{wnid}_{number}.JPEG", jpeg(number))
            add(train, f"{wnid}.tar", inner.getvalue())
            (directory / "train" / wnid).mkdir(parents=True)
            (directory / "train" / wnid / f"{wnid}_{number}.JPEG").write_bytes(jpeg(number))
    with tarfile.open(directory / "ILSVRC2012_img_val.tar", "w") as val:
        for number, name in enumerate(VAL_IMAGES):
            add(val, name, jpeg(100 + number))
            (directory / "val").mkdir(exist_ok=True)
            (directory / "val" / name).write_bytes(jpeg(100 + number))
    files |= {"train": directory / "ILSVRC2012_img_train.tar", "val": directory / "ILSVRC2012_img_val.tar"}
    return files


@pytest.fixture
def official(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    files = official_files(tmp_path / "official")
    # These archives are not the official ones: their own checksums stand in for the official MD5 sums
    # that torchvision checks every archive against.
    for kind, path in files.items():
        monkeypatch.setitem(tv_imagenet.ARCHIVE_META, kind, (path.name, calculate_md5(str(path))))
    return files


def check_layout(out: Path) -> None:
    """OUT holds the 101 classes, each training image in its class, each validation image in the class
    the ground truth gives it; the library's imagenet1k and imagenet100 datasets read it."""
    for number, wnid in enumerate(WNIDS):
        assert [p.name for p in (out / "train" / wnid).iterdir()] == [f"{wnid}_{number}.JPEG"]
    for name, wnid in zip(VAL_IMAGES, VAL_WNIDS, strict=True):
        assert (out / "val" / wnid / name).is_file()
    full = build_index(PretrainConfig(dataset="imagenet1k", data_dir=out))
    assert full.splits["train"].classes == WNIDS and full.splits["val"].count == len(VAL_IMAGES)
    subset = build_index(PretrainConfig(dataset="imagenet100", data_dir=out))
    assert subset.splits["train"].classes == imagenet100_classes()


def test_official_archives_become_the_library_layout(tmp_path: Path, official: dict[str, Path]) -> None:
    out = tmp_path / "imagenet"
    arguments = [str(out), "--devkit", str(official["devkit"])]
    assert imagenet.main([*arguments, "--train", str(official["train"]), "--val", str(official["val"])]) == 0
    check_layout(out)
    assert not any(path.is_symlink() for path in out.rglob("*"))  # extracted, not linked
    assert (out / "meta.bin").is_file()  # torchvision's, as its ImageNet dataset reads it


def test_unpacked_trees_are_linked_not_copied(
    tmp_path: Path, official: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    out, subset, unpacked = tmp_path / "imagenet", tmp_path / "imagenet100", official["train"].parent
    arguments = [str(out), "--devkit", str(official["devkit"]), "--imagenet100", str(subset)]
    assert (
        imagenet.main([*arguments, "--train", str(unpacked / "train"), "--val", str(unpacked / "val")]) == 0
    )
    check_layout(out)
    assert all((out / "train" / wnid).is_symlink() for wnid in WNIDS)
    assert all(path.is_symlink() for path in (out / "val").glob("*/*.JPEG"))
    assert f"{out}: 101 classes" in capsys.readouterr().out
    for split in ("train", "val"):
        assert sorted(p.name for p in (subset / split).iterdir()) == imagenet100_classes()
    folder = build_index(PretrainConfig(dataset="folder", data_dir=subset))
    assert folder.splits["train"].count == folder.splits["val"].count == 100

    assert (
        imagenet.main([*arguments[:3], "--train", str(unpacked / "train"), "--val", str(unpacked / "val")])
        == 2
    )
    assert "exists already" in capsys.readouterr().err


@pytest.mark.parametrize("given", ["archives", "unpacked"])
def test_shards_are_written_straight_from_the_official_files(
    tmp_path: Path, official: dict[str, Path], given: str, capsys: pytest.CaptureFixture
) -> None:
    """--shards: the same images, classes and validation labels as the tree, each image's bytes as in
    the archives, and no image written as a file of its own."""
    tree, shards = tmp_path / "tree", tmp_path / "shards"
    unpacked = official["train"].parent
    train, val = (
        (official["train"], official["val"])
        if given == "archives"
        else (unpacked / "train", unpacked / "val")
    )
    arguments = ["--devkit", str(official["devkit"]), "--train", str(train), "--val", str(val)]
    assert imagenet.main([str(tree), *arguments]) == 0
    assert imagenet.main([str(shards), *arguments, "--shards"]) == 0
    assert f"data_dir: {shards}, data_format: shards" in capsys.readouterr().out
    assert sorted(p.name for p in shards.iterdir()) == [
        "meta.bin",
        "shards.json",
        "train-000000.tar",
        "val-000000.tar",
    ]
    for dataset in ("imagenet1k", "imagenet100"):
        from_tree = build_index(PretrainConfig(dataset=dataset, data_dir=tree))
        from_shards = build_index(PretrainConfig(dataset=dataset, data_dir=shards, data_format="shards"))
        assert from_shards.fingerprint == from_tree.fingerprint
    index = read_shard_index(shards)
    val_split, arrays = index.splits["val"], index.splits["val"].member_arrays()
    with open(shards / "val-000000.tar", "rb") as file:
        for i, path in enumerate(val_split.split.relative_paths()):
            file.seek(arrays["offset"][i])
            assert file.read(arrays["size"][i]) == (tree / "val" / path).read_bytes()
