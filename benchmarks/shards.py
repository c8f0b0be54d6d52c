"""A dataset as an image tree, as shards read in place, and as shards staged to another directory: files
created, metadata calls per epoch, images per second per loader worker, and the time to stage.

    nice -n 10 python benchmarks/shards.py                  # 100,000 small JPEGs in 100 classes

The synthetic dataset (64x48 JPEGs of smooth noise, about 2 kB each, like thumbnails: the cost per image
is the file system's, not the decoder's) is written once into --cache and packed into shards of
--shard-mb; later runs reuse both. Each measurement runs in a child process that is one loader worker:
it reads the images of a shuffled epoch (`IndexedImageFolder`, opened and decoded and cropped as
`augment_on: device` does), in the same run for each source. The page cache is dropped before each
(`echo 3 > /proc/sys/vm/drop_caches`, root only; the script says whether it could). Metadata calls are
counted with `strace -f -c` on a child that reads every image of the epoch (bytes only), less those of a
child that reads none (its start-up). Staging is `sogclr.data.staging.stage_shards` (copy, sha256 check,
rename) into a fresh directory, timed from a dropped cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dataindex import syscalls  # noqa: E402

METADATA = ("openat", "open", "newfstatat", "statx", "fstat", "lstat", "stat", "getdents64", "access")


def write_tree(root: Path, classes: int, per_class: int) -> None:
    """`classes` x `per_class` JPEGs in train/, and one per class in val/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 1)):
        for number in range(classes):
            folder = root / split / f"n{number:08d}"
            folder.mkdir(parents=True)
            for image in range(count):
                small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # upscaled: smooth, ~2 kB as JPEG
                picture = Image.fromarray(small).resize((64, 48), Image.Resampling.BILINEAR)
                picture.save(folder / f"n{number:08d}_{image}.JPEG", quality=90)


def prepared(cache: Path, classes: int, per_class: int, shard_mb: int) -> tuple[Path, Path]:
    """The tree and its shards in `cache` (made now if missing; a tree is complete once renamed)."""
    from sogclr.contract.shards import pack_tree

    tree, shards = cache / "tree", cache / "shards"
    if not tree.is_dir():
        started = time.perf_counter()
        write_tree(cache / "tree.partial", classes, per_class)
        (cache / "tree.partial").rename(tree)
        print(f"tree written in {time.perf_counter() - started:.0f} s")
    if not (shards / "shards.json").is_file():
        shutil.rmtree(shards, ignore_errors=True)
        started = time.perf_counter()
        pack_tree(tree, shards, "folder", shard_mb * 10**6)
        print(f"shards packed in {time.perf_counter() - started:.0f} s")
    return tree, shards


def dataset(source: Path, kind: str):  # noqa: ANN201 (torch-side import, in the child only)
    import dataclasses

    from sogclr.contract.config import PretrainConfig
    from sogclr.contract.dataindex import build_index
    from sogclr.contract.shards import read_shard_index
    from sogclr.data.datasets import build_pretrain_dataset

    fields = {"dataset": "folder", "data_dir": source, "image_size": 32, "augment_on": "device"}
    cfg = PretrainConfig(**fields, **({"data_format": "shards"} if kind != "tree" else {}))
    index = build_index(cfg)
    if kind != "tree":
        index = dataclasses.replace(index, shards=read_shard_index(source))
    return build_pretrain_dataset(cfg, index)


def worker(source: Path, kind: str, count: int, mode: str) -> dict[str, float]:
    """One loader worker's work on the first `count` images of epoch 0's shuffle: `decode` (what a
    worker does for `augment_on: device`) or `read` (bytes only); images per second."""
    from sogclr.data.datasets import epoch_permutation

    data = dataset(source, kind)
    order = epoch_permutation(0, 0, len(data))[:count].tolist()
    started = time.perf_counter()
    for index in order:
        if mode == "decode":
            data[index]
        else:
            data.images.read(index)
    return {"images_per_s": count / max(time.perf_counter() - started, 1e-9), "images": count}


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def child(source: Path, kind: str, count: int, mode: str, traced: Path | None = None) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", kind, "--source", str(source)]
    command += ["--count", str(count), "--mode", mode]
    if traced is not None:
        command = ["strace", "-f", "-c", "-o", str(traced), *command]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def files_under(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=1000, help="training images per class")
    parser.add_argument("--shard-mb", type=int, default=64, help="shard size (ImageNet: 1000)")
    parser.add_argument("--images", type=int, default=5_000, help="images read per throughput child")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sogclr-bench-shards"))
    parser.add_argument("--worker", choices=("tree", "shards", "staged"), help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("decode", "read"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.source, args.worker, args.count, args.mode)))
        return

    from sogclr.contract.shards import read_shard_index
    from sogclr.data.staging import stage_shards

    tree, shards = prepared(args.cache, args.classes, args.per_class, args.shard_mb)
    index = read_shard_index(shards)
    train = index.splits["train"].split.count
    print(
        f"dataset: {train:,} training + {index.splits['val'].split.count:,} validation JPEGs, "
        f"{sum(f.stat().st_size for f in tree.rglob('*.JPEG')) / 1e6:.0f} MB as files; "
        f"{index.total_bytes / 1e6:.0f} MB as {len(index.shard_files)} shards"
    )
    print(f"files: tree {files_under(tree):,}, shards {files_under(shards):,} (with shards.json)")

    staging_dir = args.cache / "staged"
    shutil.rmtree(staging_dir, ignore_errors=True)
    dropped = drop_caches()
    started = time.perf_counter()
    staged = stage_shards(index, staging_dir).directory
    stage_s = time.perf_counter() - started
    print(f"page cache dropped before each measurement: {dropped}")
    print(
        f"staging (copy + sha256 + rename, cold cache): {stage_s:.1f} s, "
        f"{index.total_bytes / 1e6 / stage_s:.0f} MB/s"
    )

    sources = {"tree": tree, "shards": shards, "staged": staged}
    counts, baseline = {}, {}
    for kind, source in sources.items():  # an epoch's reads, less the same child's start-up (count 0)
        for images, into in ((0, baseline), (train, counts)):
            traced = args.cache / f"strace-{kind}-{images}.txt"
            child(source, kind, images, "read", traced)
            into[kind] = syscalls(traced)

    def extra(kind: str, names: tuple[str, ...]) -> int:
        return sum(max(0, counts[kind].get(n, 0) - baseline[kind].get(n, 0)) for n in names)

    rates = {}
    for kind, source in sources.items():  # each from a dropped cache, then again warm
        drop_caches()
        cold = child(source, kind, args.images, "decode")["images_per_s"]
        warm = child(source, kind, args.images, "decode")["images_per_s"]
        rates[kind] = (cold, warm)

    print(
        f"one loader worker, {args.images:,} images of a shuffled epoch, decoded and cropped "
        "(augment_on: device):"
    )
    print("| source | metadata calls per epoch | openat per epoch | images/s, cold cache | images/s, warm |")
    print("|---|---:|---:|---:|---:|")
    for kind in sources:
        print(
            f"| {kind} | {extra(kind, METADATA):,} | {extra(kind, ('openat',)):,} "
            f"| {rates[kind][0]:,.0f} | {rates[kind][1]:,.0f} |"
        )
    base = rates["tree"][0]
    print(
        f"cold-cache rate against the tree: shards {rates['shards'][0] / base:.2f}x, "
        f"staged {rates['staged'][0] / base:.2f}x; metadata calls per epoch, tree / shards: "
        f"{extra('tree', METADATA) / max(1, extra('shards', METADATA)):,.0f}x"
    )


if __name__ == "__main__":
    main()
