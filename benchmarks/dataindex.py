"""Start-up of a pretraining attempt on one rank: walking the image tree (the library before the dataset
index) against reading the index, on a synthetic tree of empty files (the cost is metadata, not pixels).

    python benchmarks/dataindex.py                      # 1,000 classes x 200 training + 10 validation files

Each rank of a pretraining attempt with the kNN monitor used to build three ImageFolders: the training
set, the kNN bank (the training tree again) and the kNN queries (the validation tree). Now it reads one
index file and builds the same three datasets from it. Measured in child processes, interleaved, in the
same run: the system calls of the start-up (`strace -f -c`, less those of a child that only imports) and
its wall time (best of --repeats, without strace). Then both are scaled to ImageNet-1K (1,281,167 + 50,000
images) on 64 ranks. The tree is written under /tmp and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGENET_FILES = 1_281_167 + 50_000
RANKS = 64
METADATA = ("openat", "getdents64", "newfstatat", "statx", "fstat", "lstat", "stat", "readlink", "access")


def write_tree(root: Path, classes: int, train: int, val: int) -> None:
    for split, count in (("train", train), ("val", val)):
        for number in range(classes):
            folder = root / split / f"n{number:08d}"
            folder.mkdir(parents=True)
            for image in range(count):
                (folder / f"n{number:08d}_{image}.JPEG").touch()


def startup(mode: str, root: Path, index: Path) -> float:
    """One rank's start-up in `mode` (`today`, `index`, or `none`: imports only); its wall time."""
    import torch
    from torchvision.datasets import ImageFolder

    from sogclr.contract.config import PretrainConfig
    from sogclr.contract.dataindex import read_index
    from sogclr.data.datasets import build_plain_dataset, build_pretrain_dataset, open_image

    cfg = PretrainConfig(dataset="folder", data_dir=root)
    started = time.perf_counter()
    if mode == "today":  # what every rank did: the training set, the kNN bank, the kNN queries, each
        # an ImageFolder with its epoch in shared memory (as IndexedImageFolder was, and is)
        sets = [ImageFolder(root / split, loader=open_image) for split in ("train", "train", "val")]
        for dataset in sets:
            dataset.epoch = torch.zeros((), dtype=torch.int64).share_memory_()
    elif mode == "index":
        loaded = read_index(index)
        sets = [
            build_pretrain_dataset(cfg, loaded),
            *(build_plain_dataset(cfg, loaded, s) for s in ("train", "val")),
        ]
    else:
        sets = []
    elapsed = time.perf_counter() - started
    assert mode == "none" or len(sets[0]) == len(sets[1])
    return elapsed


def child(mode: str, root: Path, index: Path, traced: Path | None = None) -> float:
    command = [sys.executable, __file__, "--startup", mode, "--root", str(root), "--index", str(index)]
    if traced is not None:
        command = ["strace", "-f", "-c", "-o", str(traced), *command]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def syscalls(summary: Path) -> dict[str, int]:
    """Calls per system call from `strace -c`'s table."""
    calls = {}
    for line in summary.read_text().splitlines():
        fields = line.split()
        if len(fields) in (5, 6) and fields[3].isdigit() and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--train", type=int, default=200, help="training files per class")
    parser.add_argument("--val", type=int, default=10, help="validation files per class")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--startup", choices=("today", "index", "none"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup:
        print(json.dumps({"seconds": startup(args.startup, args.root, args.index)}))
        return

    from sogclr.contract.config import PretrainConfig
    from sogclr.contract.dataindex import build_index, write_index

    work = Path(tempfile.mkdtemp(prefix="sogclr-startup-", dir="/tmp"))
    try:
        root = work / "data"
        started = time.perf_counter()
        write_tree(root, args.classes, args.train, args.val)
        files = args.classes * (args.train + args.val)
        print(
            f"tree: {files:,} empty files in {args.classes:,} classes x 2 splits, written in "
            f"{time.perf_counter() - started:.1f} s"
        )
        started = time.perf_counter()
        index = write_index(build_index(PretrainConfig(dataset="folder", data_dir=root)), work / "datasets")
        built = time.perf_counter() - started
        size = index.stat().st_size / 1e6
        print(f"index: built once (one walk, as at submission) in {built:.2f} s, {size:.1f} MB")

        counts = {}
        for mode in ("none", "today", "index"):
            child(mode, root, index, work / f"strace-{mode}.txt")
            counts[mode] = syscalls(work / f"strace-{mode}.txt")
        seconds = {"today": [], "index": []}
        for _ in range(args.repeats):  # interleaved: drifting load hits both alike
            for mode in seconds:
                seconds[mode].append(child(mode, root, index))
        report(counts, {mode: min(values) for mode, values in seconds.items()}, files)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(counts: dict[str, dict[str, int]], seconds: dict[str, float], files: int) -> None:
    def extra(mode: str, names: tuple[str, ...] | None = None) -> int:
        chosen = names or tuple(counts[mode])
        return sum(max(0, counts[mode].get(n, 0) - counts["none"].get(n, 0)) for n in chosen)

    print("one rank's start-up of a pretraining attempt with the kNN monitor (3 datasets), beyond imports:")
    print("| start-up | system calls | metadata calls | getdents64 | openat | wall time |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, label in (("today", "walk the tree x3 (before)"), ("index", "read the index (now)")):
        print(
            f"| {label} | {extra(mode):,} | {extra(mode, METADATA):,} | {extra(mode, ('getdents64',)):,} "
            f"| {extra(mode, ('openat',)):,} | {seconds[mode] * 1000:.0f} ms |"
        )
    before, now = extra("today", METADATA), extra("index", METADATA)
    speedup = seconds["today"] / seconds["index"]
    print(
        f"metadata calls, before / now: {before / max(1, now):.0f}x; wall time, before / now: {speedup:.1f}x"
    )
    scale = IMAGENET_FILES / files
    print(
        f"ImageNet-1K x {RANKS} ranks, each start or requeue: before {before * scale * RANKS / 1e6:.1f} M "
        f"metadata calls ({before * scale / 1e3:.0f} k per rank, {seconds['today'] * scale:.1f} s per rank "
        f"here); now {now * RANKS:,} ({now} per rank, {seconds['index'] * scale:.1f} s per rank here), plus "
        "one walk at submission"
    )


if __name__ == "__main__":
    main()
