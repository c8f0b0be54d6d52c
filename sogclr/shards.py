"""An image-folder tree as shards, in one command (sogclr/contract/shards.py says what they are):

    python -m sogclr.shards TREE OUT [--dataset NAME] [--shard-gb 1]

reads TREE/train and TREE/val (class folders of images) and writes OUT/shards.json and OUT/train-*.tar,
OUT/val-*.tar: the `data_dir` of a spec with `data_format: shards`. For ImageNet from its official
archives, `python -m sogclr.imagenet OUT --shards ...` writes the shards without unpacking the images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sogclr.contract.dataindex import DatasetError
from sogclr.contract.shards import SHARD_BYTES, ShardIndex, pack_tree


def summary(shards: ShardIndex) -> str:
    """One line: what was written, and how a spec names it."""
    counts = ", ".join(f"{name} {split.split.count:,} images" for name, split in shards.splits.items())
    where = f"dataset: {shards.dataset}, data_dir: {shards.directory}, data_format: shards"
    size = f"{len(shards.shard_files)} shards, {shards.total_bytes / 1e9:.2f} GB"
    return f"{shards.directory}: {size} ({counts}); in a spec: pretrain: {{{where}}}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sogclr.shards", description=__doc__.split("\n")[0])
    parser.add_argument("tree", type=Path, help="the tree: TREE/train/<class>/<image>, TREE/val/...")
    parser.add_argument("out", type=Path, help="the shard directory to write")
    parser.add_argument("--dataset", default="folder", help="the dataset name the shards record")
    parser.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 1e9, help="size of a shard")
    args = parser.parse_args(argv)
    try:
        shards = pack_tree(
            args.tree.expanduser(), args.out.expanduser(), args.dataset, int(args.shard_gb * 1e9)
        )
    except (DatasetError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(shards))
    return 0


if __name__ == "__main__":
    sys.exit(main())
