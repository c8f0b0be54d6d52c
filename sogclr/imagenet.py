"""From the official ImageNet-1K (ILSVRC2012) files to the layout the library reads, in one command:

    python -m sogclr.imagenet OUT --devkit ILSVRC2012_devkit_t12.tar.gz \\
        --train ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar [--imagenet100 OUT100]

writes `OUT/train/<wnid>/*.JPEG` and `OUT/val/<wnid>/*.JPEG`, the `data_dir` of datasets `imagenet1k` and
`imagenet100`. Each of `--train` and `--val` is the official archive or what it unpacks to:

- `--train` archive: extracted by torchvision (`parse_train_archive`: the archive, then each class's tar);
  a directory of class folders (`<wnid>/*.JPEG`): `OUT/train/<wnid>` is a link to each folder, nothing
  is copied; a directory of class tars (the outer archive unpacked): each is extracted.
- `--val` archive: extracted and sorted into class folders by torchvision (`parse_val_archive`); the
  flat directory of the 50,000 images: `OUT/val/<wnid>/<image>` is a link to each image.

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
from pathlib import Path

from torchvision.datasets.imagenet import (
    load_meta_file,
    parse_devkit_archive,
    parse_train_archive,
    parse_val_archive,
)
from torchvision.datasets.utils import extract_archive

from sogclr.contract.dataindex import SPLITS, imagenet100_classes


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
    args = parser.parse_args(argv)
    try:
        prepare(args.out.expanduser(), args.devkit, args.train, args.val)
        if args.imagenet100 is not None:
            link_imagenet100(args.out.expanduser(), args.imagenet100.expanduser())
    except (PreparationError, RuntimeError, tarfile.TarError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    classes = sum(1 for _ in (args.out / "train").iterdir())
    print(
        f"{args.out}: {classes} classes; in a spec: pretrain: {{dataset: imagenet1k, data_dir: {args.out}}}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
