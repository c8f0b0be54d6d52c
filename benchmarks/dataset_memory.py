"""Memory of an ImageNet-1K-sized training set: one rank's, and one forked loader worker's, with the samples
held as Python tuples (before) and as flat arrays (now).

    python benchmarks/dataset_memory.py

The index is synthetic and in memory (1,000 classes x 1,281 names like `n00000000_1280.JPEG`: 1,281,000
samples; no files are touched). Each way is measured in a fresh child process:

- rank: resident memory (VmRSS) added by building the training set from the index. Before: what
  IndexedImageFolder held until now, `SplitIndex.samples(root)` (a list of (absolute path, target)
  tuples) and a list of targets; now: IndexedImageFolder (paths as one bytes blob and an array of ends,
  targets as a numpy array).
- worker: the rank then forks, as DataLoader does for each worker, and the worker looks up the path and
  target of an eighth of a shuffled epoch (160,125 samples), as it would before opening each image. Its
  private dirty memory (Private_Dirty of /proc/self/smaps_rollup) grows by every page of the parent that
  it writes to: Python's reference counts and garbage collector write to every object they touch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CLASSES, PER_CLASS = 1000, 1281
ROOT = Path("/lustre/datasets/imagenet/train")


def kilobytes(field: str, path: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise ValueError(f"{field} not in {path}")


def measure(way: str) -> dict[str, float]:
    from sogclr.contract.dataindex import SplitIndex
    from sogclr.data.datasets import IndexedImageFolder, epoch_permutation

    classes = [f"n{number:08d}" for number in range(CLASSES)]
    index = SplitIndex(classes, [[f"{name}_{i}.JPEG" for i in range(PER_CLASS)] for name in classes])
    before = kilobytes("VmRSS:", "/proc/self/status")
    if way == "tuples":
        samples = index.samples(ROOT)
        targets = [target for _, target in samples]

        def lookup(i: int) -> tuple[str, int]:
            return samples[i][0], targets[i]
    else:
        dataset = IndexedImageFolder(ROOT, index, transform=None)

        def lookup(i: int) -> tuple[str, int]:
            return dataset.images.name(i), int(dataset.targets[i])

    rank_mb = (kilobytes("VmRSS:", "/proc/self/status") - before) / 1024
    # a numpy array: looping over a list of the parent's ints would copy their pages too
    order = epoch_permutation(0, 0, CLASSES * PER_CLASS)[: CLASSES * PER_CLASS // 8]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        start = kilobytes("Private_Dirty:", "/proc/self/smaps_rollup")
        for position in range(len(order)):
            lookup(int(order[position]))
        grown = (kilobytes("Private_Dirty:", "/proc/self/smaps_rollup") - start) / 1024
        os.write(write, json.dumps(grown).encode())
        os._exit(0)
    os.close(write)
    worker_mb = json.loads(os.read(read, 100))
    os.waitpid(pid, 0)
    return {"rank_mb": rank_mb, "worker_mb": worker_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--way", choices=("tuples", "flat"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        print(json.dumps(measure(args.way)))
        return
    found = {}
    for way in ("tuples", "flat"):
        out = subprocess.run(
            [sys.executable, __file__, "--way", way], capture_output=True, text=True, check=True
        )
        found[way] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"training set of {CLASSES * PER_CLASS:,} samples (ImageNet-1K-sized, synthetic index):")
    print("| samples held as | rank: resident memory added | one worker, 1/8 epoch: private memory copied |")
    print("|---|---:|---:|")
    for way, label in (("tuples", "(path, target) tuples (before)"), ("flat", "flat arrays (now)")):
        print(f"| {label} | {found[way]['rank_mb']:.0f} MiB | {found[way]['worker_mb']:.0f} MiB |")
    before, now = found["tuples"], found["flat"]
    print(
        f"rank, before / now: {before['rank_mb'] / max(now['rank_mb'], 1e-3):.1f}x; an 8-GPU node with 8 "
        "workers per rank, "
        f"before {8 * (before['rank_mb'] + 8 * before['worker_mb']) / 1024:.1f} GiB, "
        f"now {8 * (now['rank_mb'] + 8 * now['worker_mb']) / 1024:.2f} GiB"
    )


if __name__ == "__main__":
    main()
