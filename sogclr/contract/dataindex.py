"""Which files a dataset is: its root on disk, and its index, the list of samples every process reads.

Walking an image tree costs one directory listing per folder and, on a shared file system, a metadata
storm when every rank of every attempt does it (ImageNet-1K: 1.28 million files, about 200 walks per
start of a 64-rank job). So the tree is walked once, by one process (the launcher at submission, or rank
0 of a run started without one), and the result is written as an index file:

    {"format": 1, "dataset": "imagenet100",
     "splits": {"train": {"classes": [...], "files": [[files of class 0], ...], "count": N, "sha256": ...},
                "val": {...}}}

Files are paths relative to their class folder; a sample's relative path is `<class>/<file>`, and its
target is its class's position in `classes`. The order is torchvision's ImageFolder's (sorted classes,
then each class folder walked in sorted order), so dataset indices are those ImageFolder would give. A
split's fingerprint is its count and the sha256 of its relative paths in that order: it says which image
each dataset index (and so each SogCLR estimator `u[i]`) belongs to, wherever the tree lives.

Index files are named by their content (`<dataset>-<fingerprint>.json`) and never change; a directory of
them has `sources.json`, which says which index stands for which data root (`ensure_index`).

This module imports neither torch nor torchvision: the launcher uses it on the login node.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from sogclr.contract.atomic import write_atomic
from sogclr.contract.config import PretrainConfig

INDEX_FORMAT = 1
SPLITS = ("train", "val")
SOURCES = "sources.json"
# torchvision.datasets.folder.IMG_EXTENSIONS, compared in lower case as ImageFolder does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

DIGITS_VERSION = "digits-v1"
DIGITS_IMAGE_SIZE = 32
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DatasetError(ValueError):
    """The data on disk cannot be a dataset (empty, a class folder without images, mismatched splits),
    or an index file is unreadable: one line naming the path."""


# --------------------------------------------------------------------------------------------------------
# Dataset roots


def data_root(cfg: PretrainConfig) -> Path:
    """The directory holding `train/` and `val/` class-subfolder trees for `cfg.dataset`, without
    touching the disk (`prepare_data_root` checks it, and writes the digits)."""
    if cfg.dataset == "digits":
        return _digits_cache_dir(cfg) / DIGITS_VERSION
    if cfg.data_dir is None:
        raise ValueError(f"pretrain.data_dir is required for dataset {cfg.dataset!r}")
    return Path(cfg.data_dir).expanduser().absolute()


def prepare_data_root(cfg: PretrainConfig) -> Path:
    """`data_root(cfg)`, checked to hold both splits; for `digits` the tree is written once into the
    cache (safe when many processes call this at once)."""
    if cfg.dataset == "digits":
        return _materialise_once(data_root(cfg), _write_digits)
    root = data_root(cfg)
    if cfg.data_format == "shards":
        _require_dir(root, f"the shard directory of dataset {cfg.dataset!r}")
        return root
    for split in SPLITS:
        _require_dir(root / split, f"the {split} split of dataset {cfg.dataset!r}")
    return root


def class_subset(cfg: PretrainConfig) -> list[str] | None:
    """The classes a dataset restricts its tree to (ImageNet-100), or None for every class folder."""
    return imagenet100_classes() if cfg.dataset == "imagenet100" else None


def imagenet100_classes() -> list[str]:
    """The ImageNet-100 class list: the first 100 ImageNet-1K WNIDs in sorted order, as the reference."""
    return resources.files("sogclr.contract").joinpath("imagenet100.txt").read_text().split()


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{path} does not exist or is not a directory ({what})")


def _digits_cache_dir(cfg: PretrainConfig) -> Path:
    if cfg.data_dir is not None:
        return Path(cfg.data_dir).expanduser().absolute()
    return Path(os.environ.get("SOGCLR_CACHE", "~/.cache/sogclr")).expanduser()


def _materialise_once(root: Path, write: Callable[[Path], None]) -> Path:
    """Create `root` with `write(staging_dir)` unless it exists; concurrent callers all get one result.

    Each caller builds in its own temporary sibling and renames it into place. The rename is atomic and
    fails when `root` already exists, so a reader never sees a half-written tree; a loser keeps the winner's.
    """
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write(staging)
        staging.rename(root)
    except OSError:
        if not root.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _write_digits(root: Path) -> None:
    """scikit-learn's digits (1,797 8x8 images, BSD-3) as PNG folders `{train,val}/<digit>/<index>.png`."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, val = train_test_split(
        indices, test_size=DIGITS_VAL_FRACTION, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
    )
    for split, split_indices in (("train", train), ("val", val)):
        for index in split_indices:
            folder = root / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            # Pixels are counts 0..16 of ink in 4x4 blocks. Bicubic upscaling gives smooth strokes;
            # nearest would add a blocky 4-pixel grid that crops and blur would then have to learn around.
            gray = Image.fromarray(np.round(digits.images[index] * (255 / 16)).astype(np.uint8))
            size = (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE)
            gray.resize(size, Image.Resampling.BICUBIC).convert("RGB").save(folder / f"{index:04d}.png")


# --------------------------------------------------------------------------------------------------------
# The index


@dataclass(frozen=True)
class SplitIndex:
    """The samples of one split: `files[c]` are the images of class `classes[c]`, relative to its folder."""

    classes: list[str]
    files: list[list[str]]

    def relative_paths(self) -> Iterator[str]:
        """`<class>/<file>` of every sample, in dataset-index order."""
        for name, files in zip(self.classes, self.files, strict=True):
            for file in files:
                yield f"{name}/{file}"

    @property
    def count(self) -> int:
        return sum(len(files) for files in self.files)

    @cached_property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for path in self.relative_paths():
            digest.update(path.encode() + b"\n")
        return digest.hexdigest()

    @property
    def identity(self) -> dict[str, int | str]:
        """What says which images a split is: its count and the hash of its paths."""
        return {"count": self.count, "sha256": self.sha256}

    def samples(self, split_root: Path) -> list[tuple[str, int]]:
        """(absolute path, target) of every sample, in dataset-index order (ImageFolder's `samples`)."""
        prefix = f"{split_root.absolute()}/"
        return [
            (f"{prefix}{name}/{file}", target)
            for target, (name, files) in enumerate(zip(self.classes, self.files, strict=True))
            for file in files
        ]


@dataclass(frozen=True)
class DatasetIndex:
    """Both splits of a dataset; `fingerprint` names the pair."""

    dataset: str
    splits: dict[str, SplitIndex]
    shards: Any = None  # the ShardIndex its images are read from (sogclr/contract/shards.py), if any

    @cached_property
    def fingerprint(self) -> str:
        text = "".join(f"{split} {self.splits[split].sha256}\n" for split in SPLITS)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def file_name(self) -> str:
        return f"{self.dataset}-{self.fingerprint[:16]}.json"

    def renamed(self, dataset: str) -> DatasetIndex:
        return DatasetIndex(dataset, self.splits)


def index_split(directory: Path, classes: Sequence[str] | None = None) -> SplitIndex:
    """Walk one split's class folders (`classes`, or every subfolder) as ImageFolder would, following
    links; DatasetError when there is no class folder, or a class folder holds no image."""
    if classes is None:
        with os.scandir(directory) as entries:
            classes = sorted(entry.name for entry in entries if entry.is_dir())
        if not classes:
            raise DatasetError(f"{directory} has no class folders (expected {directory}/<class>/<image>)")
    files = []
    for name in classes:
        folder = directory / name
        _require_dir(folder, "a class folder")
        found = _images_under(folder)
        if not found:
            kinds = "/".join(IMAGE_EXTENSIONS)
            raise DatasetError(f"{folder} holds no image (a class folder needs at least one {kinds} file)")
        files.append(found)
    return SplitIndex(list(classes), files)


def _images_under(folder: Path) -> list[str]:
    """Image files under `folder`, relative to it, in ImageFolder's order (make_dataset)."""
    found = []
    for parent, _, names in sorted(os.walk(folder, followlinks=True)):
        relative = os.path.relpath(parent, folder)
        for name in sorted(names):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(name if relative == "." else f"{relative}/{name}")
    return found


def build_index(cfg: PretrainConfig) -> DatasetIndex:
    """Walk both splits of `cfg`'s dataset (writing the digits first), or read its shard index; the
    validation split must have exactly the training split's classes, so that a target means the same
    class in both."""
    root = prepare_data_root(cfg)
    if cfg.data_format == "shards":
        from sogclr.contract.shards import read_shard_index  # (it builds on this module)

        return read_shard_index(root).dataset_index(class_subset(cfg)).renamed(cfg.dataset)
    train = index_split(root / "train", class_subset(cfg))
    val = index_split(root / "val", class_subset(cfg))
    if val.classes != train.classes:
        extra = sorted(set(val.classes) - set(train.classes))
        missing = sorted(set(train.classes) - set(val.classes))
        what = f"lacks class {missing[0]}" if missing else f"has a class train has not, {extra[0]}"
        raise DatasetError(f"{root / 'val'} {what} ({len(missing)} missing, {len(extra)} extra)")
    return DatasetIndex(cfg.dataset, {"train": train, "val": val})


def write_index(index: DatasetIndex, directory: Path) -> Path:
    """`<directory>/<dataset>-<fingerprint>.json` (written unless there already: same name, same content)."""
    path = directory / index.file_name
    if not path.is_file():
        splits = {
            name: {"classes": split.classes, "files": split.files, **split.identity}
            for name, split in index.splits.items()
        }
        document = {"format": INDEX_FORMAT, "dataset": index.dataset, "splits": splits}
        write_atomic(path, lambda f: f.write(json.dumps(document, separators=(",", ":")).encode()))
    return path


def read_index(path: str | Path) -> DatasetIndex:
    """The index in `path`, its counts and hashes checked; DatasetError when it is missing or damaged."""
    try:
        document = json.loads(Path(path).read_bytes())
        stored = document["splits"]
        splits = {name: SplitIndex(s["classes"], s["files"]) for name, s in stored.items()}
        recorded = {name: {"count": s["count"], "sha256": s["sha256"]} for name, s in stored.items()}
        index = DatasetIndex(document["dataset"], splits)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"dataset index {path} is unreadable: {type(error).__name__}: {error}") from None
    if document.get("format") != INDEX_FORMAT or set(splits) != set(SPLITS):
        raise DatasetError(f"dataset index {path} is not a format-{INDEX_FORMAT} index of {SPLITS}")
    if any(splits[name].identity != recorded[name] for name in SPLITS):
        raise DatasetError(f"dataset index {path} is damaged: its files do not match its counts and hashes")
    return index


def changes_since(cfg: PretrainConfig, index: DatasetIndex) -> str | None:
    """What differs between `index` and `cfg`'s data now, cheaply (None when nothing does): for a tree,
    each class folder's image count from one listing per folder (no stat of any image); for shards,
    the shard index and each shard's size. Images added after the index was built would never be
    trained on; removed ones would fail a run in the middle of an epoch."""
    if cfg.data_format == "shards":
        from sogclr.contract.shards import read_shard_index

        shards = read_shard_index(data_root(cfg))
        shards.check_sizes()
        now = shards.dataset_index(class_subset(cfg))
        if now.fingerprint != index.fingerprint:
            return f"{shards.directory} now holds other images than the index (another shards.json)"
        return None
    root = data_root(cfg)
    for split in SPLITS:
        for name, files in zip(index.splits[split].classes, index.splits[split].files, strict=True):
            folder = root / split / name
            count = len(_images_under(folder)) if folder.is_dir() else 0
            if count != len(files):
                return f"{folder} holds {count} images, the index {len(files)}"
    return None


def source_key(cfg: PretrainConfig) -> str:
    """What an index is an index of: the dataset and where its tree is."""
    return f"{cfg.dataset} {data_root(cfg)}"


def ensure_index(cfg: PretrainConfig, directory: Path, rebuild: bool = False) -> Path:
    """The index file in `directory` that stands for `cfg`'s data: the one `sources.json` names, or (if
    none, or `rebuild`) one built now by walking the tree. Old index files stay: checkpoints name them."""
    if not rebuild and (path := current_index(cfg, directory)) is not None:
        return path
    return record_index(cfg, build_index(cfg), directory)


def current_index(cfg: PretrainConfig, directory: Path) -> Path | None:
    """The index file `directory/sources.json` names for `cfg`'s data, if any."""
    name = _read_sources(directory).get(source_key(cfg))
    return directory / name if name is not None and (directory / name).is_file() else None


def record_index(cfg: PretrainConfig, index: DatasetIndex, directory: Path) -> Path:
    """Write `index` into `directory` as the one that stands for `cfg`'s data; its path."""
    path = write_index(index, directory)
    sources = _read_sources(directory) | {source_key(cfg): path.name}
    write_atomic(directory / SOURCES, lambda f: f.write(json.dumps(sources, indent=2).encode()))
    return path


def _read_sources(directory: Path) -> dict[str, str]:
    path = directory / SOURCES
    return json.loads(path.read_text()) if path.is_file() else {}
