"""A dataset as a few large tar files (shards) and the index of every image in them.

A cluster's shared file system is slow at 1.28 million small files (each read is an open, a stat and
a close on the metadata server, at every epoch) and sites cap files per project. So a dataset can be
written once as shards of about a gigabyte, in one directory:

    shards.json                       the index (below)
    train-000000.tar, ...             the training split, about SHARD_BYTES each
    val-000000.tar, ...

Each sample is two tar members, webdataset's convention (webdataset, wids or `tar x` read them too):
`<key>.<ext>` the image file's bytes unchanged, and `<key>.cls` its class number as decimal text;
the key is `<class>/<file name without its extension>`. Samples are written in the tree's dataset-index
order (sorted classes, then sorted files: ImageFolder's), so sample i of the shards is sample i of the
tree, and the same seed gives the same batches from either.

shards.json holds, per split, the tree's index (classes, files, count, sha256: what `dataindex.SplitIndex`
is), each shard's name, size and sha256, the sha256 of each class's image bytes (`class_content`), and
each sample's shard, data offset and size as little-endian base64 arrays: a reader seeks straight to an
image (one open file per shard per loader worker) and never lists or scans anything.

This module imports neither torch nor torchvision (the launcher reads shard sizes on the login node);
numpy only where member arrays are decoded.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sogclr.contract.atomic import write_atomic
from sogclr.contract.dataindex import SPLITS, DatasetError, DatasetIndex, SplitIndex

SHARD_INDEX = "shards.json"
SHARDS_FORMAT = 1
SHARD_BYTES = 1_000_000_000
TAR_BLOCK = 512
MEMBER_ARRAYS = {"shard": "<i4", "offset": "<i8", "size": "<i8"}


@dataclass(frozen=True)
class ShardFile:
    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardedSplit:
    """One split in shards: its index, its shard files, and where each sample's image lies in them."""

    split: SplitIndex
    shards: list[ShardFile]
    members: dict[str, str]  # MEMBER_ARRAYS, base64 (decoded by `member_arrays`)
    class_content: list[str]  # sha256 of the image bytes of each class, in dataset-index order

    @property
    def content(self) -> str:
        """What the images are, byte for byte: the sha256 of the classes' content digests."""
        return hashlib.sha256("".join(f"{d}\n" for d in self.class_content).encode()).hexdigest()

    def member_arrays(self) -> dict[str, Any]:
        """{shard, offset, size}: numpy arrays, one entry per sample."""
        import numpy as np

        return {
            key: np.frombuffer(base64.b64decode(self.members[key]), dtype=MEMBER_ARRAYS[key])
            for key in MEMBER_ARRAYS
        }

    def select(self, classes: Sequence[str]) -> ShardedSplit:
        """The same shards restricted to `classes` (ImageNet-100 read from ImageNet-1K's shards)."""
        import numpy as np

        if list(classes) == self.split.classes:
            return self
        missing = [name for name in classes if name not in self.split.classes]
        if missing:
            raise DatasetError(f"the shards lack class {missing[0]} ({len(missing)} missing)")
        starts = np.cumsum([0, *(len(files) for files in self.split.files)])
        rows = [self.split.classes.index(name) for name in classes]
        keep = np.concatenate([np.arange(starts[row], starts[row + 1]) for row in rows])
        arrays = self.member_arrays()
        return ShardedSplit(
            SplitIndex(list(classes), [self.split.files[row] for row in rows]),
            self.shards,
            {key: _encoded(arrays[key][keep], MEMBER_ARRAYS[key]) for key in MEMBER_ARRAYS},
            [self.class_content[row] for row in rows],
        )


@dataclass(frozen=True)
class ShardIndex:
    """A shard directory's index; `directory` is where its shards are (the original or a staged copy)."""

    directory: Path
    dataset: str
    splits: dict[str, ShardedSplit]

    @property
    def shard_files(self) -> list[ShardFile]:
        return [shard for split in SPLITS for shard in self.splits[split].shards]

    @property
    def total_bytes(self) -> int:
        return sum(shard.bytes for shard in self.shard_files)

    @property
    def digest(self) -> str:
        """Names this set of shard files (a staged copy's directory)."""
        text = "".join(f"{s.name} {s.sha256}\n" for s in self.shard_files)
        return hashlib.sha256(text.encode()).hexdigest()

    def dataset_index(self, classes: Sequence[str] | None = None) -> DatasetIndex:
        """The tree's index of these shards (both splits restricted to `classes` if given)."""
        return DatasetIndex(self.dataset, {name: self.split(name, classes).split for name in SPLITS})

    def split(self, name: str, classes: Sequence[str] | None = None) -> ShardedSplit:
        split = self.splits[name]
        return split if classes is None else split.select(classes)

    def check_sizes(self) -> None:
        """DatasetError naming the first shard that is missing or not the size the index says (a stat
        per shard: what can be checked at every start without reading them)."""
        for shard in self.shard_files:
            path = self.directory / shard.name
            size = path.stat().st_size if path.is_file() else None
            if size != shard.bytes:
                found = "missing" if size is None else f"{size} bytes"
                raise DatasetError(f"{path}: {found}, but {self.directory / SHARD_INDEX} says {shard.bytes}")


def read_shard_index(directory: str | Path) -> ShardIndex:
    """The index of the shard directory `directory`; DatasetError when it is not one, or is damaged."""
    directory = Path(directory).expanduser().absolute()
    path = directory / SHARD_INDEX
    try:
        document = json.loads(path.read_bytes())
        splits = {name: _sharded_split(s) for name, s in document["splits"].items()}
        recorded = {
            name: {"count": s["count"], "sha256": s["sha256"]} for name, s in document["splits"].items()
        }
    except FileNotFoundError:
        raise DatasetError(f"{directory} holds no {SHARD_INDEX}: not a shard directory") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"shard index {path} is unreadable: {type(error).__name__}: {error}") from None
    if document.get("format") != SHARDS_FORMAT or set(splits) != set(SPLITS):
        raise DatasetError(f"shard index {path} is not a format-{SHARDS_FORMAT} index of {SPLITS}")
    if any(splits[name].split.identity != recorded[name] for name in SPLITS):
        raise DatasetError(f"shard index {path} is damaged: its files do not match its counts and hashes")
    return ShardIndex(directory, document["dataset"], splits)


def _sharded_split(stored: dict[str, Any]) -> ShardedSplit:
    return ShardedSplit(
        SplitIndex(stored["classes"], stored["files"]),
        [ShardFile(**shard) for shard in stored["shards"]],
        {key: stored["members"][key] for key in MEMBER_ARRAYS},
        stored["class_content"],
    )


def _encoded(values: Sequence[int] | Any, dtype: str) -> str:
    import numpy as np

    return base64.b64encode(np.asarray(values, dtype).tobytes()).decode()


# --------------------------------------------------------------------------------------------------------
# Writing


class _HashingFile:
    """A file that hashes and counts what is written to it (tarfile needs `write` and `tell`)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.written = 0

    def write(self, data: bytes) -> int:
        self.file.write(data)
        self.digest.update(data)
        self.written += len(data)
        return len(data)

    def tell(self) -> int:
        return self.written


@dataclass
class SplitWriter:
    """Writes one split's samples, class by class in dataset-index order, into shards of about
    `shard_bytes`; `finish` returns what shards.json records of the split."""

    directory: Path
    split: str
    shard_bytes: int = SHARD_BYTES
    classes: list[str] = field(default_factory=list)
    files: list[list[str]] = field(default_factory=list)
    shards: list[ShardFile] = field(default_factory=list)
    arrays: dict[str, list[int]] = field(default_factory=lambda: {key: [] for key in MEMBER_ARRAYS})
    class_digests: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._file: BinaryIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._hashing: _HashingFile | None = None

    def add(self, class_name: str, file: str, data: bytes) -> None:
        """One image: `file` is its path relative to its class folder. Classes come in sorted order,
        each class's files in sorted order (the tree's dataset-index order)."""
        if not self.classes or self.classes[-1] != class_name:
            if class_name in self.classes or (self.classes and class_name < self.classes[-1]):
                raise DatasetError(
                    f"{self.split}: class {class_name} out of order (after {self.classes[-1]})"
                )
            self.classes.append(class_name)
            self.files.append([])
            self.class_digests.append(hashlib.sha256())
        if self._tar is None or (
            self._hashing.written and self._hashing.written + len(data) > self.shard_bytes
        ):
            self._next_shard()
        key = f"{class_name}/{file.rsplit('.', 1)[0].replace('.', '_')}"
        target = len(self.classes) - 1
        offset = self._member(f"{key}.{file.rsplit('.', 1)[-1].lower()}", data)
        self._member(f"{key}.cls", str(target).encode())
        self.files[-1].append(file)
        self.class_digests[-1].update(data)
        for name, value in (("shard", len(self.shards)), ("offset", offset), ("size", len(data))):
            self.arrays[name].append(value)

    def _member(self, name: str, data: bytes) -> int:
        """Add a tar member; its data's offset. Fixed owner and times: the same images, the same shards."""
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        self._tar.addfile(info, io.BytesIO(data))
        return self._tar.offset - -(-len(data) // TAR_BLOCK) * TAR_BLOCK

    def _next_shard(self) -> None:
        self._close_shard()
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._file = open(self.directory / f"{name}.partial", "wb")  # noqa: SIM115 (closed in _close_shard)
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.PAX_FORMAT)
        self._name = name

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        (self.directory / f"{self._name}.partial").rename(self.directory / self._name)
        self.shards.append(ShardFile(self._name, self._hashing.written, self._hashing.digest.hexdigest()))
        self._tar = None

    def finish(self) -> dict[str, Any]:
        self._close_shard()
        if not self.classes:
            raise DatasetError(f"the {self.split} split has no image")
        split = SplitIndex(self.classes, self.files)
        return {
            "classes": self.classes,
            "files": self.files,
            **split.identity,
            "shards": [vars(shard) for shard in self.shards],
            "class_content": [digest.hexdigest() for digest in self.class_digests],
            "members": {key: _encoded(self.arrays[key], dtype) for key, dtype in MEMBER_ARRAYS.items()},
        }


def open_shard_directory(directory: Path) -> Path:
    """`directory`, created for new shards; DatasetError if it already holds a shard index."""
    if (directory / SHARD_INDEX).exists():
        raise DatasetError(f"{directory / SHARD_INDEX} exists already; write the shards elsewhere")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def write_shard_index(directory: Path, dataset: str, splits: dict[str, dict[str, Any]]) -> Path:
    """shards.json, written last: a directory without it is no shard directory (an interrupted pack)."""
    document = {"format": SHARDS_FORMAT, "dataset": dataset, "splits": splits}
    path = directory / SHARD_INDEX
    write_atomic(path, lambda f: f.write(json.dumps(document, separators=(",", ":")).encode()))
    return path


def pack_tree(root: Path, out: Path, dataset: str = "folder", shard_bytes: int = SHARD_BYTES) -> ShardIndex:
    """The image-folder tree `root` (train/ and val/ class folders) as shards in `out`."""
    from sogclr.contract.dataindex import index_split

    open_shard_directory(out)
    splits = {}
    for name in SPLITS:
        index = index_split(root / name)
        writer = SplitWriter(out, name, shard_bytes)
        for class_name, files in zip(index.classes, index.files, strict=True):
            for file in files:
                writer.add(class_name, file, (root / name / class_name / file).read_bytes())
        splits[name] = writer.finish()
    write_shard_index(out, dataset, splits)
    return read_shard_index(out)
