"""From the official ImageNet-1K (ILSVRC2012) files to the layout the library reads, in one command:

    python -m sogclr.imagenet OUT --devkit ILSVRC2012_devkit_t12.tar.gz \\
        --train ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar [--shards | --imagenet100 OUT100]

writes `OUT/train/<wnid>/*.JPEG` and `OUT/val/<wnid>/*.JPEG`, the `data_dir` of datasets `imagenet1k` and
`imagenet100`. Each of `--train` and `--val` is the official archive or what it unpacks to:

- `--train` archive: extracted by torchvision (`parse_train_archive`: the archive, then each class's tar);
  a directory of class folders (`<wnid>/*.JPEG`): `OUT/train/<wnid>` is a link to each folder, nothing
  is copied; a directory of class tars (the outer archive unpacked): each is extracted.
- `--val` archive: extracted and sorted into class folders by torchvision (`parse_val_archive`); the
  flat directory of the 50,000 images: `OUT/val/<wnid>/<image>` is a link to each image.

With `--shards`, OUT becomes a shard directory instead (sogclr/contract/shards.py: OUT/shards.json,
OUT/train-*.tar, OUT/val-*.tar of about a gigabyte each, read with `data_format: shards`), written
straight from the archives (or unpacked folders): no image is ever a file of its own. Datasets
`imagenet1k` and `imagenet100` both read these shards.

The validation labels come from the devkit (torchvision's `parse_devkit_archive`, which also writes
`OUT/meta.bin`, what `torchvision.datasets.ImageNet(OUT)` reads). Archives are checked against the official
MD5 sums by torchvision first. `--imagenet100 OUT100` also makes an ImageNet-100 tree, the reference's 100
classes (sogclr/contract/imagenet100.txt) as links to OUT's class folders: a `folder` dataset (the
`imagenet100` dataset reads them from OUT itself).
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from torchvision.datasets.imagenet import (
    load_meta_file,
    parse_devkit_archive,
    parse_train_archive,
    parse_val_archive,
)
from torchvision.datasets.utils import extract_archive

from sogclr.contract.dataindex import SPLITS, DatasetError, imagenet100_classes
from sogclr.contract.shards import (
    SHARD_BYTES,
    ShardIndex,
    SplitWriter,
    open_shard_directory,
    read_shard_index,
    write_shard_index,
)
from sogclr.shards import summary


class PreparationError(Exception):
    """The given files are not what the command needs: one line naming the file."""


def prepare(out: Path, devkit: Path, train: Path, val: Path) -> None:
    """OUT/train and OUT/val from the official files (see the module's description)."""
    for split in SPLITS:
        if (out / split).exists():
            raise PreparationError(f"{out / split} exists already; remove it to prepare it again")
    out.mkdir(parents=True, exist_ok=True)
    parse_devkit_archive(out, str(devkit.absolute()))
    val_wnids = load_meta_file(out)[1]
    prepare_train(out, train)
    prepare_val(out, val, val_wnids)


def prepare_train(out: Path, train: Path) -> None:
    if train.is_file():
        parse_train_archive(out, str(train.absolute()), folder="train")
        return
    folders = sorted(entry for entry in train.iterdir() if entry.is_dir())
    archives = sorted(train.glob("*.tar"))
    if not folders and not archives:
        raise PreparationError(f"--train {train}: neither class folders nor class archives (<wnid>.tar)")
    (out / "train").mkdir()
    for folder in folders:
        (out / "train" / folder.name).symlink_to(folder.absolute(), target_is_directory=True)
    for archive in archives:
        extract_archive(str(archive), str(out / "train" / archive.stem))


def prepare_val(out: Path, val: Path, wnids: list[str]) -> None:
    if val.is_file():
        parse_val_archive(out, str(val.absolute()), wnids, folder="val")
        return
    # torchvision's pairing of labels and images: the images sorted by name, the labels in file order.
    images = sorted(entry.name for entry in os.scandir(val) if entry.is_file())
    if len(images) != len(wnids):
        raise PreparationError(f"--val {val}: {len(images)} images, but the devkit labels {len(wnids)}")
    for wnid in set(wnids):
        (out / "val" / wnid).mkdir(parents=True)
    for wnid, image in zip(wnids, images, strict=True):
        (out / "val" / wnid / image).symlink_to(val.absolute() / image)


def prepare_shards(
    out: Path, devkit: Path, train: Path, val: Path, shard_bytes: int = SHARD_BYTES
) -> ShardIndex:
    """OUT as a shard directory, written from the official files (see the module's description)."""
    open_shard_directory(out)
    parse_devkit_archive(out, str(devkit.absolute()))  # OUT/meta.bin
    val_wnids = load_meta_file(out)[1]
    splits = {}
    for split, classes in (("train", train_classes(train)), ("val", val_classes(val, val_wnids))):
        writer = SplitWriter(out, split, shard_bytes)
        for wnid, images in classes:
            for name, data in images:
                writer.add(wnid, name, data)
        splits[split] = writer.finish()
    write_shard_index(out, "imagenet1k", splits)
    return read_shard_index(out)


Images = Iterator[tuple[str, bytes]]


def train_classes(train: Path) -> Iterator[tuple[str, Images]]:
    """(wnid, its images sorted by name) for each class in sorted order, from the training archive (its
    class archives are read in place, one at a time), a folder of class archives, or of class folders."""
    if train.is_file():
        with tarfile.open(train) as outer:
            members = sorted(
                (m for m in outer if m.isfile() and m.name.endswith(".tar")), key=lambda m: m.name
            )
            for member in members:
                yield Path(member.name).stem, archive_images(outer.extractfile(member))
        return
    folders = sorted(entry for entry in train.iterdir() if entry.is_dir())
    archives = sorted(train.glob("*.tar"))
    if not folders and not archives:
        raise PreparationError(f"--train {train}: neither class folders nor class archives (<wnid>.tar)")
    for folder in folders:
        yield (
            folder.name,
            ((path.name, path.read_bytes()) for path in sorted(folder.iterdir()) if path.is_file()),
        )
    for archive in archives:
        with open(archive, "rb") as file:
            yield archive.stem, archive_images(file)


def archive_images(file: BinaryIO) -> Images:
    """The files of one class's archive, sorted by name (one class is held in memory: ~140 MB)."""
    with tarfile.open(fileobj=file, mode="r:") as archive:
        images = [(m.name, archive.extractfile(m).read()) for m in archive if m.isfile()]
    return iter(sorted(images))


def val_classes(val: Path, wnids: list[str]) -> Iterator[tuple[str, Images]]:
    """(wnid, its validation images sorted by name) for each class in sorted order, from the validation
    archive (read by offset, class by class) or its flat folder; the labels are torchvision's pairing."""
    if val.is_file():
        with tarfile.open(val) as archive:
            members = {Path(m.name).name: m for m in archive if m.isfile()}
            yield from _by_class(
                sorted(members), wnids, lambda name: archive.extractfile(members[name]).read()
            )
        return
    names = sorted(entry.name for entry in os.scandir(val) if entry.is_file())
    yield from _by_class(names, wnids, lambda name: (val / name).read_bytes())


def _by_class(
    names: list[str], wnids: list[str], read: Callable[[str], bytes]
) -> Iterator[tuple[str, Images]]:
    if len(names) != len(wnids):
        raise PreparationError(f"--val: {len(names)} images, but the devkit labels {len(wnids)}")
    by_class: dict[str, list[str]] = {}
    for wnid, name in zip(wnids, names, strict=True):
        by_class.setdefault(wnid, []).append(name)
    for wnid in sorted(by_class):
        yield wnid, ((name, read(name)) for name in by_class[wnid])


def link_imagenet100(out: Path, subset: Path) -> None:
    """`subset/{train,val}/<wnid>`: links to OUT's folders of the ImageNet-100 classes."""
    for split in SPLITS:
        for wnid in imagenet100_classes():
            source = out / split / wnid
            if not source.is_dir():
                raise PreparationError(f"{source} is missing: ImageNet-100 needs each of its 100 classes")
            (subset / split).mkdir(parents=True, exist_ok=True)
            (subset / split / wnid).symlink_to(source.absolute(), target_is_directory=True)


def _existing(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sogclr.imagenet", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the data_dir to write: OUT/train, OUT/val")
    parser.add_argument("--devkit", type=_existing, required=True, help="ILSVRC2012_devkit_t12.tar.gz")
    parser.add_argument(
        "--train", type=_existing, required=True, help="ILSVRC2012_img_train.tar, or its unpacked folder"
    )
    parser.add_argument(
        "--val", type=_existing, required=True, help="ILSVRC2012_img_val.tar, or its flat unpacked folder"
    )
    parser.add_argument("--imagenet100", type=Path, metavar="OUT100", help="also an ImageNet-100 tree here")
    parser.add_argument(
        "--shards",
        action="store_true",
        help="write OUT as ~1 GB tar shards (data_format: shards), not a tree",
    )
    args = parser.parse_args(argv)
    if args.shards and args.imagenet100 is not None:
        parser.error("--imagenet100 makes a tree; dataset imagenet100 reads its classes from OUT's shards")
    try:
        if args.shards:
            print(summary(prepare_shards(args.out.expanduser(), args.devkit, args.train, args.val)))
            return 0
        prepare(args.out.expanduser(), args.devkit, args.train, args.val)
        if args.imagenet100 is not None:
            link_imagenet100(args.out.expanduser(), args.imagenet100.expanduser())
    except (PreparationError, DatasetError, RuntimeError, tarfile.TarError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    classes = sum(1 for _ in (args.out / "train").iterdir())
    print(
        f"{args.out}: {classes} classes; in a spec: pretrain: {{dataset: imagenet1k, data_dir: {args.out}}}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
